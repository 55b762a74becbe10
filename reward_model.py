# Reward model: a scalar head on a causal LM, trained with the Bradley-Terry loss on preference pairs. See
# docs/reward_model.md.
import math
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForSequenceClassification

import common
import tasks


@dataclass
class Args:
    # experiment
    exp_name: str = "reward_model"
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
    output_dir: str = "checkpoints/reward_model"
    """where the final Hugging Face checkpoint (model + tokenizer) and the checkpoint-N folders go"""
    overwrite_output_dir: bool = False
    """write into --output-dir even if it holds files these scripts did not write (nothing of them is deleted)"""
    save_every: int = 500
    """save a checkpoint-N folder for --resume every this many steps (0: only on SIGINT/SIGTERM)"""
    keep_checkpoints: int = 2
    """checkpoint-N folders kept (the newest)"""
    resume: str | None = None
    """a checkpoint-N folder to continue from, or `auto`: the newest under --output-dir (a fresh start if none)"""

    # model and data
    model: str = "checkpoints/sft"
    """the backbone: a causal LM (its `score` head is created here) or a reward model to train further"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    dataset: str = "arithmetic"
    """`arithmetic` (the right sum vs a near miss), a .jsonl file of prompt/chosen/rejected(/margin), or a hub id"""
    digits: int = 2
    """operand digits of the arithmetic task"""
    hf_split: str = "train"
    """split of a Hugging Face dataset"""
    prompt_field: str = "prompt"
    """prompt column of a Hugging Face dataset"""
    chosen_field: str = "chosen"
    """preferred-completion column of a Hugging Face dataset"""
    rejected_field: str = "rejected"
    """dispreferred-completion column of a Hugging Face dataset"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (when it has one)"""
    max_length: int = 512
    """prompt + completion tokens kept per sequence (at most the model's positions); longer ones are cut at the end"""

    # the reward model's hyper-parameters
    total_steps: int = 2500
    """optimizer steps"""
    batch_size: int = 64
    """preference pairs per step over all processes (2 x batch_size sequences in one forward pass)"""
    learning_rate: float = 3e-4
    """peak learning rate of AdamW"""
    warmup_steps: int = 100
    """linear warm-up steps, then linear decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    center_rewards_coefficient: float = 0.01
    """weight of the auxiliary loss mean((r_c + r_r)^2) that keeps rewards centred on 0 (0 turns it off)"""
    shift_bias_to_zero_mean: bool = False
    """after training, shift r by a constant so its mean over the training completions is 0 (see the docs for LoRA)"""
    eval_every: int = 250
    """evaluate on the held-out pairs every this many steps (and at the end)"""
    eval_size: int = 500
    """held-out preference pairs to evaluate on"""

    # memory savers
    micro_batch_size: int | None = None
    """pairs per forward/backward pass, gradients accumulated over the batch (default: this process's whole batch)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them: less memory, more compute"""
    lora_r: int = 0
    """rank of LoRA adapters (needs peft); 0 trains every weight. The score head is trained whole either way"""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A to each target weight"""
    lora_target_modules: str = "all-linear"
    """comma-separated module names that get adapters, or `all-linear`"""


# ============================================================================= the math of the reward model
def bradley_terry_loss(chosen_rewards, rejected_rewards, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """L = -mean log sigmoid(r(x, y_c) - r(x, y_r) - m), the negative log-likelihood of the Bradley-Terry model
    P(y_c > y_r | x) = sigmoid(r_c - r_r); a per-pair margin m asks for r_c - r_r > m. Equal rewards, m = 0: log 2."""
    return -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()


def center_rewards_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """C = mean((r_c + r_r)^2) (Eisenstein et al., 2023): L sees only r_c - r_r, and r + c fits as well as r."""
    return ((chosen_rewards + rejected_rewards) ** 2).mean()


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Pair accuracy mean[r_c > r_r], mean margin mean[r_c - r_r], and the mean/std of all rewards r_c and r_r."""
    rewards = torch.cat([chosen_rewards, rejected_rewards])
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "margin": (chosen_rewards - rejected_rewards).mean().item(),
        "chosen": chosen_rewards.mean().item(),
        "rejected": rejected_rewards.mean().item(),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item(),
    }


@torch.no_grad()
def init_reward_head(model) -> None:
    """w ~ N(0, 1/sqrt(d + 1)) (std), b = 0: unit-variance rewards at the start when h has unit-variance entries."""
    model.score.weight.normal_(mean=0.0, std=1 / math.sqrt(model.score.in_features + 1))
    if model.score.bias is not None:
        model.score.bias.zero_()


