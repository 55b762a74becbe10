# RLHF PPO: a policy, a value model (critic), a frozen reference and a reward (a frozen reward model or a rule);
# per-token KL-shaped reward, GAE, clipped surrogate and clipped value loss, InstructGPT-style. See docs/ppo.md.
import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import common
import tasks


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
    """`auto` (mixed on a bf16 GPU, else float32), `mixed` (fp32 weights, bf16 autocast), float32, bfloat16, float16"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project_name: str = "rlhf-reference"
    """the W&B project, when --track"""
    wandb_entity: str | None = None
    """the W&B entity (team), when --track"""

    # run: output, checkpoints, resume
    output_dir: str = "checkpoints/ppo"
    """where the final Hugging Face checkpoint (model + tokenizer) and the checkpoint-N folders go"""
    overwrite_output_dir: bool = False
    """write into --output-dir even if it holds files these scripts did not write (nothing of them is deleted)"""
    save_every: int = 50
    """save a checkpoint-N folder for --resume every this many steps (0: only on SIGINT/SIGTERM)"""
    keep_checkpoints: int = 2
    """checkpoint-N folders kept (the newest)"""
    resume: str | None = None
    """a checkpoint-N folder to continue from, or `auto`: the newest under --output-dir (a fresh start when none)"""

    # models and data
    model: str = "checkpoints/sft"
    """the starting policy (also the frozen reference): a Hugging Face model id or a local checkpoint folder"""
    reward_model: str = "checkpoints/reward_model"
    """the frozen reward model (with --reward-fn reward_model): a sequence classifier with num_labels=1"""
    reward_fn: str = "reward_model"
    """`reward_model`, or a rule-based reward of tasks.py instead: `arithmetic` (exact match), `math`, `format`"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    dataset: str = tasks.ARITHMETIC
    """`arithmetic` (built-in addition task), a prompt(/answer) .jsonl file, or a Hugging Face dataset id"""
    eval_dataset: str | None = None
    """a prompt/answer .jsonl file of held-out problems (default: arithmetic's, else held-out rows of --dataset)"""
    digits: int = 2
    """operand digits of the arithmetic task"""
    hf_split: str = "train"
    """split of a Hugging Face dataset"""
    prompt_field: str = "prompt"
    """prompt column of a Hugging Face dataset"""
    answer_field: str = "answer"
    """answer column of a Hugging Face dataset (read with a rule-based --reward-fn)"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (when it has one)"""
    max_new_tokens: int | None = None
    """completion tokens sampled per prompt; default digits + 2 on arithmetic, else min(64, model positions / 2)"""
    eval_every: int = 50
    """evaluate held-out greedy accuracy every this many steps (also before the first and after the last)"""
    eval_size: int = 500
    """held-out problems to evaluate on"""

    # PPO
    total_steps: int = 500
    """PPO iterations; each samples --batch-size completions and updates on them"""
    batch_size: int = 64
    """prompts (one completion each) per rollout, over all processes"""
    num_ppo_epochs: int = 4
    """passes over each rollout"""
    num_minibatches: int = 4
    """minibatches per pass, reshuffled every epoch; must divide --batch-size (per process under torchrun)"""
    learning_rate: float = 4e-5
    """AdamW learning rate of the policy, decayed linearly to 0 (small on purpose: docs/ppo.md)"""
    value_learning_rate: float = 1e-3
    """AdamW learning rate of the value model, decayed linearly to 0 (the critic must track a moving target)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm of policy + value model"""
    temperature: float = 0.7
    """sampling temperature; every log-prob (old, reference, new) is taken at the same temperature"""
    kl_coef: float = 0.01
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

    # memory savers
    micro_batch_size: int | None = None
    """rows per forward/backward pass (gradients accumulated) and per no-grad pass of the rollout; default: all"""
    gradient_checkpointing: bool = False
    """recompute the policy's and the value model's activations in the backward pass: less memory, more compute"""
    lora_r: int = 0
    """rank of LoRA adapters (peft) on policy and value model, the reference being the policy without them; 0: off"""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A to each target weight"""
    lora_target_modules: str = "all-linear"
    """comma-separated module names that get adapters, or `all-linear`"""


# ============================================================================= the math of PPO
def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance of the masked entries: sum(mask * (x - mean)^2) / (sum(mask) - 1)."""
    mean = common.masked_mean(values, mask)
    return ((values - mean) ** 2 * mask).sum() / (mask.sum().clamp(min=2.0) - 1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and unbiased variance of the masked entries of the whole batch
    (every process's); shift_mean=False adds the mean back (rewards keep their sign). Masked-out entries are 0."""
    mask = mask.to(values.dtype)
    count = common.all_reduce_sum(mask.sum())
    mean = common.all_reduce_sum((values * mask).sum()) / count.clamp(min=1)
    var = common.all_reduce_sum(((values - mean) ** 2 * mask).sum()) / (count.clamp(min=2) - 1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float, kl_estimator: str = "k1"):
    """r_t = -beta * KL_t + [t = T] * score, T the last real token; KL_t = logp_t - ref_t (k1), or
    exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (k3). Returns (rewards, KL), both 0 outside the mask."""
    if kl_estimator not in ("k1", "k3"):
        raise ValueError(f"kl_estimator must be k1 or k3, got {kl_estimator!r}")
    log_ratio = logprobs - ref_logprobs
    kl = (log_ratio if kl_estimator == "k1" else torch.expm1(-log_ratio) + log_ratio) * mask
    rewards = -kl_coef * kl
    rewards[torch.arange(rewards.size(0), device=rewards.device), common.last_token_index(mask)] += scores
    return rewards, kl


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the completion tokens, (advantages A, returns R), 0 outside the mask:
    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = sum_l (gamma * lam)^l * delta_{t+l}   (backwards: A_t = delta_t + gamma * lam * A_{t+1})
    R_t     = A_t + V_t                             (the value target; V after the last real token is 0)"""
    rewards, values = rewards * mask, values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages, next_advantage = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_advantage = deltas[:, t] + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, advantages + values


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float) -> tuple[Tensor, dict]:
    """L_clip = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)), rho_t = exp(logp_t - old_logp_t),
    over the masked tokens. Returns (loss, metrics: clipfrac, approx_kl = mean 0.5 (logp - old_logp)^2, ratio)."""
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
            "ratio_var": masked_var(ratio, mask),
        }
    return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, clip_range_value: float) -> tuple[Tensor, Tensor]:
    """L_V = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2), over the masked tokens.
    Returns (loss, value clipfrac: the fraction of tokens where the clipped square is the larger one)."""
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * common.masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    return loss, common.masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()


def adaptive_kl_coef(kl_coef: float, kl: float, target_kl: float, horizon: int, num_samples: int) -> float:
    """Ziegler et al. (2019): e = clip(KL / KL_target - 1, -0.2, 0.2), beta <- beta * (1 + e * n / horizon)."""
    error = min(max(kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * num_samples / horizon)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 is a perfect critic, 0 no better than a constant."""
    variance = masked_var(returns, mask)
    return (1.0 - masked_var(returns - values, mask) / variance).item() if variance > 0 else float("nan")


