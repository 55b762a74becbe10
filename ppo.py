# RLHF PPO: a policy, a value model (critic), a frozen reference and a frozen reward model; per-token KL-shaped
# reward, GAE, clipped surrogate and clipped value loss (InstructGPT-style). README.md, section "PPO".
import contextlib
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
    exp_name: str = "ppo"
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
    output_dir: str = "checkpoints/ppo"
    """where the final Hugging Face checkpoint of the policy (model + tokenizer) is written"""

    # models and data
    model: str = "checkpoints/sft"
    """the starting policy (also the frozen reference): a Hugging Face model id or a local checkpoint folder"""
    reward_model: str = "checkpoints/reward_model"
    """the frozen reward model: an AutoModelForSequenceClassification checkpoint with num_labels=1 (what reward_model.py writes)"""
    reward_fn: Literal["reward_model", "arithmetic"] = "reward_model"
    """`reward_model` scores with --reward-model; `arithmetic` uses the verifiable exact-match reward instead (needs answers)"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    dataset: str = "arithmetic"
    """`arithmetic` (built-in addition task), a prompt(/answer) .jsonl file, or a Hugging Face dataset id"""
    digits: int = 2
    """operand digits of the arithmetic task"""
    hf_split: str = "train"
    """split of a Hugging Face dataset"""
    prompt_field: str = "prompt"
    """prompt column of a Hugging Face dataset"""
    answer_field: str = "answer"
    """answer column of a Hugging Face dataset (read only with --reward-fn arithmetic)"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (when it has one)"""
    max_new_tokens: int | None = None
    """completion tokens sampled per prompt; default digits + 2 on arithmetic, 64 otherwise"""
    eval_every: int = 20
    """evaluate held-out greedy accuracy every this many steps (arithmetic only; also before the first and after the last)"""
    eval_size: int = 500
    """held-out problems to evaluate on"""

    # PPO
    total_steps: int = 200
    """PPO iterations; each samples --batch-size completions and updates on them"""
    batch_size: int = 64
    """prompts (one completion each) per rollout, over all processes"""
    num_ppo_epochs: int = 4
    """passes over each rollout"""
    num_minibatches: int = 4
    """minibatches per pass, reshuffled every epoch; must divide --batch-size (per process under torchrun)"""
    micro_batch_size: int | None = None
    """rows per forward/backward pass: a minibatch's gradient is accumulated over micro-batches of this size, and the
    rollout's no-grad passes (old, reference and reward scores, values) run in chunks of it. Default: a whole minibatch
    in the update, the whole rollout in its passes"""
    gradient_checkpointing: bool = False
    """recompute the policy's and the value model's activations in the backward pass: less memory, more compute"""
    lora_r: int = 0
    """rank of LoRA adapters (needs peft) on the policy and the value model; 0 trains every weight. With LoRA the
    reference is the policy with its adapters off (no second copy) and the value head is trained whole"""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A to each target weight"""
    lora_target_modules: str = "all-linear"
    """comma-separated module names that get adapters, or `all-linear`"""
    learning_rate: float = 2e-5
    """AdamW learning rate of the policy, decayed linearly to 0; small, because Adam turns the noise of a sampled policy
    gradient into full-size steps (README.md, "Why the learning rates are small")"""
    value_learning_rate: float = 1e-3
    """AdamW learning rate of the value model, decayed linearly to 0 (the critic must track a moving target quickly)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm of policy + value model"""
    temperature: float = 0.7
    """sampling temperature; every log-prob (old, reference, new) is taken at the same temperature"""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty in the reward (the starting value with --target-kl)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL: k1 = logp - ref_logp (unbiased), k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased and >= 0)"""
    target_kl: float | None = None
    """turn on the adaptive KL controller: kl_coef is adapted so the sequence KL approaches this target"""
    kl_horizon: int = 10000
    """horizon (in samples) of the adaptive KL controller"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    clip_range: float = 0.2
    """epsilon of the clipped surrogate: rho is clipped to [1 - eps, 1 + eps]"""
    clip_range_value: float = 0.2
    """c of the clipped value loss: V is clipped to [V_old - c, V_old + c]"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (scaled to unit variance, mean kept) before GAE"""
    missing_eos_penalty: float | None = 1.0
    """subtracted from the score of a completion without EOS (cut at --max-new-tokens); None turns it off"""