def bias_to_shift(model) -> torch.nn.Parameter | None:
    """The parameter that adds a constant to r: the score head's bias, else the final norm's bias (GPT-2's ln_f)."""
    norms = [getattr(model.base_model, name, None) for name in ("ln_f", "final_layer_norm", "norm")]
    return next((module.bias for module in [model.score, *norms] if getattr(module, "bias", None) is not None), None)


@torch.no_grad()
def shift_reward(model, shift: float) -> None:
    """r(x, y) <- r(x, y) + shift for every input, exactly: b <- b + shift with a head bias; else the final LayerNorm
    h = LN(x) * gamma + beta feeds only the head r = w . h, and beta <- beta + shift * w / (w . w) adds shift."""
    bias, weight = bias_to_shift(model), model.score.weight[0]
    bias += shift if bias is model.score.bias else shift * weight / weight.dot(weight)


# ============================================================================= scoring preference pairs
def tokenize_pair(tokenizer, row: dict, max_length: int, chat_template: bool) -> tuple[list[int], list[int], bool]:
    """(chosen ids, rejected ids, truncated): prompt and completions tokenised apart (the prompt tokens are the same in
    both), EOS appended to each completion, each sequence cut to max_length."""
    prompt_ids = common.tokenize_prompt(tokenizer, row["prompt"], chat_template)
    completions = [tokenizer(row[key], add_special_tokens=False)["input_ids"] for key in ("chosen", "rejected")]
    chosen, rejected = (prompt_ids + ids + [tokenizer.eos_token_id] for ids in completions)
    return chosen[:max_length], rejected[:max_length], max(len(chosen), len(rejected)) > max_length