# ============================================================================= rollout
def completion_logits(model, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """Logits that predict each completion token: position t predicts token t + 1, so positions P - 1 ... L - 2."""
    position_ids = common.position_ids_from_mask(attention_mask)
    inputs = dict(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids)
    return model(**inputs, logits_to_keep=sequences.size(1) - prompt_length + 1).logits[:, :-1]  # no prompt logits


def completion_values(value_model, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """V(s_t) for each completion token: the `score` head on the hidden state before it (as completion_logits)."""
    position_ids = common.position_ids_from_mask(attention_mask)
    body = value_model.base_model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids)
    return value_model.score(body.last_hidden_state[:, prompt_length - 1 : -1]).squeeze(-1).float()


@torch.no_grad()
def sample_rollout(policy, ref_policy, value_model, tokenizer, prompt_ids, max_new_tokens: int, args) -> dict:
    """One completion per prompt from the current (= old) policy's own distribution (top_k = 0, top_p = 1), and the
    teacher-forced old and reference log-probs, old values and entropy of its tokens (`mask`: up to the first EOS)."""
    policy.eval()  # generation keeps its KV cache (gradient checkpointing turns it off in train mode)
    prompts = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt", padding_side="left").to(policy.device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens)
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    sequences = policy.generate(**prompts, **sampling, **special)
    prompt_length = prompts["input_ids"].size(1)
    completion_ids = sequences[:, prompt_length:]
    mask, has_eos = common.completion_mask(completion_ids, tokenizer.eos_token_id)
    attention_mask = torch.cat([prompts["attention_mask"], mask], dim=1)
    old_logprobs, entropies, ref_logprobs, old_values = [], [], [], []
    for rows in torch.arange(len(prompt_ids)).split(args.micro_batch_size or len(prompt_ids)):
        inputs = sequences[rows], attention_mask[rows], prompt_length
        logits = completion_logits(policy, *inputs)
        old_logprobs.append(common.token_logprobs(logits, completion_ids[rows], args.temperature))
        entropies.append(common.entropy_from_logits(logits, args.temperature))
        with policy.disable_adapter() if args.lora_r else contextlib.nullcontext():  # LoRA: the reference is the base
            logits = completion_logits(policy if args.lora_r else ref_policy, *inputs)
        ref_logprobs.append(common.token_logprobs(logits, completion_ids[rows], args.temperature))
        old_values.append(completion_values(value_model, *inputs))
    rollout = dict(sequences=sequences, attention_mask=attention_mask, prompt_length=prompt_length, mask=mask)
    rollout |= dict(completion_ids=completion_ids, has_eos=has_eos, old_logprobs=torch.cat(old_logprobs))
    rollout |= dict(ref_logprobs=torch.cat(ref_logprobs), old_values=torch.cat(old_values))
    return rollout | dict(entropy=common.masked_mean(torch.cat(entropies), mask))  # the mean over completion tokens


@torch.no_grad()
def sequence_scores(rollout: dict, rows: list[dict], completions, reward_model, reward_tokenizer, args) -> Tensor:
    """The sequence score: --reward-fn (a reward model reads the last real token), less the missing-EOS penalty."""
    prompts, size = [row["prompt"] for row in rows], args.micro_batch_size or len(rows)
    if args.reward_fn != "reward_model":
        rewards = tasks.REWARD_FUNCTIONS[args.reward_fn](prompts, completions, **tasks.row_fields(rows))
        scores = torch.tensor(rewards, device=rollout["sequences"].device)
    elif reward_tokenizer is None:
        parts = [(rollout["sequences"][r], rollout["attention_mask"][r]) for r in torch.arange(len(rows)).split(size)]
        scores = torch.cat([common.reward_model_scores(reward_model, *part) for part in parts])
    else:
        ended, template = rollout["has_eos"].tolist(), args.chat_template
        scores = common.score_completions(reward_model, reward_tokenizer, prompts, completions, ended, template, size)
    if args.missing_eos_penalty is not None:
        scores = scores - args.missing_eos_penalty * (~rollout["has_eos"]).float()
    return scores


# ============================================================================= update
def ppo_update(policy, value_model, optimizer, rollout: dict, advantages: Tensor, returns: Tensor, args) -> dict:
    """--num-ppo-epochs passes over --num-minibatches shuffled minibatches, an optimizer step on L_clip + vf_coef * L_V
    each (its micro-batches weighted by their share of its tokens); returns the means of their losses and metrics."""

    def losses(rows, logprobs, values) -> tuple[Tensor, Tensor, dict]:
        mask = rollout["mask"][rows]
        policy_inputs = dict(old_logprobs=rollout["old_logprobs"][rows], advantages=advantages[rows], mask=mask)
        policy_loss, metrics = ppo_policy_loss(logprobs=logprobs, **policy_inputs, clip_range=args.clip_range)
        value_inputs = dict(old_values=rollout["old_values"][rows], returns=returns[rows], mask=mask)
        value_loss, clipfrac = ppo_value_loss(values=values, **value_inputs, clip_range_value=args.clip_range_value)
        return policy_loss, value_loss, metrics | {"value_clipfrac": clipfrac}

    policy.train()
    value_model.train()
    mask, minibatch_metrics = rollout["mask"], []
    minibatch_size = mask.size(0) // args.num_minibatches
    for _ in range(args.num_ppo_epochs):
        for indices in torch.randperm(mask.size(0), device=mask.device).split(minibatch_size):
            optimizer.zero_grad(set_to_none=True)
            new_logprobs, new_values = [], []
            for rows in indices.split(args.micro_batch_size or minibatch_size):
                inputs = rollout["sequences"][rows], rollout["attention_mask"][rows], rollout["prompt_length"]
                logits = completion_logits(policy, *inputs)
                logprobs = common.token_logprobs(logits, rollout["completion_ids"][rows], args.temperature)
                values = completion_values(value_model, *inputs)
                policy_loss, value_loss, _ = losses(rows, logprobs, values)
                share = mask[rows].sum() / mask[indices].sum()  # masked means over rows -> over the minibatch's tokens
                # under torchrun the processes' gradients are summed below: the mean of their minibatch losses
                ((policy_loss + args.vf_coef * value_loss) * share / common.world()[1]).backward()
                new_logprobs.append(logprobs.detach())
                new_values.append(values.detach())
            with torch.no_grad():  # the minibatch's losses and metrics, at the log-probs and values of this gradient
                policy_loss, value_loss, metrics = losses(indices, torch.cat(new_logprobs), torch.cat(new_values))
            common.all_reduce_gradients(policy)
            common.all_reduce_gradients(value_model)
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
            optimizer.step()
            minibatch_metrics.append(metrics | {"policy_loss": policy_loss, "value_loss": value_loss})
    return {key: torch.stack([metrics[key] for metrics in minibatch_metrics]).mean() for key in minibatch_metrics[0]}


# ----------------------------------------------------------------------------- plumbing a learner may skip: checking
# the flags, loading the prompts and the models, logging
def validate(args: Args) -> None:
    """Every flag checked before anything is loaded, each a one-line error naming it."""
    positive = ["batch_size", "num_minibatches", "num_ppo_epochs", "total_steps", "eval_every", "max_new_tokens"]
    positive += ["micro_batch_size", "kl_horizon", "keep_checkpoints", "digits"]
    common.check_minimums(args, **dict.fromkeys(positive, 1), save_every=0, eval_size=0, lora_r=0)
    if args.temperature <= 0:
        raise ValueError(f"--temperature {args.temperature} must be > 0 (PPO samples)")
    if args.target_kl is not None and args.target_kl <= 0:
        raise ValueError(f"--target-kl {args.target_kl} must be > 0")
    if args.reward_fn not in ["reward_model", *tasks.REWARD_FUNCTIONS]:
        raise ValueError(f"--reward-fn {args.reward_fn!r} is not reward_model or in {list(tasks.REWARD_FUNCTIONS)}")


def load_prompts(args: Args) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows); with a reward model a file needs only prompts (held out if all have answers)."""
    if args.reward_fn == "reward_model" and args.dataset != tasks.ARITHMETIC:
        if args.dataset.endswith(".jsonl"):
            rows = tasks.read_jsonl(args.dataset, ("prompt",))
        else:
            rows = tasks.load_hf_dataset(args.dataset, args.hf_split, {"prompt": args.prompt_field})
        if not all("answer" in row for row in rows):
            return rows, []
    size = dict(num_rows=args.total_steps * args.batch_size, held_out=args.eval_size, digits=args.digits)
    columns = {"prompt": args.prompt_field, "answer": args.answer_field}
    return tasks.load_rows(args.dataset, "prompts", **size, seed=args.seed, hf_split=args.hf_split, columns=columns)


def load_models(args: Args, device, dtype, autocast_dtype) -> tuple:
    """(tokenizer, policy, reference or None with LoRA, value model, reward model, its tokenizer or None if ours)."""
    load = dict(trust_remote_code=args.trust_remote_code, dtype=dtype, autocast_dtype=autocast_dtype)
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    policy, ref_policy = common.load_model(args.model, AutoModelForCausalLM, **load).to(device), None
    if args.lora_r:  # the reference is the policy with its adapters off: no copy of its own
        policy = common.apply_lora(policy, args.lora_r, args.lora_alpha, args.lora_target_modules)
    else:
        ref_policy = common.load_model(args.model, AutoModelForCausalLM, **load).to(device).requires_grad_(False)
    reward_model = reward_tokenizer = None
    if args.reward_fn == "reward_model":
        classifier = AutoModelForSequenceClassification  # with a trained `score` head: an error names one without
        reward_model = common.load_model(args.reward_model, classifier, **load, trained_head="score")
        if reward_model.config.num_labels != 1:
            raise ValueError(f"--reward-model {args.reward_model!r} has {reward_model.config.num_labels} labels, not 1")
        reward_model.to(device).requires_grad_(False)
        reward_tokenizer = common.load_tokenizer(args.reward_model, args.trust_remote_code)
        reward_tokenizer = None if reward_tokenizer.get_vocab() == tokenizer.get_vocab() else reward_tokenizer
    # the critic starts from the reward model when there is one (it already reads "how good is this text"), else from
    # the policy. It reads the policy's token ids, so a reward model with another tokenizer cannot be its start.
    value_source = args.reward_model if reward_model is not None and reward_tokenizer is None else args.model
    value_model = load_value_model(value_source, args.trust_remote_code, dtype, autocast_dtype).to(device)
    if args.lora_r:  # adapters added in place; the value model is not saved, so its peft wrapper is not needed
        common.apply_lora(value_model, args.lora_r, args.lora_alpha, args.lora_target_modules, "SEQ_CLS")
    for model in (policy, value_model):
        if args.gradient_checkpointing:
            common.enable_gradient_checkpointing(model)
        common.broadcast_parameters(model)  # every process starts from rank 0's weights
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    print(
        f"policy {args.model}: {sum(p.numel() for p in policy.parameters()):,} parameters ({trained:,} trained);"
        f" value model from {value_source}; on {device} in {dtype}, autocast {autocast_dtype}"
    )
    return tokenizer, policy, ref_policy, value_model, reward_model, reward_tokenizer


def load_value_model(name_or_path: str, trust_remote_code: bool, dtype: torch.dtype, autocast_dtype=None):
    """The critic: a sequence classifier (num_labels=1) whose `score` head, set to 0, is read at every token."""
    value_model = common.load_model(
        name_or_path, AutoModelForSequenceClassification, trust_remote_code, dtype, autocast_dtype, num_labels=1
    )
    for parameter in value_model.score.parameters():  # the weight (and a bias, if any)
        torch.nn.init.zeros_(parameter)
    return value_model


# the TensorBoard group of each metric averaged over processes
TAGS = dict(objective=["entropy"], policy=["ratio_mean", "ratio_var"], charts=["eos_fraction", "completion_length"])
TAGS["losses"] = ["policy_loss", "value_loss", "approx_kl", "clipfrac", "value_clipfrac", "explained_variance"]


def log_step(writer, step: int, rollout: dict, scores, kl, returns, kl_coef, update: dict, lr, sps) -> dict:
    """Log the rollout's sequence-level reward and KL (every process's) and the other metrics' means over processes."""
    explained = torch.tensor(explained_variance(rollout["old_values"], returns, rollout["mask"]))
    per_process = update | {"entropy": rollout["entropy"], "explained_variance": explained}
    ended, lengths = rollout["has_eos"].float(), rollout["mask"].sum(1).float()
    per_process |= {"eos_fraction": ended.mean(), "completion_length": lengths.mean()}
    mean = {key: common.all_reduce_sum(value.float().to(scores.device)).item() for key, value in per_process.items()}
    mean = {key: value / common.world()[1] for key, value in mean.items()}
    score, sequence_kl = common.all_gather(scores).mean().item(), common.all_gather(kl.sum(1)).mean().item()
    penalty = -kl_coef * sequence_kl  # the KL part of the RLHF reward
    scalars = {"objective/scores": score, "objective/kl": sequence_kl, "objective/non_score_reward": penalty}
    scalars |= {"objective/rlhf_reward": score + penalty, "objective/kl_coef": kl_coef, "charts/learning_rate": lr}
    scalars |= {f"{group}/{key}": mean[key] for group, keys in TAGS.items() for key in keys} | {"charts/SPS": sps}
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    return scalars


