# Group Relative Policy Optimization (GRPO): a clipped policy gradient whose baseline is the mean reward of a group
# of completions of the same prompt; no critic. README.md, section "GRPO".
import contextlib
import math
import re
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import common


@dataclass
class Args:
    # experiment
    exp_name: str = "grpo"
    """the name of this experiment (prefix of the run name under runs/)"""
    seed: int = 1
    """seed of the experiment"""
    device: str = "auto"
    """`auto` (cuda > mps > cpu), or a torch device such as `cpu` or `cuda:1`"""
    dtype: str = "auto"
    """`auto` (mixed on a GPU with bf16, float32 elsewhere), `mixed` (fp32 weights, bf16 autocast), float32, bfloat16, float16"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project_name: str = "rlhf-reference"
    """the W&B project, when --track"""
    wandb_entity: str | None = None
    """the W&B entity (team), when --track"""
    output_dir: str = "checkpoints/grpo"
    """where the Hugging Face checkpoint (model + tokenizer) is written"""

    # model, data and rewards
    model: str = "checkpoints/sft"
    """the policy to start from (and the reference model): a Hugging Face model id or a local checkpoint folder"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    dataset: str = "arithmetic"
    """`arithmetic` (built-in addition task), a prompt/answer .jsonl file, or a Hugging Face dataset id"""
    digits: int = 2
    """operand digits of the arithmetic task"""
    hf_split: str = "train"
    """split of a Hugging Face dataset"""
    prompt_field: str = "prompt"
    """prompt column of a Hugging Face dataset"""
    answer_field: str = "answer"
    """answer column of a Hugging Face dataset"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (when it has one)"""
    reward_funcs: tuple[str, ...] | None = None
    """rule-based rewards among `arithmetic` (exact match), `math` (final answer), `format`; default `arithmetic` on the built-in task, `math` otherwise"""
    reward_model: str | None = None
    """an AutoModelForSequenceClassification checkpoint (what reward_model.py writes) used as one more reward function"""
    reward_weights: tuple[float, ...] | None = None
    """one weight per reward function (the rule-based ones, then the reward model); default all 1"""

    # GRPO
    total_steps: int = 3000
    """rollouts; each is followed by --num-iterations optimizer steps"""
    batch_size: int = 128
    """completions per rollout over all processes: (number of prompts) x --group-size"""
    group_size: int = 8
    """G, completions sampled per prompt; their mean reward is the baseline"""
    micro_batch_size: int = 128
    """completions per forward/backward pass (and per no-grad log-prob pass); gradients accumulate over the batch"""
    max_completion_length: int | None = None
    """tokens generated per completion; default digits + 2 on arithmetic, 256 otherwise"""
    temperature: float = 1.0
    """sampling temperature; every log-prob is computed at the same temperature"""
    learning_rate: float = 3e-5
    """peak learning rate of AdamW; small, because Adam turns the noise of a sampled policy gradient into full-size steps
    (README.md, "Why the learning rates are small")"""
    warmup_steps: int = 0
    """optimizer steps of linear warm-up (the rate reaches its peak at the last one), then linear decay to 0"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    num_iterations: int = 1
    """mu, optimizer steps on each rollout; the importance ratio matters only when mu > 1"""
    epsilon: float = 0.2
    """lower clip range: rho is clipped at 1 - epsilon"""
    epsilon_high: float | None = None
    """upper clip range: rho is clipped at 1 + epsilon_high; default --epsilon (DAPO's clip-higher uses 0.28)"""
    beta: float = 0.0
    """KL coefficient; 0 loads no reference model at all"""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """how per-token losses are averaged (see grpo_loss)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide centred rewards by the group std, the batch std, or nothing (Dr. GRPO)"""
    mask_truncated_completions: bool = False
    """leave completions that never produced EOS out of the loss"""
    eval_every: int = 100
    """evaluate held-out greedy accuracy every this many steps (and before the first and after the last)"""
    eval_size: int = 500
    """held-out examples to evaluate on"""

    # memory (README.md, "Scaling up")
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them: less memory, more compute"""
    lora_r: int = 0
    """rank of LoRA adapters (needs peft); 0 trains every weight. With LoRA the reference is the model with adapters off"""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A to each target weight"""
    lora_target_modules: str = "all-linear"
    """comma-separated module names that get adapters, or `all-linear`"""


# ----------------------------------------------------------------------------- rewards
# a number in running text: `-` is a sign only where it cannot be a minus (`x = -5`, not `12-5`); thousands separators
# only in groups of three (`1,234`, not the list `3,4`); never the tail of a longer number (`.5` is not 5)
_NUMBER = r"(?:(?<![\w).])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"


def _final_answer(text: str) -> str | None:
    """The text after the last `####` or `Answer:` (first line), else inside the last `\\boxed{}`, else the last number."""
    marker = max(text.rfind("####"), text.rfind("Answer:"))
    if marker >= 0:
        after = text[marker:].removeprefix("####").removeprefix("Answer:").strip()
        text = after.splitlines()[0] if after else ""
    if "\\boxed{" in text:
        start, depth = text.rfind("\\boxed{") + len("\\boxed{"), 1
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start:end].strip()
        return None
    if marker >= 0:
        return text.strip() or None
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def _as_number(text: str) -> float | None:
    """`1,234.5`, `$12`, `7.` -> a float; anything else -> None (parsed with a regular expression, never eval)."""
    text = text.strip().removeprefix("$").rstrip(".").replace(",", "")
    return float(text) if re.fullmatch(r"-?\d+(\.\d+)?", text) else None