def collate_pairs(pairs: list[tuple[list[int], list[int]]], pad_token_id: int, device) -> dict:
    """One right-padded batch of 2B sequences: rows 0..B-1 are the chosen completions, rows B..2B-1 the rejected."""
    sequences = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    length = max(len(ids) for ids in sequences)
    input_ids = torch.tensor([ids + [pad_token_id] * (length - len(ids)) for ids in sequences])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in sequences])
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def score_pairs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) from one forward pass over the concatenated batch of `collate_pairs`."""
    return common.reward_model_scores(model, batch["input_ids"], batch["attention_mask"]).chunk(2)


@torch.no_grad()
def score_dataset(model, pairs: list[tuple[list[int], list[int]]], pad_token_id: int, device, batch_size: int = 256):
    """(r_chosen, r_rejected) of every pair, in batches, without gradients."""
    batches = (collate_pairs(pairs[i : i + batch_size], pad_token_id, device) for i in range(0, len(pairs), batch_size))
    chosen, rejected = zip(*(score_pairs(model, batch) for batch in batches))
    return torch.cat(chosen), torch.cat(rejected)


# ============================================================================= the update
def update(model, optimizer, scheduler, pairs, margins, args: Args) -> dict[str, float]:
    """One AdamW step on L + center_rewards_coefficient * C over this process's `pairs`, micro-batch by micro-batch;
    returns the losses and reward statistics of the whole batch (every process's pairs)."""
    optimizer.zero_grad(set_to_none=True)
    size, chosen, rejected = args.micro_batch_size or len(pairs), [], []
    for start in range(0, len(pairs), size):
        batch = collate_pairs(pairs[start : start + size], model.config.pad_token_id, model.device)
        r_chosen, r_rejected = score_pairs(model, batch)  # chosen and rejected in one forward pass
        margin = margins[start : start + size]
        preference_loss = bradley_terry_loss(chosen_rewards=r_chosen, rejected_rewards=r_rejected, margin=margin)
        center_loss = center_rewards_loss(chosen_rewards=r_chosen, rejected_rewards=r_rejected)
        loss = preference_loss + args.center_rewards_coefficient * center_loss
        (loss * len(r_chosen) / args.batch_size).backward()  # its share of the batch's mean loss
        chosen.append(r_chosen.detach())
        rejected.append(r_rejected.detach())
    common.all_reduce_gradients(model)  # summed over processes: the gradient of the whole batch's loss
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    learning_rate = scheduler.get_last_lr()[0]  # the rate of this step; scheduler.step() moves to the next step's
    optimizer.step()
    scheduler.step()
    # the loss and rewards of the whole batch, every process's share gathered, for the log
    r_chosen, r_rejected, margin = (common.all_gather(torch.cat(part)) for part in (chosen, rejected, [margins]))
    preference_loss = bradley_terry_loss(chosen_rewards=r_chosen, rejected_rewards=r_rejected, margin=margin)
    center_loss = center_rewards_loss(chosen_rewards=r_chosen, rejected_rewards=r_rejected)
    loss = preference_loss + args.center_rewards_coefficient * center_loss
    losses = dict(loss=loss, bradley_terry_loss=preference_loss, center_rewards_loss=center_loss, grad_norm=grad_norm)
    metrics = preference_metrics(r_chosen, r_rejected)
    tags = dict(accuracies="accuracy", margins="margin", chosen="chosen", rejected="rejected")
    stats = {f"losses/{name}": value.item() for name, value in losses.items()} | {"charts/learning_rate": learning_rate}
    return stats | {f"rewards/{tag}": metrics[name] for tag, name in tags.items()}


# ============================================================================= main
def main(args: Args) -> None:
    validate(args)
    common.check_output_dir(args.output_dir, args.overwrite_output_dir)
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the number of processes, {world_size}")
    common.seed_everything(args.seed)
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)
    train_rows, eval_rows = load_pairs(args)
    tokenizer, model, to_save = load_reward_model(args, device, dtype, autocast_dtype)
    max_length = min(args.max_length, common.max_positions(model))  # longer: an index error in the embedding
    train_rows, train_pairs, num_cut = fit_pairs(tokenizer, train_rows, max_length, args.chat_template, "training")
    eval_rows, eval_pairs, _ = fit_pairs(tokenizer, eval_rows, max_length, args.chat_template, "held-out")
    margins = torch.tensor([float(row.get("margin", 0.0)) for row in train_rows], device=device)
    micro_batch_size = min(args.micro_batch_size or args.batch_size, args.batch_size // world_size)

    models, trained = {"reward_model": model}, [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = common.linear_schedule(optimizer, args.warmup_steps, args.total_steps)
    generator = torch.Generator().manual_seed(args.seed)  # the same on every process: they agree on each batch
    order = torch.randperm(len(train_pairs), generator=generator).tolist()
    start_step, checkpoint = 0, common.find_checkpoint(args.resume, args.output_dir)
    if checkpoint is not None:
        start_step, data = common.load_checkpoint(checkpoint, models, optimizer, scheduler, args)
        order = data["order"]
        generator.set_state(data["generator"])
    writer = common.setup_logging(args, common.run_name_for(args))
    writer.add_scalar("charts/truncated_pairs", num_cut, 0)

    start_time = time.time()
    model.train()
    with common.stop_on_signal() as stop:
        for step in range(start_step + 1, args.total_steps + 1):
            # a batch of pairs, reshuffled after each pass over them; each process takes its share
            while len(order) < args.batch_size:
                order += torch.randperm(len(train_pairs), generator=generator).tolist()
            local_indices, order = common.shard(order[: args.batch_size], rank, world_size), order[args.batch_size :]
            pairs = [train_pairs[i] for i in local_indices]
            stats = update(model, optimizer, scheduler, pairs, margins[local_indices], args)
            stats["charts/SPS"] = (step - start_step) / (time.time() - start_time)
            if eval_pairs and (step % args.eval_every == 0 or step == args.total_steps):  # < 10 rows hold none out
                stats |= evaluate(model, step, stats, eval_rows, eval_pairs, micro_batch_size)
            for tag, value in stats.items():
                writer.add_scalar(tag, value, step)
            if common.checkpoint_due(stop, step, args.save_every):
                data = {"order": order, "generator": generator.get_state()}
                common.save_checkpoint(args, step, models, optimizer, scheduler, data)
                if stop.name:
                    raise SystemExit(f"stopped by {stop.name} after step {step}; continue with --resume auto")

    if args.shift_bias_to_zero_mean:  # r <- r - mean over the training completions: a policy's reward starts near 0
        model.eval()
        rewards = torch.cat(score_dataset(model, train_pairs, tokenizer.pad_token_id, device, micro_batch_size))
        shift = -rewards.mean().item()
        shift_reward(model, shift)
        writer.add_scalar("charts/reward_shift", shift, args.total_steps)
        print(f"shifted rewards by {shift:+.4f}: mean reward on the training completions is now 0")
    common.save_model(to_save, tokenizer, args.output_dir, args)
    print(f"saved {args.output_dir} after {time.time() - start_time:.0f}s")
    writer.close()


# ----------------------------------------------------------------------------- plumbing a learner may skip: checking
# the flags, loading the data and the model, logging
def validate(args: Args) -> None:
    """Every flag checked before anything is loaded; a bad one is one line naming it (None: the flag's default)."""
    minimums = dict(total_steps=1, batch_size=1, micro_batch_size=1, eval_every=1, eval_size=0, max_length=1)
    common.check_minimums(args, **minimums, lora_r=0, save_every=0, keep_checkpoints=1, digits=1)


def load_pairs(args: Args) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) of {prompt, chosen, rejected}, in a .jsonl file also an optional "margin"."""
    num_rows = args.total_steps * args.batch_size  # arithmetic: a new pair for every one a step uses
    columns = {"prompt": args.prompt_field, "chosen": args.chosen_field, "rejected": args.rejected_field}
    options = dict(digits=args.digits, seed=args.seed, held_out=args.eval_size, hf_split=args.hf_split, columns=columns)
    train_rows, eval_rows = tasks.load_rows(args.dataset, "pairs", num_rows=num_rows, **options)
    if args.dataset.endswith(".jsonl"):
        with open(args.dataset, "rb") as file:  # the file holds eval_rows + train_rows; read_jsonl skips blank lines
            numbers = [number for number, line in enumerate(file, start=1) if line.decode("utf-8").strip()]
        for row, number in zip(eval_rows + train_rows, numbers):
            margin = row.get("margin", 0.0)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise ValueError(f"{args.dataset}:{number}: field 'margin' must be a finite number, got {margin!r}")
    return train_rows, eval_rows


def load_reward_model(args: Args, device, dtype, autocast_dtype):
    """(tokenizer, model, to_save): --model with a scalar `score` head on the last real token (num_labels=1); with
    LoRA the adapters go into `model` in place, and `to_save` is the peft wrapper that merges and saves them."""
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code, padding_side="right")
    model_class = AutoModelForSequenceClassification
    model = common.load_model(args.model, model_class, args.trust_remote_code, dtype, autocast_dtype, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # in config.json: HF's own forward finds the last token by it
    if not any(name.endswith("ForSequenceClassification") for name in model.config.architectures or []):
        init_reward_head(model)  # a causal LM has no score head yet (a reward model checkpoint keeps its own)
    if args.shift_bias_to_zero_mean and bias_to_shift(model) is None:
        raise ValueError(f"--shift-bias-to-zero-mean: {args.model} has no score bias nor final LayerNorm bias")
    to_save = model.to(device)
    if args.lora_r:
        to_save = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules, "SEQ_CLS")
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    common.broadcast_parameters(model)  # the new score head is random: every process starts from rank 0's
    total, trained = (sum(p.numel() for p in model.parameters() if p.requires_grad or every) for every in (1, 0))
    print(f"{args.model}: {total:,} parameters ({trained:,} trained) on {device} in {dtype}, autocast {autocast_dtype}")
    return tokenizer, model, to_save


def fit_pairs(tokenizer, rows: list[dict], max_length: int, chat_template: bool, what: str):
    """(rows, pairs, number cut): each (chosen ids, rejected ids) cut at max_length; a pair that the cut leaves as one
    sequence twice (the prompt fills it) would train on nothing and is dropped."""
    tokenized = [tokenize_pair(tokenizer, row, max_length, chat_template) for row in rows]
    dropped = [cut and chosen == rejected for chosen, rejected, cut in tokenized]  # cut inside the prompt
    kept = [(row, pair[:2]) for row, pair, drop in zip(rows, tokenized, dropped) if not drop]
    num_cut, limit = sum(cut for *_, cut in tokenized), f"{max_length} tokens (--max-length or the model's positions)"
    if num_cut:
        print(f"{what}: {num_cut} of {len(rows)} pairs cut at {limit}, {sum(dropped)} dropped (chosen = rejected)")
    if rows and not kept:
        raise ValueError(f"{what}: every pair's chosen and rejected are the same sequence once cut at {limit}")
    return [row for row, _ in kept], [pair for _, pair in kept], num_cut


def evaluate(model, step: int, stats: dict, eval_rows: list[dict], eval_pairs: list, batch_size: int) -> dict:
    """The held-out pair accuracy, margin and reward mean/std to log, and a console line with two held-out pairs."""
    model.eval()
    eval_chosen, eval_rejected = score_dataset(model, eval_pairs, model.config.pad_token_id, model.device, batch_size)
    model.train()
    metrics = preference_metrics(eval_chosen, eval_rejected)
    samples = "  ".join(
        f"{row['prompt']}{row['chosen']!r} {chosen:+.2f} > {row['rejected']!r} {rejected:+.2f}"
        for row, chosen, rejected in zip(eval_rows[:2], eval_chosen.tolist(), eval_rejected.tolist())
    )
    print(
        f"step {step:5d}  loss {stats['losses/loss']:.4f}  train_acc {stats['rewards/accuracies']:.3f}"
        f"  eval_accuracy {metrics['accuracy']:.3f}  eval_margin {metrics['margin']:.2f}  reward"
        f" {metrics['reward_mean']:+.2f} +- {metrics['reward_std']:.2f}  SPS {stats['charts/SPS']:.1f}  {samples}",
        flush=True,
    )
    return {f"charts/eval_{name}": metrics[name] for name in ("accuracy", "margin", "reward_mean", "reward_std")}


if __name__ == "__main__":
    common.run(main, Args)