# ----------------------------------------------------------------------------- the math
def kl_penalized_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float, kl_estimator: str = "k1"
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * KL_t + [t = T] * score: the KL penalty on every completion token, the score on the last one (T).

    KL_t = logp_t - ref_logp_t (k1), or exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1 (k3).
    T, the last real completion token of each row, comes from the mask. Returns (rewards, KL), both 0 outside the mask.
    """
    log_ratio = logprobs - ref_logprobs
    if kl_estimator == "k1":
        kl = log_ratio
    elif kl_estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"kl_estimator must be k1 or k3, got {kl_estimator!r}")
    kl = kl * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, common.last_token_index(mask)] += scores
    return rewards, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the completion tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = sum_l (gamma * lam)^l * delta_{t+l}   (computed backwards: A_t = delta_t + gamma * lam * A_{t+1})
    R_t     = A_t + V_t                             (the value-function target)

    `mask` marks each row's real tokens, which come first (padding after the completion). Rewards and values are
    zeroed outside it, so the value after the last token is 0 (the episode ends there) and padding adds nothing.
    Returns (advantages, returns), both 0 outside the mask.
    """
    rewards, values = rewards * mask, values * mask
    length = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, advantages + values


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict]:
    """L_clip = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)),  rho_t = exp(logp_t - old_logp_t).

    The mean is over the masked completion tokens of the minibatch. The gradient is 0 exactly where the clipped
    term is the larger one: A > 0 and rho > 1 + eps, or A < 0 and rho < 1 - eps (clipfrac counts those tokens).
    Returns (loss, metrics): clipfrac, approx_kl = mean 0.5 * (logp - old_logp)^2, ratio mean and variance.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = common.masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": common.masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": common.masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": common.masked_mean(ratio, mask),
            "ratio_var": common.masked_var(ratio, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_V = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2), over the masked tokens.

    Returns (loss, value clipfrac: the fraction of tokens where the clipped square is the larger one).
    """
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * common.masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    return loss, common.masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()


def adaptive_kl_coef(kl_coef: float, kl: float, target_kl: float, horizon: int, num_samples: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019): e = clip(KL / KL_target - 1, -0.2, 0.2), beta <- beta * (1 + e * n / horizon).

    KL is the mean sequence KL of the rollout and n its number of samples: beta grows when KL is above target.
    """
    error = min(max(kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * num_samples / horizon)


def completion_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Logits that predict each completion token: position t predicts token t + 1, so positions P - 1 ... L - 2."""
    position_ids = common.position_ids_from_mask(attention_mask)
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
    return logits[:, prompt_length - 1 : -1]


