"""TRL's trainers on the same model, data and hyper-parameters as ours, one run per process, for trl_comparison.py.

    python benchmarks/trl_runners.py grpo --model checkpoints/sft --steps 100 --output-dir /tmp/trl-grpo

Each run saves its final model to --output-dir and writes `timing.json` there: the wall time between the
ends of consecutive optimizer steps (a TrainerCallback; generation, batch loading and logging included), and
`log_history.json`, TRL's logged metrics (every --logging-steps steps).
Needs `pip install -r benchmarks/requirements-bench.txt`.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import tasks  # noqa: E402


@dataclass
class Args:
    algorithm: tyro.conf.Positional[Literal["grpo", "dpo", "reward_model"]]
    """which TRL trainer to run"""
    model: str = "checkpoints/sft"
    """starting checkpoint (a causal LM; the reward model gets a new scalar head unless it is a reward model already)"""
    output_dir: str = "/tmp/trl-run"
    """where the final model and timing.json go"""
    seed: int = 1
    steps: int = 100
    """optimizer steps"""
    logging_steps: int | None = None
    """log TRL's metrics (loss, grad norm, ...) every this many steps; default steps / 10"""
    learning_rate: float = 1e-5
    batch_size: int = 16
    """GRPO: prompts per step; DPO and reward model: preference pairs per step"""
    digits: int = 2
    dataset: str = "arithmetic"
    """`arithmetic`, or a .jsonl file: prompt/answer for GRPO, prompt/chosen/rejected for DPO and the reward model"""
    # GRPO
    reward: Literal["arithmetic", "math"] = "arithmetic"
    """exact match (tasks.arithmetic_reward) or the final-answer reward (tasks.math_answer_reward)"""
    group_size: int = 8
    max_completion_length: int = 5
    temperature: float = 1.0
    beta: float = 0.0
    loss_type: str = "grpo"
    epsilon: float = 0.2
    # DPO
    dpo_beta: float = 0.1
    dpo_sft_coef: float = 0.0
    """weight of the NLL of the chosen completions (TRL's loss_type `sft`, the token mean over the batch), as dpo.py's
    --sft-coef; 0: plain sigmoid DPO"""
    # reward model
    center_rewards_coefficient: float | None = None
    """as reward_model.py's --center-rewards-coefficient (None: TRL's default, no centring term)"""
    # shared
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    held_out: int = 0
    """a .jsonl file's first rows that ours holds out of training (its --eval-size), left out here too"""
    warmup_steps: int = 0
    chat_template: bool = False
    """prompts as a user turn of the chat template (a conversational dataset for TRL; completions as assistant turns)"""


def preference_pairs(args: Args) -> list[dict]:
    """On arithmetic, the pairs ours trains on, in the order ours visits them: dpo.py and reward_model.py shuffle with
    torch.randperm(n, generator seeded with --seed); TRL is given that permutation and a sequential sampler."""
    import torch

    if args.dataset == "arithmetic":
        pairs = tasks.arithmetic_preference_pairs(args.steps * args.batch_size, args.digits, "train", seed=args.seed)
    else:
        fields = ("prompt", "chosen", "rejected")
        pairs = [{key: row[key] for key in fields} for row in tasks.read_jsonl(args.dataset, fields)][args.held_out :]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    pairs = [pairs[i] for i in order][: args.steps * args.batch_size]  # those the run visits (TRL precomputes all)
    if args.chat_template:  # conversational pairs: TRL applies the chat template to the prompt
        turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
        pairs = [
            {
                "prompt": turn("user", p["prompt"]),
                "chosen": turn("assistant", p["chosen"]),
                "rejected": turn("assistant", p["rejected"]),
            }
            for p in pairs
        ]
    return pairs


def main(args: Args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    common.seed_everything(args.seed)
    tokenizer = common.load_tokenizer(args.model)
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        """The wall time between the ends of consecutive optimizer steps: the whole loop, batch loading and
        logging included, as ours is timed (the gaps between its per-step TensorBoard events)."""

        last_end = None

        def on_step_end(self, *unused, **unused_kwargs):
            now = time.perf_counter()
            if self.last_end is not None:
                step_times.append(now - self.last_end)
            self.last_end = now

    shared = dict(
        output_dir=args.output_dir,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay,
        seed=args.seed,
        logging_steps=args.logging_steps or max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        disable_dropout=True,
        gradient_checkpointing=False,  # TRL's configs default to True; ours recompute nothing unless asked
    )
    if args.algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        if args.dataset == "arithmetic":
            rows = tasks.arithmetic_problems(args.steps * args.batch_size, args.digits, "train", seed=args.seed)
        else:
            rows = [
                {"prompt": row["prompt"], "answer": row["answer"]}
                for row in tasks.read_jsonl(args.dataset, ("prompt", "answer"))[args.held_out :]
            ]
        if args.chat_template:
            rows = [{"prompt": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]} for row in rows]
        config = GRPOConfig(
            **shared,
            per_device_train_batch_size=args.batch_size * args.group_size,
            num_generations=args.group_size,
            max_completion_length=args.max_completion_length,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            beta=args.beta,
            loss_type=args.loss_type,
            scale_rewards="group",
            epsilon=args.epsilon,
            num_iterations=1,
        )

        reward_function = tasks.math_answer_reward if args.reward == "math" else tasks.arithmetic_reward

        def reward(prompts, completions, answer, **unused):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational completions
            return reward_function(prompts, texts, answer)

        trainer = GRPOTrainer(
            model=common.load_model(args.model),
            reward_funcs=reward,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
    elif args.algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer

        pairs = preference_pairs(args)
        config = DPOConfig(
            **shared,
            per_device_train_batch_size=args.batch_size,
            beta=args.dpo_beta,
            loss_type=["sigmoid", "sft"] if args.dpo_sft_coef else ["sigmoid"],
            loss_weights=[1.0, args.dpo_sft_coef] if args.dpo_sft_coef else None,
            precompute_ref_log_probs=True,
            train_sampling_strategy="sequential",  # preference_pairs is already in our order
        )
        trainer = DPOTrainer(
            model=common.load_model(args.model),
            args=config,
            train_dataset=Dataset.from_list(pairs),
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
    else:
        from trl import RewardConfig, RewardTrainer

        pairs = preference_pairs(args)
        model = common.load_model(args.model, AutoModelForSequenceClassification, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        config = RewardConfig(
            **shared,
            per_device_train_batch_size=args.batch_size,
            train_sampling_strategy="sequential",
            center_rewards_coefficient=args.center_rewards_coefficient,
        )
        trainer = RewardTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(pairs),
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )

    trainer.train()
    common.save_model(trainer.model, tokenizer, args.output_dir)
    (Path(args.output_dir) / "timing.json").write_text(json.dumps({"step_times": step_times}))
    (Path(args.output_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    print(f"TRL {args.algorithm}: {len(step_times)} steps, saved {args.output_dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