def math_answer_reward(prompts: list[str], completions: list[str], answer: list[str], **unused_fields) -> list[float]:
    """1.0 when the completion's final answer equals the reference answer (numerically where both parse), else 0.0."""
    rewards = []
    for completion, target in zip(completions, answer):
        found = _final_answer(completion)
        number, target_number = _as_number(found or ""), _as_number(target)
        if number is not None and target_number is not None:
            rewards.append(float(math.isclose(number, target_number, rel_tol=1e-9, abs_tol=1e-9)))
        else:
            rewards.append(float(found is not None and found.strip() == target.strip()))
    return rewards


def format_reward(prompts: list[str], completions: list[str], **unused_fields) -> list[float]:
    """1.0 when the completion states an explicit final answer (`#### x`, `Answer: x` or `\\boxed{x}`), else 0.0."""
    return [float(re.search(r"(####|Answer:)\s*\S|\\boxed\{[^}]", completion) is not None) for completion in completions]


REWARD_FUNCTIONS = {"arithmetic": common.arithmetic_reward, "math": math_answer_reward, "format": format_reward}


def reward_model_reward(reward_model, tokenizer, chat_template: bool, batch_size: int):
    """A reward function r(q, o) = the reward model's score of prompt + completion (+ EOS when the completion ended with
    one, as reward_model.py trains it; a completion cut at the length limit is scored as the unfinished text it is),
    re-tokenised with the reward model's own tokenizer."""

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str], completion_has_eos: list[bool] | None = None, **unused_fields) -> list[float]:
        ended = completion_has_eos or [True] * len(completions)
        ids = [
            common.tokenize_prompt(tokenizer, prompt, chat_template)
            + tokenizer(completion, add_special_tokens=False)["input_ids"]
            + ([tokenizer.eos_token_id] if eos else [])
            for prompt, completion, eos in zip(prompts, completions, ended)
        ]
        scores = []
        for start in range(0, len(ids), batch_size):
            inputs = tokenizer.pad({"input_ids": ids[start : start + batch_size]}, return_tensors="pt").to(reward_model.device)
            scores += common.reward_model_scores(reward_model, inputs["input_ids"], inputs["attention_mask"]).tolist()
        return scores

    return score


# ----------------------------------------------------------------------------- the math of GRPO
def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4) for the G = group_size consecutive completions of a prompt.

    scale_rewards: `group` divides by the group's std, `batch` by the std of all rewards in the batch,
    `none` only centres (Dr. GRPO: the std division up-weights prompts that are almost always or never solved).
    A group whose rewards are all equal carries no signal: its advantages are exactly 0 (never NaN).
    """
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none; got {scale_rewards!r}")
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, 0.0, centred).view(-1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1, >= 0, = 0 iff logp == ref.

    Written as expm1(d) - d with d = ref - logp: the same value, without the rounding that turns small d into 0.
    """
    difference = ref_logprobs - logprobs
    return torch.expm1(difference) - difference