def completion_values(value_model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """V(s_t) for each completion token: the value model's scalar `score` head on every hidden state.

    The state before completion token t is the sequence up to position P + t - 1, hence positions P - 1 ... L - 2.
    """
    position_ids = common.position_ids_from_mask(attention_mask)
    hidden = value_model.base_model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return value_model.score(hidden[:, prompt_length - 1 : -1]).squeeze(-1).float()


def load_value_model(name_or_path: str, trust_remote_code: bool, dtype: torch.dtype, autocast_dtype=None):
    """The critic: a separate network with a scalar `score` head read at every token, the head set to 0 so V = 0 at first.

    Loaded as an AutoModelForSequenceClassification (num_labels=1) from a reward model or from a causal LM backbone.
    """
    value_model = common.load_model(
        name_or_path, AutoModelForSequenceClassification, trust_remote_code, dtype, autocast_dtype, num_labels=1
    )
    torch.nn.init.zeros_(value_model.score.weight)
    if getattr(value_model.score, "bias", None) is not None:
        torch.nn.init.zeros_(value_model.score.bias)
    return value_model


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 is a perfect critic, 0 no better than a constant."""
    variance = common.masked_var(returns, mask)
    return (1.0 - common.masked_var(returns - values, mask) / variance).item() if variance > 0 else float("nan")


# ----------------------------------------------------------------------------- data and reward
def load_rows(args: Args) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of {"prompt"} (plus "answer" on arithmetic and with --reward-fn arithmetic)."""
    if args.dataset == "arithmetic":
        return common.arithmetic_problems(
            args.total_steps * args.batch_size, args.digits, "train", seed=args.seed
        ), common.arithmetic_eval_set(args.eval_size, args.digits)
    fields = ("prompt", "answer") if args.reward_fn == "arithmetic" else ("prompt",)
    if args.dataset.endswith(".jsonl"):
        return common.read_jsonl(args.dataset, fields), []
    columns = {"prompt": args.prompt_field, "answer": args.answer_field}
    return common.load_hf_dataset(args.dataset, args.hf_split, {field: columns[field] for field in fields}), []


def reward_model_inputs(
    args: Args, reward_tokenizer, prompts: list[str], completions: list[str], has_eos: torch.Tensor, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-tokenise prompt + completion with the reward model's tokenizer when it differs from the policy's.

    Built as reward_model.py builds its training pairs: prompt and completion tokenised separately, EOS after a
    completion that ended with one. Left padded; the score is read at the last real token.
    """
    ids = [
        common.tokenize_prompt(reward_tokenizer, prompt, args.chat_template)
        + reward_tokenizer(completion, add_special_tokens=False)["input_ids"]
        + ([reward_tokenizer.eos_token_id] if eos else [])
        for prompt, completion, eos in zip(prompts, completions, has_eos.tolist())
    ]
    batch = reward_tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="left").to(device)
    return batch["input_ids"], batch["attention_mask"]


# ----------------------------------------------------------------------------- training
def main(args: Args):
    if args.batch_size % args.num_minibatches != 0:
        raise ValueError(f"--num-minibatches {args.num_minibatches} must divide --batch-size {args.batch_size}")
    if args.target_kl is not None and args.target_kl <= 0:
        raise ValueError(f"--target-kl must be positive, got {args.target_kl}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be positive (PPO samples), got {args.temperature}")
    if args.lora_r < 0 or (args.micro_batch_size is not None and args.micro_batch_size < 1):
        raise ValueError(f"--lora-r must be >= 0 (got {args.lora_r}), --micro-batch-size >= 1 (got {args.micro_batch_size})")
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    if args.batch_size % (world_size * args.num_minibatches):
        raise ValueError(f"--batch-size {args.batch_size} must divide by {world_size} processes x --num-minibatches {args.num_minibatches}")
    local_batch_size = args.batch_size // world_size
    run_name = common.run_name_for(args)
    writer = common.setup_logging(args, run_name)
    common.seed_everything(args.seed)
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)

    # the four models: policy (trained), reference (frozen), reward model (frozen), value model (trained). Dropout is off in all.
    # With LoRA the reference is the policy with its adapters switched off, so it needs no copy of its own.
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    policy = common.load_model(args.model, AutoModelForCausalLM, args.trust_remote_code, dtype, autocast_dtype).to(device)
    ref_policy = None
    if args.lora_r:
        policy = common.apply_lora(policy, args.lora_r, args.lora_alpha, args.lora_target_modules)
    else:
        ref_policy = common.load_model(args.model, AutoModelForCausalLM, args.trust_remote_code, dtype, autocast_dtype)
        ref_policy = ref_policy.to(device).requires_grad_(False)
    reward_model = reward_tokenizer = None
    if args.reward_fn == "reward_model":
        reward_model = common.load_model(
            args.reward_model, AutoModelForSequenceClassification, args.trust_remote_code, dtype, autocast_dtype
        )
        reward_model.to(device).requires_grad_(False)
        reward_tokenizer = common.load_tokenizer(args.reward_model, args.trust_remote_code)
        same_tokenizer = reward_tokenizer.get_vocab() == tokenizer.get_vocab()
    # the critic starts from the reward model when there is one (it already reads "how good is this text"), else from
    # the policy. It reads the policy's token ids, so a reward model with another tokenizer cannot be its start.
    value_source = args.reward_model if reward_model is not None and same_tokenizer else args.model
    value_model = load_value_model(value_source, args.trust_remote_code, dtype, autocast_dtype).to(device)
    if args.lora_r:  # adapters added in place; the value model is not saved, so its peft wrapper is not needed
        common.apply_lora(value_model, args.lora_r, args.lora_alpha, args.lora_target_modules, "SEQ_CLS")
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(policy)
        common.enable_gradient_checkpointing(value_model)
    common.broadcast_parameters(policy)
    common.broadcast_parameters(value_model)  # every process starts from rank 0's weights
    common.seed_everything(args.seed + rank)  # each process samples different completions
    policy_parameters = [p for p in policy.parameters() if p.requires_grad]
    value_parameters = [p for p in value_model.parameters() if p.requires_grad]
    print(
        f"policy {args.model}: {sum(p.numel() for p in policy.parameters()):,} parameters ({sum(p.numel() for p in policy_parameters):,} trained);"
        f" value model from {value_source}; on {device} in {dtype}, autocast {autocast_dtype}"
    )

    train_rows, eval_rows = load_rows(args)
    for row in train_rows:
        row["prompt_ids"] = common.tokenize_prompt(tokenizer, row["prompt"], args.chat_template)
    max_new_tokens = args.max_new_tokens or (args.digits + 2 if args.dataset == "arithmetic" else 64)

    parameters = policy_parameters + value_parameters
    # fused=True: one kernel updates every parameter tensor (the same AdamW step without a Python loop over tensors; HF Trainer's default)
    optimizer = torch.optim.AdamW(
        [{"params": policy_parameters, "lr": args.learning_rate}, {"params": value_parameters, "lr": args.value_learning_rate}],
        eps=1e-5,
        weight_decay=0.0,
        fused=True,
    )
    scheduler = common.linear_schedule(optimizer, 0, args.total_steps)  # linear decay to 0, no warm-up
    generator = torch.Generator().manual_seed(args.seed)  # the same on every process: they agree on each batch's prompts
    order = torch.randperm(len(train_rows), generator=generator).tolist()
    minibatch_size = local_batch_size // args.num_minibatches
    rollout_rows = args.micro_batch_size or local_batch_size  # rows per no-grad pass of the rollout
    rollout_chunks = [slice(i, i + rollout_rows) for i in range(0, local_batch_size, rollout_rows)]
    kl_coef = args.kl_coef

    def evaluate(step: int) -> None:
        accuracy, completions = common.evaluate_accuracy(policy, tokenizer, eval_rows, max_new_tokens, chat_template=args.chat_template)
        writer.add_scalar("charts/eval_accuracy", accuracy, step)
        samples = "  ".join(f"{row['prompt']}{text!r}" for row, text in zip(eval_rows[:3], completions))
        print(f"step {step:4d}  eval_accuracy {accuracy:.3f}  greedy samples: {samples}", flush=True)

    if eval_rows:
        evaluate(0)
    start_time = time.time()
    for step in range(1, args.total_steps + 1):
        if len(order) < args.batch_size:  # reshuffle after each pass over the prompts
            order += torch.randperm(len(train_rows), generator=generator).tolist()
        batch_rows = [train_rows[i] for i in common.shard(order[: args.batch_size], rank, world_size)]  # this process's share
        order = order[args.batch_size :]
        prompts = [row["prompt"] for row in batch_rows]

        # 1. rollout: sample one completion per left-padded prompt from the current (= old) policy, at full support
        policy.eval()  # generation keeps its KV cache (gradient checkpointing turns it off in train mode)
        with torch.no_grad():
            prompt_batch = tokenizer.pad({"input_ids": [row["prompt_ids"] for row in batch_rows]}, return_tensors="pt", padding_side="left")
            prompt_batch = prompt_batch.to(device)
            sequences = policy.generate(
                **prompt_batch,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=args.temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            prompt_length = prompt_batch["input_ids"].size(1)
            completion_ids = sequences[:, prompt_length:]
            mask, has_eos = common.completion_mask(completion_ids, tokenizer.eos_token_id)  # up to and including the first EOS
            attention_mask = torch.cat([prompt_batch["attention_mask"], mask], dim=1)

            # 2. old log-probs, reference log-probs and old values, all teacher-forced with position ids from the mask,
            # chunk by chunk of rows (--micro-batch-size)
            old_logprobs, entropies, ref_logprobs, old_values = [], [], [], []
            for rows in rollout_chunks:
                logits = completion_logits(policy, sequences[rows], attention_mask[rows], prompt_length)
                old_logprobs.append(common.token_logprobs(logits, completion_ids[rows], args.temperature))
                entropies.append(common.entropy_from_logits(logits, args.temperature))
                with policy.disable_adapter() if args.lora_r else contextlib.nullcontext():
                    logits = completion_logits(policy if args.lora_r else ref_policy, sequences[rows], attention_mask[rows], prompt_length)
                ref_logprobs.append(common.token_logprobs(logits, completion_ids[rows], args.temperature))
                old_values.append(completion_values(value_model, sequences[rows], attention_mask[rows], prompt_length))
                del logits
            old_logprobs, ref_logprobs, old_values = torch.cat(old_logprobs), torch.cat(ref_logprobs), torch.cat(old_values)
            entropy = common.masked_mean(torch.cat(entropies), mask)

            # 3. the sequence score: the frozen reward model at the last real token, or the verifiable reward
            completions = common.decode_completions(tokenizer, completion_ids, mask)
            if args.reward_fn == "reward_model":
                if same_tokenizer:
                    reward_inputs = sequences, attention_mask
                else:
                    reward_inputs = reward_model_inputs(args, reward_tokenizer, prompts, completions, has_eos, device)
                scores = torch.cat([common.reward_model_scores(reward_model, *(t[rows] for t in reward_inputs)) for rows in rollout_chunks])
            else:
                answers = [row["answer"] for row in batch_rows]
                scores = torch.tensor(common.arithmetic_reward(prompts, completions, answers), device=device)
            if args.missing_eos_penalty is not None:
                scores = scores - args.missing_eos_penalty * (~has_eos).float()

            # 4. per-token KL-shaped reward, GAE, whitened advantages (mean and std of the whole batch, every process's)
            rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef, args.kl_estimator)
            if args.whiten_rewards:
                rewards = common.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = compute_gae(rewards, old_values, mask, args.gamma, args.lam)
            advantages = common.masked_whiten(advantages, mask)

        # 5. PPO update: epochs x shuffled minibatches of the rollout. Under torchrun each process updates on minibatches
        # of its own rows and the gradients are averaged over processes, as DistributedDataParallel does. A minibatch runs
        # in micro-batches whose losses are weighted by their share of its tokens, so the gradients add up to its loss's.
        policy.train()
        value_model.train()
        update_metrics = []
        learning_rate = scheduler.get_last_lr()[0]  # the policy's rate in this update; scheduler.step() moves to the next one's
        for _ in range(args.num_ppo_epochs):
            for indices in torch.randperm(local_batch_size, device=device).split(minibatch_size):
                optimizer.zero_grad(set_to_none=True)
                minibatch_tokens = mask[indices].sum()
                new_logprobs, new_values = [], []
                for rows in indices.split(args.micro_batch_size or minibatch_size):
                    logits = completion_logits(policy, sequences[rows], attention_mask[rows], prompt_length)
                    logprobs = common.token_logprobs(logits, completion_ids[rows], args.temperature)
                    values = completion_values(value_model, sequences[rows], attention_mask[rows], prompt_length)
                    policy_loss, _ = ppo_policy_loss(logprobs, old_logprobs[rows], advantages[rows], mask[rows], args.clip_range)
                    value_loss, _ = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], args.clip_range_value)
                    share = mask[rows].sum() / minibatch_tokens  # masked means over the rows -> over the minibatch's tokens
                    # summed over processes below: the mean of their minibatch losses
                    ((policy_loss + args.vf_coef * value_loss) * share / world_size).backward()
                    new_logprobs.append(logprobs.detach())
                    new_values.append(values.detach())
                with torch.no_grad():  # the minibatch's losses and metrics, at the log-probs and values of this gradient
                    policy_loss, metrics = ppo_policy_loss(
                        torch.cat(new_logprobs), old_logprobs[indices], advantages[indices], mask[indices], args.clip_range
                    )
                    value_loss, value_clipfrac = ppo_value_loss(
                        torch.cat(new_values), old_values[indices], returns[indices], mask[indices], args.clip_range_value
                    )
                common.all_reduce_gradients(policy)
                common.all_reduce_gradients(value_model)
                torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
                optimizer.step()
                update_metrics.append({**metrics, "policy_loss": policy_loss, "value_loss": value_loss, "value_clipfrac": value_clipfrac})
        scheduler.step()

        # 6. logging: sequence-level KL and reward of the whole rollout, means of the update metrics over processes
        all_scores, sequence_kls = common.all_gather(scores), common.all_gather(kl.sum(1))
        sequence_kl = sequence_kls.mean().item()
        non_score_reward = -kl_coef * sequence_kl
        per_process = {key: torch.stack([m[key] for m in update_metrics]).mean() for key in update_metrics[0]}
        per_process |= {
            "entropy": entropy,
            "explained_variance": torch.tensor(explained_variance(old_values, returns, mask), device=device),
        }
        per_process |= {"eos_fraction": has_eos.float().mean(), "completion_length": mask.sum(1).float().mean()}
        mean = {key: common.all_reduce_sum(value.float()).item() / world_size for key, value in per_process.items()}
        scalars = {
            "objective/scores": all_scores.mean().item(),
            "objective/kl": sequence_kl,
            "objective/non_score_reward": non_score_reward,
            "objective/rlhf_reward": all_scores.mean().item() + non_score_reward,
            "objective/entropy": mean["entropy"],
            "objective/kl_coef": kl_coef,
            "losses/policy_loss": mean["policy_loss"],
            "losses/value_loss": mean["value_loss"],
            "losses/approx_kl": mean["approx_kl"],
            "losses/clipfrac": mean["clipfrac"],
            "losses/value_clipfrac": mean["value_clipfrac"],
            "losses/explained_variance": mean["explained_variance"],
            "policy/ratio_mean": mean["ratio_mean"],
            "policy/ratio_var": mean["ratio_var"],
            "charts/eos_fraction": mean["eos_fraction"],
            "charts/completion_length": mean["completion_length"],
            "charts/learning_rate": learning_rate,
            "charts/SPS": step / (time.time() - start_time),
        }
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        if args.target_kl is not None:
            kl_coef = adaptive_kl_coef(kl_coef, sequence_kl, args.target_kl, args.kl_horizon, args.batch_size)

        if step % args.eval_every == 0 or step == args.total_steps:
            samples = "  ".join(
                f"{prompt}{text!r} ({score:+.2f})" for prompt, text, score in zip(prompts[:3], completions, scores.tolist())
            )
            writer.add_text("samples", samples, step)
            print(
                f"step {step:4d}  score {scalars['objective/scores']:+.3f}  kl {sequence_kl:.4f}  entropy {mean['entropy']:.3f}  "
                f"value_loss {mean['value_loss']:.4f}  clipfrac {mean['clipfrac']:.3f}  SPS {scalars['charts/SPS']:.2f}  samples: {samples}",
                flush=True,
            )
            if eval_rows:
                evaluate(step)

    common.save_checkpoint(policy, tokenizer, args.output_dir)
    print(f"saved {args.output_dir} after {time.time() - start_time:.0f}s")
    writer.close()
    return policy, value_model


if __name__ == "__main__":
    main(tyro.cli(Args))
    common.finish_distributed()  # under torchrun: every process leaves the group together