def print_progress(writer, step: int, scalars: dict, rows: list[dict], completions: list[str], scores) -> None:
    """A console line of the step's main metrics and three sample completions with their scores."""
    samples = "  ".join(f"{r['prompt']}{c!r} ({s:+.2f})" for r, c, s in zip(rows[:3], completions, scores.tolist()))
    writer.add_text("samples", samples, step)
    print(
        f"step {step:4d}  score {scalars['objective/scores']:+.3f}  kl {scalars['objective/kl']:.4f}  entropy"
        f" {scalars['objective/entropy']:.3f}  value_loss {scalars['losses/value_loss']:.4f}  clipfrac"
        f" {scalars['losses/clipfrac']:.3f}  SPS {scalars['charts/SPS']:.2f}  samples: {samples}",
        flush=True,
    )


def evaluate(writer, step: int, policy, tokenizer, rows: list[dict], max_new_tokens: int, args: Args) -> None:
    """Held-out greedy accuracy, logged and printed with three samples."""
    scoring = dict(chat_template=args.chat_template, reward_fn=tasks.eval_reward(args.dataset))
    accuracy, completions = common.evaluate_accuracy(policy, tokenizer, rows, max_new_tokens, **scoring)
    writer.add_scalar("charts/eval_accuracy", accuracy, step)
    samples = "  ".join(f"{row['prompt']}{text!r}" for row, text in zip(rows[:3], completions))
    print(f"step {step:4d}  eval_accuracy {accuracy:.3f}  greedy samples: {samples}", flush=True)


