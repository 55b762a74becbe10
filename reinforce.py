# REINFORCE with a leave-one-out baseline (RLOO): the simplest policy gradient for a language model, the one GRPO
# and PPO build on. The derivation, the flags and the metrics: docs/reinforce.md.
import functools
import time
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AutoModelForSequenceClassification

import common
import tasks


@dataclass
class Args:
    # experiment
    exp_name: str = "reinforce"
    """the name of this experiment (prefix of the run name under runs/)"""
    seed: int = 1
    """seed of the experiment"""
    device: str = "auto"
    """`auto` (cuda > mps > cpu), or a torch device such as `cpu` or `cuda:1`"""
    dtype: str = "auto"
    """`auto` (mixed on a GPU with bf16, else float32), `mixed` (fp32 weights, bf16 body), float32, bfloat16, float16"""

    # run: output, checkpoints, resume
    output_dir: str = "checkpoints/reinforce"
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
    """the policy to start from (and the reference): a Hugging Face model id or a local checkpoint folder"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    dataset: str = "arithmetic"
    """`arithmetic` (the built-in addition task), a prompt/answer .jsonl file, or a Hugging Face dataset id"""
    digits: int = 2
    """operand digits of the arithmetic task"""
    eval_dataset: str | None = None
    """a prompt/answer .jsonl file of held-out problems; default the held-out rows of --dataset"""
    eval_size: int = 500
    """held-out problems to evaluate on"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (when it has one)"""
    reward_funcs: tuple[str, ...] | None = None
    """rule-based rewards of tasks.py (arithmetic, math, format); default `arithmetic` on arithmetic, else `math`"""
    reward_model: str | None = None
    """an AutoModelForSequenceClassification checkpoint (what reward_model.py writes) used as one more reward"""
    reward_weights: tuple[float, ...] | None = None
    """one weight per reward (the rule-based ones, then the reward model); default all 1"""

    # REINFORCE
    total_steps: int = 3000
    """rollouts, each followed by one optimizer step"""
    batch_size: int = 128
    """completions per rollout over all processes: (number of prompts) x --group-size"""
    group_size: int = 8
    """k, completions sampled per prompt; the others' mean reward is each one's baseline"""
    baseline: Literal["leave-one-out", "mean", "none"] = "leave-one-out"
    """b_i: the mean reward of the prompt's other k - 1 completions, of all k (biased), or 0"""
    beta: float = 0.0
    """coefficient of the sequence KL to the reference, subtracted from the reward; 0 loads no reference model"""
    max_completion_length: int | None = None
    """tokens generated per completion; default digits + 2 on arithmetic, else min(256, half the model's positions)"""
    temperature: float = 1.0
    """sampling temperature; every log-prob is computed at the same temperature"""
    learning_rate: float = 3e-5
    """learning rate of AdamW, decayed linearly to 0"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    eval_every: int = 100
    """evaluate held-out greedy accuracy every this many steps (and before the first and after the last)"""


# ============================================================================= the math of REINFORCE
def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = r_i - b_i, b_i = (1/(k-1)) sum_{j != i} r_j over the k = group_size consecutive completions of a prompt (no
    std division). b_i does not depend on y_i: E[A_i grad log pi(y_i)] = grad E[r], no bias. A group's A_i sum to 0."""
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