def grpo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    ref_logprobs=None,
    beta=0.0,
    epsilon_low=0.2,
    epsilon_high=0.2,
    loss_type="grpo",
    max_completion_length: int | None = None,
    num_completions: int | None = None,
    num_tokens=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of completions o_i (rows) with advantages A_i, and its metrics.

    Per token:  l_it = min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_k3(pi_theta || pi_ref)_it,
    rho_it = pi_theta(o_it) / pi_old(o_it) = exp(logp - old_logp). The loss is minus an average of l_it:

    - grpo:    -(1/G) sum_i (1/|o_i|) sum_t l_it (the seeds): each completion weighs the same whatever its
               length, so a token of a long completion weighs less. Long wrong answers are penalised less
               than short ones, which biases towards long wrong answers.
    - dr_grpo: -sum_{i,t} l_it / (G * max_completion_length) (Dr. GRPO): a constant normaliser, no length bias.
    - dapo:    -sum_{i,t} l_it / sum_i |o_i| (DAPO): every token weighs the same; the weight depends on the
               batch's total length, not on each completion's own length.

    Masked-out tokens (padding, after EOS) never count. With gradient accumulation pass the whole batch's
    `num_completions` and `num_tokens`, so the micro-batch losses sum to the batch loss.
    """
    num_completions = num_completions or logprobs.size(0)
    num_tokens = num_tokens or mask.sum().clamp(min=1)
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages.unsqueeze(1)
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages)
    per_token_loss = -surrogate
    metrics = {}
    if beta != 0.0:
        kl = kl_k3(logprobs, ref_logprobs)
        per_token_loss = per_token_loss + beta * kl
        metrics["losses/kl"] = common.masked_mean(kl.detach(), mask)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_completions
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (num_completions * (max_completion_length or mask.size(1)))
    elif loss_type == "dapo":
        loss = (per_token_loss * mask).sum() / num_tokens
    else:
        raise ValueError(f"loss_type must be grpo, dr_grpo or dapo; got {loss_type!r}")
    # seed 002's mask M: the gradient stops where the ratio already moved past the clip in the advantage's direction
    metrics["clip/low"] = common.masked_mean(((advantages < 0) & (ratio < 1 - epsilon_low)).float(), mask)
    metrics["clip/high"] = common.masked_mean(((advantages > 0) & (ratio > 1 + epsilon_high)).float(), mask)
    return loss, metrics


def group_prompt_cache(model, prompt_ids, prompt_mask, group_size: int):
    """The key/value cache of each left-padded prompt but its last token, computed once per prompt and copied to
    the G = group_size rows of its group (vLLM calls this prefix caching). None when there is nothing to share
    (one-token prompts) or the model's cache cannot be copied row by row; gradients flow through the copies."""
    if prompt_ids.size(1) < 2:
        return None
    cache = model(
        input_ids=prompt_ids[:, :-1],
        attention_mask=prompt_mask[:, :-1],
        position_ids=common.position_ids_from_mask(prompt_mask[:, :-1]),
        use_cache=True,
        logits_to_keep=1,
    ).past_key_values
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(group_size)
    return cache


@torch.no_grad()
def generate_groups(model, prompts: dict, group_size: int, **generate_kwargs) -> torch.Tensor:
    """Sample G = group_size completions of each left-padded prompt: (prompts x G) rows of prompt + completion ids,
    the G rows of a prompt consecutive, exactly what `model.generate` returns on G copies of each prompt.

    The G completions of a prompt share it, so its cache is computed once (group_prompt_cache) and `generate` runs
    only the prompt's last token on the G copies. The prefill costs 1/G as much; the samples are the same (tested).
    """
    repeated = {key: value.repeat_interleave(group_size, dim=0) for key, value in prompts.items()}
    cache = group_prompt_cache(model, prompts["input_ids"], prompts["attention_mask"], group_size)
    return model.generate(**repeated, past_key_values=cache, **generate_kwargs)


