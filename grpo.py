# Group Relative Policy Optimization (GRPO): a clipped policy gradient whose baseline is the mean reward of a group
# of completions of the same prompt; no critic. See docs/grpo.md.
import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import common
import tasks


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
    """`auto` (mixed on a GPU with bf16, else float32), `mixed` (fp32 weights, bf16 autocast), float32, bfloat16"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project_name: str = "rlhf-reference"
    """the W&B project, when --track"""
    wandb_entity: str | None = None
    """the W&B entity (team), when --track"""

    # run: output, checkpoints, resume
    output_dir: str = "checkpoints/grpo"
    """where the final Hugging Face checkpoint (model + tokenizer) and the checkpoint-N folders go"""
    overwrite_output_dir: bool = False
    """write into --output-dir even if it holds files these scripts did not write (nothing of them is deleted)"""
    save_every: int = 500
    """save a checkpoint-N folder for --resume every this many steps (0: only on SIGINT/SIGTERM)"""
    keep_checkpoints: int = 2
    """checkpoint-N folders kept (the newest)"""
    resume: str | None = None
    """a checkpoint-N folder to continue from, or `auto`: the newest under --output-dir (a fresh start if none)"""

    # model, data and rewards
    model: str = "checkpoints/sft"
    """the policy to start from (and the reference model): a Hugging Face model id or a local checkpoint folder"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    dataset: str = tasks.ARITHMETIC
    """`arithmetic` (built-in addition task), a prompt/answer .jsonl file, or a Hugging Face dataset id"""
    eval_dataset: str | None = None
    """a prompt/answer .jsonl file of held-out problems; default the held-out rows of --dataset"""
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
    """rule-based rewards: `arithmetic` (exact match, default on arithmetic), `math` (final answer, else), `format`"""
    reward_model: str | None = None
    """a sequence-classification checkpoint (what reward_model.py writes) used as one more reward function"""
    reward_weights: tuple[float, ...] | None = None
    """one weight per reward function (the rule-based ones, then the reward model); default all 1"""
    eval_every: int = 100
    """evaluate held-out greedy accuracy every this many steps (and before the first and after the last)"""
    eval_size: int = 500
    """held-out examples to evaluate on"""

    # GRPO
    total_steps: int = 3000
    """rollouts; each is followed by --num-iterations optimizer steps"""
    batch_size: int = 128
    """completions per rollout over all processes: (number of prompts) x --group-size"""
    group_size: int = 8
    """G, completions sampled per prompt; their mean reward is the baseline"""
    max_completion_length: int | None = None
    """tokens generated per completion; default digits + 2 on arithmetic, else 256, at most half the positions"""
    temperature: float = 1.0
    """sampling temperature; every log-prob is computed at the same temperature"""
    learning_rate: float = 6e-5
    """peak learning rate of AdamW; small on purpose (docs/grpo.md, "Why the learning rate is small")"""
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

    # memory savers
    micro_batch_size: int = 128
    """completions per forward/backward pass (and per no-grad log-prob pass); gradients accumulate over the batch"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them: less memory, more compute"""
    lora_r: int = 0
    """rank of LoRA adapters (needs peft; the reference is then the model with adapters off); 0 trains every weight"""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A to each target weight"""
    lora_target_modules: str = "all-linear"
    """comma-separated module names that get adapters, or `all-linear`"""


# ============================================================================= the math of GRPO
def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4) over the G = group_size consecutive completions of a prompt;
    `batch` divides by the batch's std, `none` only centres (Dr. GRPO). A group of equal rewards gets A = 0 exactly."""
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
    """k3 estimator of KL(pi_theta || pi_ref) per token: exp(d) - d - 1, d = ref - logp; >= 0, and 0 iff d = 0.
    Written expm1(d) - d, which keeps a small d that exp(d) - d - 1 rounds to 0."""
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
    """The GRPO loss of completions o_i (rows) with advantages A_i, and its metrics. Per token

        l_it = min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_k3(pi_theta || pi_ref)_it,
        rho_it = pi_theta(o_it) / pi_old(o_it) = exp(logp - old_logp), and the loss is minus an average of l_it:
        grpo     -(1/G) sum_i (1/|o_i|) sum_t l_it           (DeepSeekMath: each completion weighs the same)
        dr_grpo  -sum_{i,t} l_it / (G max_completion_length)  (Dr. GRPO: a constant, no length bias)
        dapo     -sum_{i,t} l_it / sum_i |o_i|                (DAPO: each token of the batch weighs the same)

    Masked-out tokens never count. A micro-batch given the whole batch's `num_completions` and `num_tokens` gets its
    share of the batch loss: the micro-batch losses add up to it.
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
    # the clip stops the gradient where the ratio has already moved past it in the advantage's direction
    metrics["clip/low"] = common.masked_mean(((advantages < 0) & (ratio < 1 - epsilon_low)).float(), mask)
    metrics["clip/high"] = common.masked_mean(((advantages > 0) & (ratio > 1 + epsilon_high)).float(), mask)
    return loss, metrics


# ============================================================================= rollout
def rollout(model, tokenizer, rows: list[dict], args: Args) -> dict:
    """Step 1: G = --group-size completions o_1..o_G of each prompt q from the current (= old) policy, the G rows of
    a prompt consecutive. mask: the completion tokens up to and including the first EOS; has_eos: not cut."""
    prompt_ids = {"input_ids": [row["prompt_ids"] for row in rows]}
    prompts = tokenizer.pad(prompt_ids, return_tensors="pt", padding_side="left").to(model.device)
    model.eval()  # generation keeps its KV cache (gradient checkpointing turns it off in train mode)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
    special_tokens = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    # what model.generate samples on G copies of each prompt (each prompt's cache computed once: a speed-up, below)
    input_ids = generate_groups(
        model, prompts, args.group_size, max_new_tokens=args.max_completion_length, **sampling, **special_tokens
    )
    prompt_length = prompts["input_ids"].size(1)
    completion_ids = input_ids[:, prompt_length:]
    mask, has_eos = common.completion_mask(completion_ids, tokenizer.eos_token_id)
    attention_mask = torch.cat([prompts["attention_mask"].repeat_interleave(args.group_size, dim=0), mask], dim=1)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, prompt_length=prompt_length, mask=mask)
    return batch | dict(has_eos=has_eos, completions=common.decode_completions(tokenizer, completion_ids, mask))


def completion_logprobs(model, input_ids, attention_mask, prompt_length: int, temperature: float, group_size: int = 1):
    """log pi(o_t | q, o_<t) of every completion token at the sampling temperature, and the logits that predict them,
    positions from the mask. group_size > 1: groups of G rows share a prompt, run once (a speed-up, below)."""
    position_ids = common.position_ids_from_mask(attention_mask)
    logits = None
    if group_size > 1:
        logits = shared_prompt_logits(model, input_ids, attention_mask, position_ids, prompt_length, group_size)
    if logits is None:  # every row whole; only the positions that predict completion tokens get logits
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        logits = model(**inputs, logits_to_keep=input_ids.size(1) - prompt_length + 1).logits[:, :-1]
    return common.token_logprobs(logits, input_ids[:, prompt_length:], temperature), logits


# ============================================================================= update
def policy_update(model, optimizer, scheduler, reference, rollout: dict, args: Args) -> dict[str, float]:
    """Steps 3 and 4: mu = --num-iterations optimizer steps minimising grpo_loss on one rollout; returns the metrics.
    `rollout`: this process's input_ids, attention_mask, mask (the tokens in the loss), advantages and prompt_length.
    Every normaliser is the whole batch's, so the processes' gradients add up to the gradient of the batch loss."""
    num_tokens = common.all_reduce_sum(rollout["mask"].sum()).clamp(min=1)
    rows, rows_per_prompt = rows_in_update(rollout, args)  # a speed-up (below): leaves out rows that add nothing
    input_ids, attention_mask = rollout["input_ids"][rows], rollout["attention_mask"][rows]
    mask, advantages = rollout["mask"][rows], rollout["advantages"][rows]
    micro_batches = [slice(i, i + args.micro_batch_size) for i in range(0, len(rows), args.micro_batch_size)]

    def logprobs_of(policy, mb: slice):
        return completion_logprobs(
            policy, input_ids[mb], attention_mask[mb], rollout["prompt_length"], args.temperature, rows_per_prompt
        )

    with torch.no_grad():
        ref_logprobs = old_logprobs = None
        if args.beta != 0.0:  # pi_ref: the frozen copy, or with LoRA the same model with its adapters switched off
            with model.disable_adapter() if args.lora_r else contextlib.nullcontext():
                policy = model if reference is None else reference
                ref_logprobs = torch.cat([logprobs_of(policy, mb)[0] for mb in micro_batches])
        if args.num_iterations > 1 and micro_batches:  # pi_old, fixed for the mu steps (mu = 1: rho = 1 exactly)
            old_logprobs = torch.cat([logprobs_of(model, mb)[0] for mb in micro_batches])
    model.train()
    micro_batch_metrics = []
    for _ in range(args.num_iterations):
        optimizer.zero_grad(set_to_none=False)  # zeros, not None: a step with no rows still applies Adam's momentum
        for mb in micro_batches:
            logprobs, logits = logprobs_of(model, mb)
            loss, metrics = grpo_loss(
                logprobs=logprobs,
                old_logprobs=logprobs.detach() if old_logprobs is None else old_logprobs[mb],
                advantages=advantages[mb],
                mask=mask[mb],
                ref_logprobs=None if ref_logprobs is None else ref_logprobs[mb],
                beta=args.beta,
                epsilon_low=args.epsilon,
                epsilon_high=args.epsilon_high,
                loss_type=args.loss_type,
                max_completion_length=args.max_completion_length,
                num_completions=args.batch_size,  # the whole batch's normalisers: the micro-batch losses add up
                num_tokens=num_tokens,
            )
            loss.backward()
            entropy = common.masked_mean(common.entropy_from_logits(logits.detach(), args.temperature), mask[mb])
            micro_batch_metrics.append(metrics | {"losses/policy_loss": loss.detach(), "losses/entropy": entropy})
        common.all_reduce_gradients(model)  # sum over processes: the gradient of the whole batch's loss
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
    return update_metrics(micro_batch_metrics, grad_norm, args)


# ============================================================================= speed-ups a learner may skip
# Each prompt runs once per group, and groups with no signal are skipped. They change no number: the same samples,
# log-probs, losses and gradients as the plain computation (the tests compare the two).
def group_prompt_cache(model, prompt_ids, prompt_mask, group_size: int):
    """The cache of each prompt but its last token, computed once and copied to its G rows; None if it cannot be."""
    if prompt_ids.size(1) < 2:
        return None
    ids, mask = prompt_ids[:, :-1], prompt_mask[:, :-1]
    positions = common.position_ids_from_mask(mask)
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    if not hasattr(output.past_key_values, "batch_repeat_interleave"):
        return None
    output.past_key_values.batch_repeat_interleave(group_size)
    return output.past_key_values


@torch.no_grad()
def generate_groups(model, prompts: dict, group_size: int, **generate_kwargs) -> torch.Tensor:
    """What `model.generate` samples on G = group_size consecutive copies of each prompt, each prompt run once."""
    repeated = {key: value.repeat_interleave(group_size, dim=0) for key, value in prompts.items()}
    cache = group_prompt_cache(model, prompts["input_ids"], prompts["attention_mask"], group_size)
    return model.generate(**repeated, past_key_values=cache, **generate_kwargs)


def shared_prompt_logits(model, input_ids, attention_mask, position_ids, prompt_length: int, group_size: int):
    """completion_logprobs' logits, each group's prompt run once (its G copies' gradients add up); None if it can't."""
    group_prompts = slice(None, None, group_size), slice(None, prompt_length)  # each group's first row, its prompt
    cache = group_prompt_cache(model, input_ids[group_prompts], attention_mask[group_prompts], group_size)
    if cache is None:
        return None
    rest = slice(prompt_length - 1, None)  # the prompt's last token runs with the completion: its logits predict o_1
    inputs = dict(input_ids=input_ids[:, rest], attention_mask=attention_mask, position_ids=position_ids[:, rest])
    return model(**inputs, past_key_values=cache, use_cache=True).logits[:, :-1]


def rows_in_update(rollout: dict, args: Args) -> tuple[torch.Tensor, int]:
    """(the rows that enter the update, the rows that share a prompt pass). With beta = 0 a group of equal rewards
    (every A_i = 0) adds exactly nothing to the loss or its gradient, so it is left out; the normalisers still count
    it. Whole groups stay, so micro-batches of whole groups run each prompt once."""
    keep_group = rollout["advantages"].view(-1, args.group_size).ne(0).any(dim=1) | (args.beta != 0.0)
    rows = keep_group.repeat_interleave(args.group_size).nonzero().squeeze(1)
    shared = args.micro_batch_size % args.group_size == 0 and not args.gradient_checkpointing  # which keeps no cache
    return rows, args.group_size if shared else 1


# ============================================================================= plumbing a learner may skip
# checking the flags, loading the models and the prompts, metrics and logging
def validate(args: Args) -> None:
    """Every flag checked before anything is loaded, each with one clear message; fills in two defaults."""
    if args.reward_funcs is None:
        args.reward_funcs = ("arithmetic",) if args.dataset == tasks.ARITHMETIC else ("math",)
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    minimum = dict(batch_size=1, micro_batch_size=1, total_steps=1, num_iterations=1, eval_every=1, keep_checkpoints=1)
    minimum |= dict(max_completion_length=1, save_every=0, eval_size=0, warmup_steps=0, lora_r=0, beta=0, digits=1)
    common.check_minimums(args, **minimum)
    if args.group_size < 2 or args.batch_size % args.group_size:
        raise ValueError(f"--group-size {args.group_size} must be >= 2 and divide --batch-size {args.batch_size}")
    if args.batch_size % args.micro_batch_size:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size} must divide --batch-size {args.batch_size}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature {args.temperature} must be > 0")
    if set(args.reward_funcs) - set(tasks.REWARD_FUNCTIONS):
        raise ValueError(f"--reward-funcs {args.reward_funcs}: unknown; choose from {list(tasks.REWARD_FUNCTIONS)}")
    num_rewards = len(args.reward_funcs) + (args.reward_model is not None)
    if num_rewards == 0 or len(args.reward_weights or [1] * num_rewards) != num_rewards:
        raise ValueError(f"--reward-weights {args.reward_weights}: give one per reward function ({num_rewards})")


def load_reference_model(args: Args, dtype: torch.dtype, autocast_dtype, device: torch.device):
    """The frozen reference policy pi_ref (a second copy of --model), needed only when beta != 0."""
    reference = common.load_model(args.model, AutoModelForCausalLM, args.trust_remote_code, dtype, autocast_dtype)
    return reference.to(device).eval().requires_grad_(False)


def load_policy(args: Args, dtype: torch.dtype, autocast_dtype, device: torch.device):
    """(tokenizer, policy, reference); the reference is None with beta = 0 and with LoRA (the adapters off)."""
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    model = common.load_model(args.model, AutoModelForCausalLM, args.trust_remote_code, dtype, autocast_dtype)
    model, reference = model.to(device), None
    if args.beta != 0.0 and not args.lora_r:
        reference = load_reference_model(args, dtype, autocast_dtype, device)
    if args.lora_r:
        model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    common.broadcast_parameters(model)
    trained, total = (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()),
    )
    print(f"{args.model}: {total:,} parameters ({trained:,} trained) on {device} in {dtype}, autocast {autocast_dtype}")
    return tokenizer, model, reference


def reward_model_reward(reward_model, tokenizer, chat_template: bool, batch_size: int):
    """The reward model as a reward function: its score of prompt + completion (+ EOS if the completion has one)."""

    def reward(prompts, completions, completion_has_eos=None, **unused_fields) -> list[float]:
        has_eos = completion_has_eos or [True] * len(completions)
        scores = common.score_completions(
            reward_model, tokenizer, prompts, completions, has_eos, chat_template, batch_size
        )
        return scores.tolist()

    return reward


def load_rewards(args: Args, dtype: torch.dtype, autocast_dtype, device: torch.device) -> tuple[list[str], list]:
    """(names, functions) of the rewards r_k: the rule-based ones of tasks.py, then the reward model when given."""
    names, functions = list(args.reward_funcs), [tasks.REWARD_FUNCTIONS[name] for name in args.reward_funcs]
    if args.reward_model is not None:
        options = dict(trained_head="score", dtype=dtype, autocast_dtype=autocast_dtype)
        scorer = common.load_model(
            args.reward_model, AutoModelForSequenceClassification, args.trust_remote_code, **options
        )
        if scorer.config.num_labels != 1:
            raise ValueError(f"--reward-model {args.reward_model!r} has {scorer.config.num_labels} labels, not 1")
        scorer.to(device).eval().requires_grad_(False)
        tokenizer = common.load_tokenizer(args.reward_model, args.trust_remote_code)
        names.append("reward_model")
        functions.append(reward_model_reward(scorer, tokenizer, args.chat_template, args.micro_batch_size))
    return names, functions


def load_prompts(args: Args, tokenizer, positions: int, num_prompts: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) with "prompt_ids", those that fit with --max-completion-length (set here)."""
    if args.max_completion_length is None:
        default = args.digits + 2 if args.dataset == tasks.ARITHMETIC else 256
        args.max_completion_length = min(default, positions // 2)
    length = args.max_completion_length
    room = positions - length  # prompt tokens that fit before a completion
    if room < 1:
        raise ValueError(f"--max-completion-length {length} fills the model's {positions} positions")
    sizes = dict(num_rows=args.total_steps * num_prompts, digits=args.digits, seed=args.seed, held_out=args.eval_size)
    columns = {"prompt": args.prompt_field, "answer": args.answer_field}
    train, held_out = tasks.load_rows(args.dataset, "prompts", **sizes, hf_split=args.hf_split, columns=columns)
    train = common.fit_prompts(tokenizer, train, args.chat_template, room, what="training prompts")
    if len(train) < num_prompts:
        needs = f"one step needs {num_prompts} (--batch-size {args.batch_size} / --group-size {args.group_size})"
        raise ValueError(f"{args.dataset} has {len(train)} training prompts, {needs}")
    eval_rows = tasks.eval_problems(args.dataset, args.eval_dataset, args.digits, args.eval_size) or held_out
    return train, common.fit_prompts(tokenizer, eval_rows, args.chat_template, room, what="held-out prompts")


def update_metrics(micro_batch_metrics: list[dict], grad_norm: torch.Tensor, args: Args) -> dict[str, float]:
    """Over every process: the batch loss per step, the other metrics' means over micro-batches (none: not logged)."""
    names = ["losses/policy_loss", "losses/entropy", "clip/low", "clip/high"] + ["losses/kl"] * (args.beta != 0.0)
    totals = torch.zeros(len(names) + 1, device=grad_norm.device)  # the last one counts the micro-batches
    for metrics in micro_batch_metrics:
        totals += torch.stack([metrics[name].float() for name in names] + [torch.ones_like(totals[0])])
    *sums, count = common.all_reduce_sum(totals).tolist()  # one collective for all
    averages = {name: total / count for name, total in zip(names[1:], sums[1:])} if count else {}
    return {"losses/policy_loss": sums[0] / args.num_iterations, **averages, "losses/grad_norm": grad_norm.item()}


def log_step(writer, step: int, args: Args, rows, batch: dict, rewards_per_function, rewards, reward_names, metrics):
    """The step's metrics over the whole batch (every process's rows), and a line every --eval-every steps."""
    grouped = rewards.view(-1, args.group_size)
    lengths, has_eos = common.all_gather(batch["mask"].sum(1).float()), common.all_gather(batch["has_eos"].float())
    metrics["charts/reward"], metrics["charts/reward_std"] = rewards.mean().item(), grouped.std(dim=1).mean().item()
    metrics["charts/frac_reward_zero_std"] = (grouped == grouped[:, :1]).all(dim=1).float().mean().item()  # A = 0
    metrics["charts/completion_length"] = lengths.mean().item()
    metrics["charts/truncated_fraction"] = 1.0 - has_eos.mean().item()
    for name, column in zip(reward_names, rewards_per_function.T):
        metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = column.mean().item(), column.std().item()
    for name, value in metrics.items():
        writer.add_scalar(name, value, step)
    if step % args.eval_every == 0 or step == args.total_steps:
        firsts = zip(rows[:: args.group_size][:2], batch["completions"][:: args.group_size], grouped[:, 0])
        samples = "  ".join(f"{row['prompt']!r} -> {text!r} ({reward:.2f})" for row, text, reward in firsts)
        writer.add_text("samples", samples, step)
        kl = f"kl {metrics['losses/kl']:.4f}  " if "losses/kl" in metrics else ""  # measured only when beta != 0
        line = f"step {step:5d}  reward {metrics['charts/reward']:.3f}  {kl}SPS {metrics['charts/SPS']:.2f}"
        print(f"{line}  samples: {samples}", flush=True)


def evaluate(model, tokenizer, eval_rows: list[dict], args: Args, writer, step: int) -> None:
    """Held-out greedy accuracy: exact match on arithmetic, the final answer otherwise."""
    options = dict(chat_template=args.chat_template, reward_fn=tasks.eval_reward(args.dataset))
    accuracy, completions = common.evaluate_accuracy(model, tokenizer, eval_rows, args.max_completion_length, **options)
    writer.add_scalar("charts/eval_accuracy", accuracy, step)
    samples = "  ".join(f"{row['prompt']!r} -> {text!r}" for row, text in zip(eval_rows[:3], completions))
    print(f"step {step:5d}  eval_accuracy {accuracy:.3f}  samples: {samples}", flush=True)


# ============================================================================= main
def main(args: Args) -> None:
    validate(args)
    common.check_output_dir(args.output_dir, args.overwrite_output_dir)
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    num_prompts = args.batch_size // args.group_size  # per rollout, over all processes
    if num_prompts % world_size:
        raise ValueError(
            f"--batch-size / --group-size = {num_prompts} prompts must divide by the number of processes, {world_size}"
        )
    common.seed_everything(args.seed)
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)
    tokenizer, model, reference = load_policy(args, dtype, autocast_dtype, device)
    common.seed_everything(args.seed + rank)  # each process samples different completions
    reward_names, reward_functions = load_rewards(args, dtype, autocast_dtype, device)
    reward_weights = torch.tensor(args.reward_weights or [1.0] * len(reward_functions), device=device)
    train_rows, eval_rows = load_prompts(args, tokenizer, common.max_positions(model), num_prompts)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=0.0, fused=True)
    scheduler = common.linear_schedule(optimizer, args.warmup_steps, args.total_steps * args.num_iterations)
    generator = torch.Generator().manual_seed(args.seed)  # the same on every process: they agree on each batch
    order, start_step = [], 0
    checkpoint = common.find_checkpoint(args.resume, args.output_dir)
    if checkpoint is not None:
        start_step, data = common.load_checkpoint(checkpoint, {"policy": model}, optimizer, scheduler, args)
        order = data["order"]
        generator.set_state(data["generator"])
    writer = common.setup_logging(args, common.run_name_for(args))
    if start_step == 0 and eval_rows:
        evaluate(model, tokenizer, eval_rows, args, writer, 0)

    start_time = time.time()
    with common.stop_on_signal() as stop:
        for step in range(start_step + 1, args.total_steps + 1):
            # 1. rollout: G completions of each prompt; each process takes its share of the batch's prompts
            if len(order) < num_prompts:
                order += torch.randperm(len(train_rows), generator=generator).tolist()
            rows = [train_rows[i] for i in common.shard(order[:num_prompts], rank, world_size)]
            order = order[num_prompts:]
            batch = rollout(model, tokenizer, rows, args)
            rows = [row for row in rows for _ in range(args.group_size)]  # the G copies of a prompt are consecutive

            # 2. rewards r_i = sum_k w_k r_k(q, o_i), and advantages over the whole batch (every process's rows)
            fields = tasks.row_fields(rows) | {"completion_has_eos": batch["has_eos"].tolist()}
            prompts, completions = [row["prompt"] for row in rows], batch["completions"]
            scores = [fn(prompts, completions, **fields) for fn in reward_functions]  # one list per reward function
            rewards_per_function = common.all_gather(torch.tensor(scores, device=device).T)  # (completions, functions)
            rewards = rewards_per_function @ reward_weights
            advantages = common.shard(group_advantages(rewards, args.group_size, args.scale_rewards), rank, world_size)
            # a cut completion counts in its group's baseline; with --mask-truncated-completions not in the loss
            loss_mask = (
                batch["mask"] * batch["has_eos"].unsqueeze(1) if args.mask_truncated_completions else batch["mask"]
            )

            # 3-4. mu optimizer steps on this rollout
            learning_rate = scheduler.get_last_lr()[0]  # the rate of this rollout's first step
            update = batch | {"mask": loss_mask, "advantages": advantages}
            metrics = policy_update(model, optimizer, scheduler, reference, update, args)

            # 5. logging, evaluation, checkpoints
            metrics["charts/learning_rate"] = learning_rate
            metrics["charts/SPS"] = (step - start_step) / (time.time() - start_time)
            log_step(writer, step, args, rows, batch, rewards_per_function, rewards, reward_names, metrics)
            if eval_rows and (step % args.eval_every == 0 or step == args.total_steps):
                evaluate(model, tokenizer, eval_rows, args, writer, step)
            if common.checkpoint_due(stop, step, args.save_every):
                data = {"order": order, "generator": generator.get_state()}
                common.save_checkpoint(args, step, {"policy": model}, optimizer, scheduler, data)
                if stop.name:
                    raise SystemExit(f"stopped by {stop.name} after step {step}; continue with --resume auto")
    common.save_model(model, tokenizer, args.output_dir, args)
    print(f"saved {args.output_dir} after {time.time() - start_time:.0f}s")
    writer.close()


if __name__ == "__main__":
    common.run(main, Args)