# ============================================================================= main
def main(args: Args):
    validate(args)
    common.check_output_dir(args.output_dir, args.overwrite_output_dir)  # before any model is loaded
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    if args.batch_size % (args.num_minibatches * world_size):  # every process takes an equal share of a minibatch
        times = f" x {world_size} processes" if world_size > 1 else ""
        raise ValueError(f"--num-minibatches {args.num_minibatches}{times} must divide --batch-size {args.batch_size}")
    common.seed_everything(args.seed)
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)
    train_rows, held_out_rows = load_prompts(args)
    # the four models: policy (trained), reference (frozen), reward model (frozen), value model (trained)
    models = load_models(args, device, dtype, autocast_dtype)
    tokenizer, policy, ref_policy, value_model, reward_model, reward_tokenizer = models
    common.seed_everything(args.seed + rank)  # each process samples different completions

    positions, max_new_tokens = common.max_positions(policy), args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = args.digits + 2 if args.dataset == tasks.ARITHMETIC else min(64, positions // 2)
    room = positions - max_new_tokens  # longer prompts cannot be completed in the model's positions: dropped, counted
    train_rows = common.fit_prompts(tokenizer, train_rows, args.chat_template, room, "training prompts")
    eval_rows = tasks.eval_problems(args.dataset, args.eval_dataset, args.digits, args.eval_size) or held_out_rows
    eval_rows = common.fit_prompts(tokenizer, eval_rows, args.chat_template, room, "held-out problems")
    if len(train_rows) < args.batch_size:
        raise ValueError(f"{args.dataset} has {len(train_rows)} training prompts, one step needs {args.batch_size}")

    policy_group = {"params": [p for p in policy.parameters() if p.requires_grad], "lr": args.learning_rate}
    value_group = {"params": [p for p in value_model.parameters() if p.requires_grad], "lr": args.value_learning_rate}
    optimizer = torch.optim.AdamW([policy_group, value_group], eps=1e-5, weight_decay=0.0, fused=True)
    scheduler = common.linear_schedule(optimizer, 0, args.total_steps)  # linear decay to 0, no warm-up
    generator = torch.Generator().manual_seed(args.seed)  # the same on every process: they agree on each batch
    order = torch.randperm(len(train_rows), generator=generator).tolist()
    kl_coef, start_step, trained = args.kl_coef, 0, {"policy": policy, "value_model": value_model}
    checkpoint = common.find_checkpoint(args.resume, args.output_dir)
    if checkpoint is not None:
        start_step, data = common.load_checkpoint(checkpoint, trained, optimizer, scheduler, args)
        order, kl_coef = data["order"], data["kl_coef"]
        generator.set_state(data["generator"])
    writer = common.setup_logging(args, common.run_name_for(args))

    if eval_rows and checkpoint is None:
        evaluate(writer, 0, policy, tokenizer, eval_rows, max_new_tokens, args)
    start_time = time.time()
    with common.stop_on_signal() as stop:
        for step in range(start_step + 1, args.total_steps + 1):
            if len(order) < args.batch_size:  # reshuffle after each pass over the prompts
                order += torch.randperm(len(train_rows), generator=generator).tolist()
            rows = [train_rows[i] for i in common.shard(order[: args.batch_size], rank, world_size)]  # this process's
            order = order[args.batch_size :]

            # 1. rollout: one completion per prompt, its old and reference log-probs and old values, its score
            prompt_ids = [row["prompt_ids"] for row in rows]
            rollout = sample_rollout(policy, ref_policy, value_model, tokenizer, prompt_ids, max_new_tokens, args)
            completions = common.decode_completions(tokenizer, rollout["completion_ids"], rollout["mask"])
            scores = sequence_scores(rollout, rows, completions, reward_model, reward_tokenizer, args)

            # 2. the KL-shaped per-token reward, GAE, advantages whitened over the whole batch (every process's)
            logprobs, ref_logprobs, mask = rollout["old_logprobs"], rollout["ref_logprobs"], rollout["mask"]
            rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, args.kl_estimator)
            if args.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)  # unit variance, the mean (and sign) kept
            advantages, returns = compute_gae(rewards, rollout["old_values"], mask, args.gamma, args.lam)
            advantages = masked_whiten(advantages, mask)

            # 3. PPO update: epochs x shuffled minibatches of the rollout
            learning_rate = scheduler.get_last_lr()[0]  # the policy's rate in this update
            update = ppo_update(policy, value_model, optimizer, rollout, advantages, returns, args)
            scheduler.step()

            sps = (step - start_step) / (time.time() - start_time)
            logged = log_step(writer, step, rollout, scores, kl, returns, kl_coef, update, learning_rate, sps)
            if args.target_kl is not None:  # the adaptive KL controller
                sequence_kl = logged["objective/kl"]  # the mean over the whole batch
                kl_coef = adaptive_kl_coef(kl_coef, sequence_kl, args.target_kl, args.kl_horizon, args.batch_size)
            if step % args.eval_every == 0 or step == args.total_steps:
                print_progress(writer, step, logged, rows, completions, scores)
                if eval_rows:
                    evaluate(writer, step, policy, tokenizer, eval_rows, max_new_tokens, args)
            if common.checkpoint_due(stop, step, args.save_every):
                data = {"order": order, "generator": generator.get_state(), "kl_coef": kl_coef}
                common.save_checkpoint(args, step, trained, optimizer, scheduler, data)
                if stop.name:
                    raise SystemExit(f"stopped by {stop.name} after step {step}; continue with --resume auto")

    common.save_model(policy, tokenizer, args.output_dir, args)
    print(f"saved {args.output_dir} after {time.time() - start_time:.0f}s")
    writer.close()
    return policy, value_model


if __name__ == "__main__":
    common.run(main, Args)