def completion_logprobs(model, input_ids, attention_mask, prompt_length: int, temperature: float, group_size: int = 1):
    """log pi(o_t | q, o_<t) of every completion token at the sampling temperature, and the logits that predict them.

    group_size > 1: the rows are groups of G consecutive completions of one prompt (as generate_groups returns
    them), so, as in generation, each prompt runs once (group_prompt_cache) and the gradients of its G copies add
    up in that one pass: the same log-probs and gradients as a pass over every row (tested), for 1/G of the prompt.
    """
    completion_length = input_ids.size(1) - prompt_length
    position_ids = common.position_ids_from_mask(attention_mask)
    group_prompts = slice(None, None, group_size), slice(None, prompt_length)  # the first row of each group, its prompt
    cache = group_prompt_cache(model, input_ids[group_prompts], attention_mask[group_prompts], group_size) if group_size > 1 else None
    if cache is not None:  # the prompt's last token runs with the completion: its logits predict o_1
        rest = slice(prompt_length - 1, None)
        logits = model(
            input_ids=input_ids[:, rest],
            attention_mask=attention_mask,
            position_ids=position_ids[:, rest],
            past_key_values=cache,
            use_cache=True,
        ).logits[:, :-1]
    else:  # every row whole; only the positions that predict completion tokens get logits
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=completion_length + 1
        ).logits[:, :-1]
    return common.token_logprobs(logits, input_ids[:, prompt_length:], temperature), logits


@torch.no_grad()
def frozen_logprobs(policy, input_ids, attention_mask, prompt_length: int, temperature: float, micro_batch_size: int, group_size: int):
    """completion_logprobs without gradients, micro-batch by micro-batch: pi_ref, and pi_old when mu > 1."""
    chunks = [slice(i, i + micro_batch_size) for i in range(0, input_ids.size(0), micro_batch_size)]
    return torch.cat(
        [completion_logprobs(policy, input_ids[c], attention_mask[c], prompt_length, temperature, group_size)[0] for c in chunks]
    )


def policy_update(model, optimizer, scheduler, reference, rollout: dict, args: Args) -> dict[str, float]:
    """Steps 3 and 4 of a GRPO iteration: mu = --num-iterations optimizer steps on one rollout; returns the metrics.

    `rollout` holds this process's completions: input_ids, attention_mask (prompt + completion), mask (the
    completion tokens in the loss), advantages (computed over the whole batch) and prompt_length. Under torchrun
    every normaliser is the whole batch's, so the processes' gradients add up to the gradient of the batch loss.
    """
    num_tokens = common.all_reduce_sum(rollout["mask"].sum()).clamp(min=1)
    # The rows that enter the update. With beta = 0 a completion whose advantage is 0 adds exactly nothing to the loss
    # or its gradient, so a group whose rewards are all equal (all its advantages 0) is left out of every
    # forward/backward pass. The normalisers (the batch size and num_tokens given to grpo_loss) still count it, so
    # the loss is unchanged; often most groups are constant. Whole groups are kept or left out, so a micro-batch of
    # whole groups runs each prompt once (completion_logprobs). Reference and old log-probs are computed once per
    # rollout, on these rows; with mu = 1 the old policy is the current one (rho = 1) and needs no pass of its own.
    advantages = rollout["advantages"]
    keep_group = advantages.view(-1, args.group_size).ne(0).any(dim=1) | (args.beta != 0.0)  # with beta, KL moves every row
    update_rows = keep_group.repeat_interleave(args.group_size).nonzero().squeeze(1)
    input_ids, attention_mask = rollout["input_ids"][update_rows], rollout["attention_mask"][update_rows]
    mask, advantages = rollout["mask"][update_rows], advantages[update_rows]
    micro_batches = [slice(i, i + args.micro_batch_size) for i in range(0, len(update_rows), args.micro_batch_size)]
    # one prompt pass per group when micro-batches hold whole groups; not under gradient checkpointing, which keeps no cache
    rows_per_prompt = args.group_size if args.micro_batch_size % args.group_size == 0 and not args.gradient_checkpointing else 1
    frozen = (input_ids, attention_mask, rollout["prompt_length"], args.temperature, args.micro_batch_size, rows_per_prompt)
    ref_logprobs = None
    if args.beta != 0.0:  # pi_ref: the frozen copy, or with LoRA the same model with its adapters switched off
        with model.disable_adapter() if args.lora_r else contextlib.nullcontext():
            ref_logprobs = frozen_logprobs(model if reference is None else reference, *frozen)
    old_logprobs = frozen_logprobs(model, *frozen) if args.num_iterations > 1 and micro_batches else None

    # metrics, summed here and over processes: the batch loss (the micro-batch losses add up to it), and the others
    # averaged over every micro-batch of every process
    averaged = ["losses/entropy", "clip/low", "clip/high"] + (["losses/kl"] if args.beta != 0.0 else [])
    sums = {name: torch.zeros((), device=advantages.device) for name in ["losses/policy_loss", *averaged, "micro_batches"]}
    model.train()
    for _ in range(args.num_iterations):
        optimizer.zero_grad(set_to_none=False)  # zeros, not None: a step with no updated rows still applies Adam's momentum
        for mb in micro_batches:
            logprobs, logits = completion_logprobs(
                model, input_ids[mb], attention_mask[mb], rollout["prompt_length"], args.temperature, rows_per_prompt
            )
            old = logprobs.detach() if old_logprobs is None else old_logprobs[mb]
            ref = None if ref_logprobs is None else ref_logprobs[mb]
            loss, metrics = grpo_loss(
                logprobs,
                old,
                advantages[mb],
                mask[mb],
                ref,
                args.beta,
                args.epsilon,
                args.epsilon_high,
                args.loss_type,
                args.max_completion_length,
                args.batch_size,
                num_tokens,
            )
            loss.backward()
            with torch.no_grad():  # entropy of the completions in the update
                metrics["losses/entropy"] = common.masked_mean(common.entropy_from_logits(logits, args.temperature), mask[mb])
            metrics |= {"losses/policy_loss": loss.detach(), "micro_batches": torch.ones((), device=loss.device)}
            for name in sums:
                sums[name] += metrics[name].float()
        common.all_reduce_gradients(model)  # sum over processes: the gradient of the whole batch's loss
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
    sums = dict(zip(sums, common.all_reduce_sum(torch.stack(list(sums.values()))).tolist()))  # one collective for all
    # entropy, clip fractions and KL describe the rows in the update; when no process had any (every group constant,
    # beta = 0) they are not reported rather than reported as 0
    averages = {name: sums[name] / sums["micro_batches"] for name in averaged} if sums["micro_batches"] > 0 else {}
    return {"losses/policy_loss": sums["losses/policy_loss"] / args.num_iterations, **averages, "losses/grad_norm": grad_norm.item()}