def baseline_advantages(rewards: torch.Tensor, group_size: int, baseline: str = "leave-one-out") -> torch.Tensor:
    """A_i = r_i - b_i for --baseline `leave-one-out` (above), `none` (b_i = 0: no bias, more variance) or `mean`
    (b_i = mean_j r_j over all k). `mean` includes y_i's own reward, so it is biased: its A_i is (k-1)/k of the
    leave-one-out one, and E[A_i grad log pi(y_i)] is (k-1)/k of the true gradient."""
    if baseline == "leave-one-out":
        return leave_one_out_advantages(rewards, group_size)
    if baseline == "mean":
        grouped = rewards.view(-1, group_size)
        return (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if baseline == "none":
        return rewards.clone()
    raise ValueError(f"--baseline must be leave-one-out, mean or none; got {baseline!r}")


def reinforce_loss(logprobs, advantages, mask, num_completions: int) -> torch.Tensor:
    """L = -(1/N) sum_i A_i sum_t log pi(y_it | x, y_i<t), the sum over each completion's tokens (mask). Its gradient
    is minus the REINFORCE estimator, the mean over the N completions of A_i grad log pi(y_i | x), and the log-prob of a
    sequence is the sum of its tokens' (a mean over tokens would change the gradient). N is the whole batch's count of
    completions: under torchrun each process passes it, so the processes' losses add up to the batch loss."""
    return -(advantages * (logprobs * mask).sum(dim=1)).sum() / num_completions


# ============================================================================= rollout
def completion_logprobs(model, batch: dict, temperature: float) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of each completion token in `batch` at the sampling temperature, positions from the mask"""
    input_ids, attention_mask, prompt_length = batch["input_ids"], batch["attention_mask"], batch["prompt_length"]
    position_ids = common.position_ids_from_mask(attention_mask)
    keep = input_ids.size(1) - prompt_length + 1  # the positions whose logits predict completion tokens, and one more
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep)
    return common.token_logprobs(logits.logits[:, :-1], input_ids[:, prompt_length:], temperature)


def sequence_rewards(rows, completions, has_eos: list[bool], args, reward_model=None) -> torch.Tensor:
    """r(x, y_i) = sum_k w_k r_k(x, y_i) over --reward-funcs and --reward-model (a (model, tokenizer) pair)."""
    prompts, fields = [row["prompt"] for row in rows], tasks.row_fields(rows)
    columns = [tasks.REWARD_FUNCTIONS[name](prompts, completions, **fields) for name in args.reward_funcs]
    if reward_model is not None:
        model, tokenizer = reward_model
        scores = common.score_completions(model, tokenizer, prompts, completions, has_eos, args.chat_template, 256)
        columns.append(scores.tolist())
    return torch.tensor(args.reward_weights or [1.0] * len(columns)) @ torch.tensor(columns)


@torch.no_grad()
def rollout(model, tokenizer, rows: list[dict], args: Args, reward_model=None, reference=None) -> dict:
    """k completions of each prompt (a prompt's k rows consecutive), their rewards and, with a reference, their KL."""
    prompt_ids = [row["prompt_ids"] for row in rows]
    prompts = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt", padding_side="left")
    prompts = {key: value.repeat_interleave(args.group_size, dim=0).to(model.device) for key, value in prompts.items()}
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, **special)
    input_ids = model.generate(**prompts, **sampling, max_new_tokens=args.max_completion_length)
    prompt_length = prompts["input_ids"].size(1)
    mask, has_eos = common.completion_mask(input_ids[:, prompt_length:], tokenizer.eos_token_id)
    completions = common.decode_completions(tokenizer, input_ids[:, prompt_length:], mask)
    rows = [row for row in rows for _ in range(args.group_size)]
    attention_mask = torch.cat([prompts["attention_mask"], mask], dim=1)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, mask=mask, prompt_length=prompt_length, kl=None)
    rewards = sequence_rewards(rows, completions, has_eos.tolist(), args, reward_model)
    batch["rewards"] = rewards.to(input_ids.device)
    if reference is not None:
        logprobs, ref_logprobs = (completion_logprobs(policy, batch, args.temperature) for policy in (model, reference))
        batch["kl"] = ((logprobs - ref_logprobs) * mask).sum(dim=1)  # KL_i = sum_t log pi(y_it) / pi_ref(y_it) (k1)
    return batch


