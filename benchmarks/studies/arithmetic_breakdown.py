"""Where a checkpoint's arithmetic errors are: accuracy split by prompt shape, greedy and sampled.

The SFT model's held-out errors are not spread evenly: problems with a one-digit operand ("85+2=", "5+72=")
are about a sixth of the problems and most of the errors. This script shows, for each checkpoint given, on
the held-out set and on training-split problems:

- greedy exact-match accuracy on "short" prompts (an operand with fewer digits) and on "long" ones;
- accuracy of samples at --temperature, --group-size per problem, and the fraction of problems whose whole
  group is wrong (a GRPO group with zero advantage: no learning signal for that problem);
- on the near-miss preference pairs of the same problems (what reward_model.py and dpo.py train and evaluate
  on), how often the model's own log-likelihood ranks the correct answer above the near miss: the ranking a
  reward model started from this checkpoint has to learn to read out at its last token.

    python benchmarks/studies/arithmetic_breakdown.py --checkpoints checkpoints/sft checkpoints/grpo

Finding: benchmarks/results/2026-12-02-sft-defaults.md (the errors are problems with a one-digit operand; also
used in 2026-12-02-grpo.md and 2026-12-02-reward-model.md).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402
import tasks  # noqa: E402


@dataclass
class Args:
    checkpoints: tuple[str, ...]
    """checkpoint folders to compare (tokenizer and model)"""
    digits: int = 2
    """operand digits of the arithmetic task"""
    size: int = 500
    """problems per split"""
    group_size: int = 8
    """samples per problem"""
    temperature: float = 1.0
    """sampling temperature"""
    seed: int = 0
    """seed of the sampling"""


def is_short(prompt: str, digits: int) -> bool:
    return any(len(operand) < digits for operand in prompt.rstrip("=").split("+"))


@torch.no_grad()
def sampled_rewards(
    model, tokenizer, problems: list[dict], group_size: int, temperature: float, max_new_tokens: int
) -> torch.Tensor:
    """(problems, group_size) exact-match rewards of samples at `temperature`."""
    prompt_ids = [
        common.tokenize_prompt(tokenizer, problem["prompt"]) for problem in problems for _ in range(group_size)
    ]
    inputs = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt", padding_side="left")
    output = model.generate(
        **inputs,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    completion_ids = output[:, inputs["input_ids"].size(1) :]
    mask, _ = common.completion_mask(completion_ids, tokenizer.eos_token_id)
    answers = [problem["answer"] for problem in problems for _ in range(group_size)]
    rewards = tasks.arithmetic_reward([], common.decode_completions(tokenizer, completion_ids, mask), answers)
    return torch.tensor(rewards).view(len(problems), group_size)


@torch.no_grad()
def likelihood_prefers_chosen(model, tokenizer, pairs: list[dict]) -> torch.Tensor:
    """Per pair: log pi(chosen + EOS | prompt) > log pi(rejected + EOS | prompt), summed over the completion tokens."""
    prompt_ids = [common.tokenize_prompt(tokenizer, pair["prompt"]) for pair in pairs]

    def completion_logprob(key: str) -> torch.Tensor:
        completion_ids = [
            tokenizer(pair[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for pair in pairs
        ]
        sequences = [prompt + completion for prompt, completion in zip(prompt_ids, completion_ids)]
        batch = tokenizer.pad({"input_ids": sequences}, return_tensors="pt", padding_side="right")
        position_ids = common.position_ids_from_mask(batch["attention_mask"])
        logits = model(**batch, position_ids=position_ids).logits[:, :-1]
        logprobs = common.token_logprobs(logits, batch["input_ids"][:, 1:])  # logprobs[:, t] is of token t + 1
        starts = torch.tensor([len(prompt) - 1 for prompt in prompt_ids])
        ends = starts + torch.tensor([len(completion) for completion in completion_ids])
        positions = torch.arange(logprobs.size(1))
        return (logprobs * ((positions >= starts[:, None]) & (positions < ends[:, None]))).sum(dim=1)

    return completion_logprob("chosen") > completion_logprob("rejected")


def main(args: Args) -> None:
    # the pairs' problems are the split's problems (same split and seed), each with a near-miss rejected answer
    splits = {
        "held-out": (
            tasks.arithmetic_eval_set(args.size, args.digits),
            tasks.arithmetic_preference_pairs(args.size, args.digits, "test", seed=1234),
        ),
        "train": (
            tasks.arithmetic_problems(args.size, args.digits, "train", seed=999),
            tasks.arithmetic_preference_pairs(args.size, args.digits, "train", seed=999),
        ),
    }
    print(
        "| checkpoint | split | greedy all | greedy short | greedy long | sampled short | sampled long "
        "| all-wrong groups short | all-wrong groups long | likelihood ranks near-miss pairs right |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        tokenizer, model = common.load_tokenizer(checkpoint), common.load_model(checkpoint)
        for split, (problems, pairs) in splits.items():
            common.seed_everything(args.seed)
            accuracy, completions = common.evaluate_accuracy(model, tokenizer, problems, args.digits + 2)
            greedy = torch.tensor(tasks.arithmetic_reward([], completions, [problem["answer"] for problem in problems]))
            sampled = sampled_rewards(model, tokenizer, problems, args.group_size, args.temperature, args.digits + 2)
            short = torch.tensor([is_short(problem["prompt"], args.digits) for problem in problems])
            all_wrong = sampled.sum(dim=1) == 0
            cells = [greedy[short].mean(), greedy[~short].mean(), sampled[short].mean(), sampled[~short].mean()]
            cells += [all_wrong[short].float().mean(), all_wrong[~short].float().mean()]
            cells += [likelihood_prefers_chosen(model, tokenizer, pairs).float().mean()]
            print(
                f"| {checkpoint} | {split} ({short.sum()} short) | {accuracy:.3f} | "
                + " | ".join(f"{c:.3f}" for c in cells)
                + " |"
            )


if __name__ == "__main__":
    main(tyro.cli(Args))