# ----------------------------------------------------------------------------- training
def load_rows(args: Args) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of {"prompt", "answer"}."""
    if args.dataset == "arithmetic":
        num_prompts = args.total_steps * args.batch_size // args.group_size
        train = common.arithmetic_problems(num_prompts, args.digits, "train", seed=args.seed)
        return train, common.arithmetic_eval_set(args.eval_size, args.digits)
    if args.dataset.endswith(".jsonl"):
        rows = common.read_jsonl(args.dataset, ("prompt", "answer"))
    else:
        rows = common.load_hf_dataset(args.dataset, args.hf_split, {"prompt": args.prompt_field, "answer": args.answer_field})
    held_out = min(args.eval_size, len(rows) // 10)
    return rows[held_out:], rows[:held_out]


def load_reference_model(args: Args, dtype: torch.dtype, autocast_dtype, device: torch.device):
    """The frozen reference policy pi_ref (a second copy of --model), needed only when beta != 0."""
    reference = common.load_model(args.model, AutoModelForCausalLM, args.trust_remote_code, dtype, autocast_dtype).to(device).eval()
    return reference.requires_grad_(False)


def validate(args: Args) -> None:
    """Reject inconsistent flags before anything is loaded."""
    if args.batch_size < 1 or args.micro_batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} and --micro-batch-size {args.micro_batch_size} must be >= 1")
    if args.group_size < 2 or args.batch_size % args.group_size:
        raise ValueError(f"--group-size {args.group_size} must be >= 2 and divide --batch-size {args.batch_size}")
    if args.batch_size % args.micro_batch_size:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size} must divide --batch-size {args.batch_size}")
    if args.temperature <= 0 or args.num_iterations < 1 or args.total_steps < 1:
        raise ValueError("--temperature must be > 0, --num-iterations and --total-steps >= 1")
    if args.lora_r < 0:
        raise ValueError(f"--lora-r must be >= 0 (0: no LoRA); got {args.lora_r}")
    unknown = [name for name in args.reward_funcs if name not in REWARD_FUNCTIONS]
    if unknown:
        raise ValueError(f"--reward-funcs: unknown {unknown}; choose from {list(REWARD_FUNCTIONS)}")
    num_rewards = len(args.reward_funcs) + (args.reward_model is not None)
    if num_rewards == 0 or (args.reward_weights is not None and len(args.reward_weights) != num_rewards):
        raise ValueError(f"{num_rewards} reward functions (--reward-funcs, --reward-model) but --reward-weights {args.reward_weights}")


def main(args: Args) -> None:
    if args.reward_funcs is None:
        args.reward_funcs = ("arithmetic",) if args.dataset == "arithmetic" else ("math",)
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    args.max_completion_length = args.max_completion_length or (args.digits + 2 if args.dataset == "arithmetic" else 256)
    validate(args)
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    num_prompts = args.batch_size // args.group_size  # per rollout, over all processes
    if num_prompts % world_size:
        raise ValueError(f"--batch-size / --group-size = {num_prompts} prompts must divide by the number of processes, {world_size}")
    run_name = common.run_name_for(args)
    writer = common.setup_logging(args, run_name)
    common.seed_everything(args.seed)
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)

    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    model = common.load_model(args.model, AutoModelForCausalLM, args.trust_remote_code, dtype, autocast_dtype).to(device)
    reference = load_reference_model(args, dtype, autocast_dtype, device) if args.beta != 0.0 and not args.lora_r else None
    if args.lora_r:
        model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    common.broadcast_parameters(model)
    common.seed_everything(args.seed + rank)  # each process samples different completions
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters ({trainable:,} trained) on {device} in {dtype}, autocast {autocast_dtype}"
    )
    reward_names, reward_functions = list(args.reward_funcs), [REWARD_FUNCTIONS[name] for name in args.reward_funcs]
    if args.reward_model is not None:
        reward_model = common.load_model(
            args.reward_model, AutoModelForSequenceClassification, args.trust_remote_code, dtype, autocast_dtype
        )
        reward_model.to(device).eval().requires_grad_(False)
        reward_tokenizer = common.load_tokenizer(args.reward_model, args.trust_remote_code)
        reward_names.append("reward_model")
        reward_functions.append(reward_model_reward(reward_model, reward_tokenizer, args.chat_template, args.micro_batch_size))
    reward_weights = torch.tensor(args.reward_weights or [1.0] * len(reward_functions), device=device)
    eval_reward = common.arithmetic_reward if args.dataset == "arithmetic" else math_answer_reward

    train_rows, eval_rows = load_rows(args)
    total_updates = args.total_steps * args.num_iterations
    # fused=True: one kernel updates every parameter tensor (the same AdamW step without a Python loop over tensors; HF Trainer's default)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=0.0, fused=True)
    scheduler = common.linear_schedule(optimizer, args.warmup_steps, total_updates)  # warm-up, then linear decay to 0
    generator = torch.Generator().manual_seed(args.seed)  # the same on every process: they agree on each batch's prompts
    order: list[int] = []

    def evaluate(step: int) -> None:
        if not eval_rows:
            return
        accuracy, completions = common.evaluate_accuracy(
            model, tokenizer, eval_rows, args.max_completion_length, chat_template=args.chat_template, reward_fn=eval_reward
        )
        writer.add_scalar("charts/eval_accuracy", accuracy, step)
        samples = "  ".join(f"{row['prompt']!r} -> {text!r}" for row, text in zip(eval_rows[:3], completions))
        print(f"step {step:5d}  eval_accuracy {accuracy:.3f}  samples: {samples}", flush=True)

    evaluate(0)
    start_time = time.time()
    for step in range(1, args.total_steps + 1):
        # 1. rollout: G completions of each prompt from the current (= old) policy, left-padded prompts. Each process
        # takes its share of the batch's prompts (all G completions of a prompt stay in one process).
        if len(order) < num_prompts:
            order += torch.randperm(len(train_rows), generator=generator).tolist()
        rows, order = [train_rows[i] for i in common.shard(order[:num_prompts], rank, world_size)], order[num_prompts:]
        prompt_ids = [common.tokenize_prompt(tokenizer, row["prompt"], args.chat_template) for row in rows]
        prompts = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt", padding_side="left").to(device)
        prompt_length = prompts["input_ids"].size(1)
        model.eval()  # generation keeps its KV cache (gradient checkpointing turns it off in train mode)
        input_ids = generate_groups(
            model,
            prompts,
            args.group_size,
            do_sample=True,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=args.max_completion_length,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        rows = [row for row in rows for _ in range(args.group_size)]  # the G copies of a prompt are consecutive
        completion_ids = input_ids[:, prompt_length:]
        mask, has_eos = common.completion_mask(completion_ids, tokenizer.eos_token_id)
        attention_mask = torch.cat([prompts["attention_mask"].repeat_interleave(args.group_size, dim=0), mask], dim=1)
        completions = common.decode_completions(tokenizer, completion_ids, mask)

        # 2. rewards r_i = sum_k w_k r_k(q, o_i), then group-relative advantages (over the whole batch, every process's
        # rewards, so that --scale-rewards batch uses the batch std; each process keeps the advantages of its rows)
        fields = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        prompt_texts = [row["prompt"] for row in rows]
        fields["completion_has_eos"] = has_eos.tolist()  # False: cut at --max-completion-length
        local_rewards = torch.tensor([fn(prompt_texts, completions, **fields) for fn in reward_functions], device=device).T
        rewards_per_function = common.all_gather(local_rewards)
        rewards = rewards_per_function @ reward_weights
        advantages = common.shard(group_advantages(rewards, args.group_size, args.scale_rewards), rank, world_size)
        # truncated completions still count in the group baseline; with --mask-truncated-completions not in the loss
        loss_mask = mask * has_eos.unsqueeze(1) if args.mask_truncated_completions else mask

        # 3-4. mu optimizer steps on this rollout
        rollout = {"input_ids": input_ids, "attention_mask": attention_mask, "mask": loss_mask, "advantages": advantages}
        learning_rate = scheduler.get_last_lr()[0]  # the rate of this rollout's first step; each scheduler.step() moves it on
        sums = policy_update(model, optimizer, scheduler, reference, {**rollout, "prompt_length": prompt_length}, args)

        # 5. logging (DESIGN.md section 6), over the whole batch
        grouped_rewards = rewards.view(-1, args.group_size)
        constant_groups = (grouped_rewards == grouped_rewards[:, :1]).all(dim=1)  # the groups group_advantages zeroes
        lengths, has_eos = common.all_gather(mask.sum(1).float()), common.all_gather(has_eos.float())
        scalars = {
            **sums,
            "charts/reward": rewards.mean().item(),
            "charts/reward_std": grouped_rewards.std(dim=1).mean().item(),
            "charts/frac_reward_zero_std": constant_groups.float().mean().item(),
            "charts/completion_length": lengths.mean().item(),
            "charts/truncated_fraction": 1.0 - has_eos.mean().item(),
            "charts/learning_rate": learning_rate,
            "charts/SPS": step / (time.time() - start_time),
        }
        for name, column in zip(reward_names, rewards_per_function.T):
            scalars[f"rewards/{name}/mean"], scalars[f"rewards/{name}/std"] = column.mean().item(), column.std().item()
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
        if step % args.eval_every == 0 or step == args.total_steps:
            samples = "  ".join(
                f"{p!r} -> {c!r} ({r:.2f})"
                for p, c, r in zip(prompt_texts[:: args.group_size][:2], completions[:: args.group_size], rewards[:: args.group_size])
            )
            writer.add_text("samples", samples, step)
            print(
                f"step {step:5d}  reward {scalars['charts/reward']:.3f}  "
                + (f"kl {sums['losses/kl']:.4f}  " if "losses/kl" in sums else "")  # measured only when beta != 0
                + f"SPS {scalars['charts/SPS']:.2f}  samples: {samples}"
            )
            evaluate(step)

    common.save_checkpoint(model, tokenizer, args.output_dir)
    print(f"saved {args.output_dir} after {time.time() - start_time:.0f}s")
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
    common.finish_distributed()  # under torchrun: every process leaves the group together