# ============================================================================= update
def update(model, optimizer, scheduler, batch: dict, advantages: torch.Tensor, args: Args) -> dict[str, float]:
    """One optimizer step on the REINFORCE loss (under torchrun the gradients are summed over processes)."""
    optimizer.zero_grad(set_to_none=True)
    logprobs = completion_logprobs(model, batch, args.temperature)
    loss = reinforce_loss(logprobs=logprobs, advantages=advantages, mask=batch["mask"], num_completions=args.batch_size)
    loss.backward()
    common.all_reduce_gradients(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    return {"losses/policy_loss": common.all_reduce_sum(loss.detach()).item(), "losses/grad_norm": grad_norm.item()}


# ----------------------------------------------------------------------------- plumbing a learner may skip: checks,
# loading the models, evaluation and logging
def validate(args: Args) -> None:
    """Every flag checked before anything is loaded, each with one clear message."""
    if args.reward_funcs is None:
        args.reward_funcs = ("arithmetic",) if args.dataset == tasks.ARITHMETIC else ("math",)
    num_rewards = len(args.reward_funcs) + (args.reward_model is not None)
    unknown = sorted(set(args.reward_funcs) - set(tasks.REWARD_FUNCTIONS))
    minimum = dict(total_steps=1, batch_size=1, group_size=2, eval_every=1, eval_size=0)
    minimum |= dict(save_every=0, keep_checkpoints=1, max_completion_length=1, beta=0, digits=1)
    common.check_minimums(args, **minimum)
    checks = [
        (args.batch_size % args.group_size > 0, f"--group-size {args.group_size} must divide --batch-size"),
        (args.temperature <= 0, f"--temperature must be > 0, got {args.temperature}"),
        (bool(unknown), f"--reward-funcs: unknown {unknown}; choose from {list(tasks.REWARD_FUNCTIONS)}"),
        (num_rewards == 0, "no reward: give --reward-funcs or --reward-model"),
        (len(args.reward_weights or [1] * num_rewards) != num_rewards, f"--reward-weights: {num_rewards} weights"),
    ]
    for failed, message in checks:
        if failed:
            raise ValueError(message)


def load_models(args: Args, dtype, autocast_dtype, device):
    """(tokenizer, policy, reference or None, (reward model, its tokenizer) or None); fills in the default length."""
    load = functools.partial(common.load_model, dtype=dtype, autocast_dtype=autocast_dtype)
    load = functools.partial(load, trust_remote_code=args.trust_remote_code)
    tokenizer, model = common.load_tokenizer(args.model, args.trust_remote_code), load(args.model).to(device)
    common.broadcast_parameters(model)
    reference = load(args.model).to(device) if args.beta else None  # the starting policy, frozen (used without grad)
    reward_model = None
    if args.reward_model is not None:
        scorer = load(args.reward_model, AutoModelForSequenceClassification, trained_head="score").to(device)
        if scorer.config.num_labels != 1:
            raise ValueError(f"--reward-model {args.reward_model!r} has {scorer.config.num_labels} labels, not 1")
        reward_model = scorer, common.load_tokenizer(args.reward_model, args.trust_remote_code)
    if args.max_completion_length is None:
        positions = common.max_positions(model)
        args.max_completion_length = args.digits + 2 if args.dataset == tasks.ARITHMETIC else min(256, positions // 2)
    return tokenizer, model, reference, reward_model


def evaluate(model, tokenizer, eval_rows: list[dict], args: Args, writer, step: int) -> None:
    """Held-out greedy accuracy: exact match on arithmetic, the final answer otherwise."""
    options = dict(chat_template=args.chat_template, reward_fn=tasks.eval_reward(args.dataset))
    accuracy, completions = common.evaluate_accuracy(model, tokenizer, eval_rows, args.max_completion_length, **options)
    writer.add_scalar("charts/eval_accuracy", accuracy, step)
    print(f"step {step:5d}  eval_accuracy {accuracy:.3f}  {eval_rows[0]['prompt']!r} -> {completions[0]!r}", flush=True)


def log_step(writer, step: int, batch: dict, metrics: dict, args: Args) -> None:
    """The metrics of one step, over every process's completions, and a line now and then."""
    rewards, lengths = common.all_gather(batch["rewards"]), common.all_gather(batch["mask"].sum(dim=1).float())
    metrics["charts/reward"], metrics["charts/completion_length"] = rewards.mean().item(), lengths.mean().item()
    metrics["charts/reward_std"] = rewards.view(-1, args.group_size).std(dim=1).mean().item()  # within a group
    if batch["kl"] is not None:
        metrics["losses/kl"] = common.all_gather(batch["kl"]).mean().item()
    for name, value in metrics.items():
        writer.add_scalar(name, value, step)
    if step % args.eval_every == 0 or step == args.total_steps:
        print(f"step {step:5d}  reward {metrics['charts/reward']:.3f}  SPS {metrics['charts/SPS']:.2f}", flush=True)


# ============================================================================= main
def main(args: Args) -> None:
    validate(args)
    common.check_output_dir(args.output_dir, args.overwrite_output_dir)
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    num_prompts = args.batch_size // args.group_size  # per step, over all processes
    if num_prompts % world_size:
        raise ValueError(f"--batch-size / --group-size = {num_prompts} prompts must divide by {world_size} processes")
    common.seed_everything(args.seed + rank)  # each process samples its own completions
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)
    sizes = dict(num_rows=args.total_steps * num_prompts, digits=args.digits, seed=args.seed, held_out=args.eval_size)
    train_rows, held_out = tasks.load_rows(args.dataset, "prompts", **sizes)
    eval_rows = tasks.eval_problems(args.dataset, args.eval_dataset, args.digits, args.eval_size) or held_out
    tokenizer, model, reference, reward_model = load_models(args, dtype, autocast_dtype, device)
    room = common.max_positions(model) - args.max_completion_length  # prompt tokens that fit with a completion
    train_rows = common.fit_prompts(tokenizer, train_rows, args.chat_template, room, "training prompts")
    eval_rows = common.fit_prompts(tokenizer, eval_rows, args.chat_template, room, "held-out prompts")
    if len(train_rows) < num_prompts:
        needs = f"one step needs {num_prompts} (--batch-size {args.batch_size} / --group-size {args.group_size})"
        raise ValueError(f"{args.dataset} has {len(train_rows)} training prompts, {needs}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)
    scheduler = common.linear_schedule(optimizer, 0, args.total_steps)
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
            # 1. rollout: k completions of each prompt; each process takes its share of the prompts
            if len(order) < num_prompts:
                order += torch.randperm(len(train_rows), generator=generator).tolist()
            rows = [train_rows[i] for i in common.shard(order[:num_prompts], rank, world_size)]
            order = order[num_prompts:]
            batch = rollout(model, tokenizer, rows, args, reward_model, reference)
            # 2. advantages A_i = r_i - b_i of the reward less beta times the sequence KL to the reference
            rewards = batch["rewards"] if batch["kl"] is None else batch["rewards"] - args.beta * batch["kl"]
            advantages = baseline_advantages(rewards, args.group_size, args.baseline)
            # 3. one gradient step on the loss -A_i log pi(y_i | x)
            metrics = {"charts/learning_rate": scheduler.get_last_lr()[0]}  # this step's rate
            metrics |= update(model, optimizer, scheduler, batch, advantages, args)
            metrics["charts/SPS"] = (step - start_step) / (time.time() - start_time)
            log_step(writer, step, batch, metrics, args)
            if eval_rows and (step % args.eval_every == 0 or step == args.total_steps):
                evaluate(model, tokenizer, eval_rows, args, writer, step)
            if common.checkpoint_due(stop, step, args.save_every):
                data = {"order": order, "generator": generator.get_state()}
                common.save_checkpoint(args, step, {"policy": model}, optimizer, scheduler, data)
                if stop.name:
                    raise SystemExit(f"stopped by {stop.name} after step {step}; continue with --resume auto")
    common.save_model(model, tokenizer, args.output_dir, args)
    writer.close()


if __name__ == "__main__":
    common.run(main, Args)
