# Reward model: a scalar head on a causal LM, trained with the Bradley-Terry loss on preference pairs. README.md, section "Reward model".
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro
from transformers import AutoModelForSequenceClassification

import common

# r(x, y) is read by ppo.py and grpo.py too, so the scorer lives in common.py (scripts never import each other):
#   last_token_index(attention_mask): index of the last real token of each row, from the mask, never from token values;
#   reward_model_scores(model, input_ids, attention_mask): r(x, y) = w . h_last + b, h_last = base_model hidden state there.
last_token_index = common.last_token_index
reward_model_scores = common.reward_model_scores


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
    """`auto` (mixed on a GPU with bf16, float32 elsewhere), `mixed` (fp32 weights, bf16 autocast), float32, bfloat16, float16"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project_name: str = "rlhf-reference"
    """the W&B project, when --track"""
    wandb_entity: str | None = None
    """the W&B entity (team), when --track"""
    output_dir: str = "checkpoints/reward_model"
    """where the final Hugging Face checkpoint (AutoModelForSequenceClassification + tokenizer) is written"""

    # model and data
    model: str = "checkpoints/sft"
    """the backbone: a causal LM (its `score` head is created here) or a reward model to train further; id or local folder"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    dataset: str = "arithmetic"
    """`arithmetic` (correct sum vs a near miss), a prompt/chosen/rejected(/margin) .jsonl file, or a Hugging Face dataset id"""
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
    """prompt + completion tokens kept per sequence; longer ones are cut at the end (and counted)"""

    # optimisation
    total_steps: int = 2500
    """optimizer steps"""
    batch_size: int = 64
    """preference pairs per step over all processes (2 x batch_size sequences in one forward pass)"""
    micro_batch_size: int | None = None
    """pairs per forward/backward pass; gradients accumulate over the batch (default: the whole batch of this process)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them: less memory, more compute"""
    lora_r: int = 0
    """rank of LoRA adapters (needs peft); 0 trains every weight. The score head is trained whole either way"""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A to each target weight"""
    lora_target_modules: str = "all-linear"
    """comma-separated module names that get adapters, or `all-linear`"""
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
    """after training, shift the reward by a constant so its mean over the training completions is 0 (with --lora-r and
    no head bias the shift goes into the final norm: in the merged checkpoint, not in its adapter/ folder)"""
    eval_every: int = 250
    """evaluate on the held-out pairs every this many steps (and at the end)"""
    eval_size: int = 500
    """held-out preference pairs to evaluate on"""


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """L = -mean log sigmoid(r(x, y_c) - r(x, y_r) - m): the negative log-likelihood of the Bradley-Terry model.

    P(y_c > y_r | x) = sigmoid(r_c - r_r). The optional per-pair margin m asks for r_c - r_r > m
    (a pair rated "much better" should be separated further). Equal rewards and m = 0 give log 2.
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits).mean()


def center_rewards_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """mean((r_c + r_r)^2) (Eisenstein et al., 2023): the loss sees only r_c - r_r, so r + c fits as well as r; this picks c ~ 0."""
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


def load_pairs(args: Args) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of {"prompt", "chosen", "rejected"} and, in a JSONL file, an optional numeric "margin"."""
    if args.dataset == "arithmetic":
        train = common.arithmetic_preference_pairs(args.total_steps * args.batch_size, args.digits, "train", seed=args.seed)
        return train, common.arithmetic_preference_pairs(args.eval_size, args.digits, "test", seed=1234)
    if args.dataset.endswith(".jsonl"):
        rows = common.read_jsonl(args.dataset, ("prompt", "chosen", "rejected"))
        with open(args.dataset, encoding="utf-8") as file:  # read_jsonl skips blank lines; recover each row's line number
            line_numbers = [number for number, line in enumerate(file, start=1) if line.strip()]
        for row, line_number in zip(rows, line_numbers):
            margin = row.get("margin", 0.0)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise ValueError(f"{args.dataset}:{line_number}: field 'margin' must be a finite number, got {margin!r}")
    else:
        fields = {"prompt": args.prompt_field, "chosen": args.chosen_field, "rejected": args.rejected_field}
        rows = common.load_hf_dataset(args.dataset, args.hf_split, fields)
    held_out = min(args.eval_size, len(rows) // 10)
    return rows[held_out:], rows[:held_out]


def tokenize_pair(tokenizer, row: dict, max_length: int, chat_template: bool) -> tuple[list[int], list[int], bool]:
    """(chosen ids, rejected ids, truncated): prompt and each completion tokenised separately, EOS appended to each completion.

    Tokenising separately keeps the prompt tokens identical in both sequences (a merge across the
    prompt/completion boundary could otherwise differ between them). Sequences are cut to max_length.
    """
    prompt_ids = common.tokenize_prompt(tokenizer, row["prompt"], chat_template)
    sequences = [
        prompt_ids + tokenizer(row[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for key in ("chosen", "rejected")
    ]
    truncated = any(len(ids) > max_length for ids in sequences)
    return sequences[0][:max_length], sequences[1][:max_length], truncated


def collate_pairs(pairs: list[tuple[list[int], list[int]]], pad_token_id: int, device) -> dict:
    """One right-padded batch of 2B sequences: rows 0..B-1 are the chosen completions, rows B..2B-1 the rejected ones."""
    sequences = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    lengths = torch.tensor([len(ids) for ids in sequences])
    length = int(lengths.max())
    # one tensor from padded lists (a copy per row took about 1 ms a batch, 2% of a tiny model's step)
    input_ids = torch.tensor([ids + [pad_token_id] * (length - len(ids)) for ids in sequences])
    attention_mask = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def score_pairs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) from one forward pass over the concatenated batch of `collate_pairs`."""
    rewards = reward_model_scores(model, batch["input_ids"], batch["attention_mask"])
    return rewards.chunk(2)


@torch.no_grad()
def score_dataset(model, pairs: list[tuple[list[int], list[int]]], pad_token_id: int, device, batch_size: int = 256):
    """(r_chosen, r_rejected) of every pair, in batches, without gradients."""
    scores = [score_pairs(model, collate_pairs(pairs[i : i + batch_size], pad_token_id, device)) for i in range(0, len(pairs), batch_size)]
    return torch.cat([chosen for chosen, _ in scores]), torch.cat([rejected for _, rejected in scores])


def init_reward_head(model) -> None:
    """w ~ N(0, 1/sqrt(d + 1)) (std), b = 0: unit-variance rewards at the start when h has unit-variance entries."""
    with torch.no_grad():
        model.score.weight.normal_(mean=0.0, std=1 / math.sqrt(model.score.in_features + 1))
        if model.score.bias is not None:
            model.score.bias.zero_()


def bias_to_shift(model) -> torch.nn.Parameter | None:
    """The parameter that adds a constant to r: the score head's bias, else the final norm's bias (GPT-2's ln_f), else None."""
    candidates = [model.score] + [getattr(model.base_model, name, None) for name in ("ln_f", "final_layer_norm", "norm")]
    return next((module.bias for module in candidates if getattr(module, "bias", None) is not None), None)


@torch.no_grad()
def shift_reward(model, shift: float) -> None:
    """r(x, y) <- r(x, y) + shift for every input, exactly.

    With a head bias: b <- b + shift. Most causal LM heads have no bias (r = w . h), but GPT-2-style
    models end in a LayerNorm h = LN(x) * gamma + beta that feeds only the head, so
    beta <- beta + shift * w / (w . w) adds w . w * shift / (w . w) = shift to every reward.
    Either way the checkpoint keeps the plain AutoModelForSequenceClassification format.
    """
    bias, weight = bias_to_shift(model), model.score.weight[0]
    bias += shift if bias is model.score.bias else shift * weight / weight.dot(weight)


def main(args: Args) -> None:
    if min(args.total_steps, args.batch_size, args.eval_every, args.max_length, args.micro_batch_size or 1) < 1 or args.lora_r < 0:
        raise ValueError("--total-steps, --batch-size, --micro-batch-size, --eval-every and --max-length must be at least 1, --lora-r >= 0")
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the number of processes, {world_size}")
    local_batch_size = args.batch_size // world_size
    micro_batch_size = min(args.micro_batch_size or local_batch_size, local_batch_size)
    train_rows, eval_rows = load_pairs(args)
    run_name = common.run_name_for(args)
    writer = common.setup_logging(args, run_name)
    common.seed_everything(args.seed)
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)

    # model: the backbone with a scalar head reading the last real token (num_labels=1)
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code, padding_side="right")
    model = common.load_model(args.model, AutoModelForSequenceClassification, args.trust_remote_code, dtype, autocast_dtype, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # saved in config.json: HF's own forward needs it to find the last token
    if not any(name.endswith("ForSequenceClassification") for name in getattr(model.config, "architectures", None) or []):
        init_reward_head(model)  # a causal LM has no score head yet: create it (a reward model checkpoint keeps its own)
    if args.shift_bias_to_zero_mean and bias_to_shift(model) is None:
        raise ValueError(f"--shift-bias-to-zero-mean: {args.model} has neither a score bias nor a final LayerNorm bias to shift")
    args.max_length = min(args.max_length, getattr(model.config, "max_position_embeddings", args.max_length))
    model.to(device)
    # LoRA adds its adapters to `model` in place (scoring below runs through them); the wrapper is what merges and saves them
    to_save = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules, "SEQ_CLS") if args.lora_r else model
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    common.broadcast_parameters(model)  # the new score head is random: every process starts from rank 0's
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(
        f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters ({sum(p.numel() for p in trainable):,} trained)"
        f" on {device} in {dtype}, autocast {autocast_dtype}"
    )

    train_pairs = [tokenize_pair(tokenizer, row, args.max_length, args.chat_template) for row in train_rows]
    eval_pairs = [tokenize_pair(tokenizer, row, args.max_length, args.chat_template)[:2] for row in eval_rows]
    num_truncated = sum(truncated for _, _, truncated in train_pairs)
    if num_truncated:
        print(f"{num_truncated} of {len(train_pairs)} training pairs were longer than --max-length {args.max_length} and cut")
    writer.add_scalar("charts/truncated_pairs", num_truncated, 0)
    train_pairs = [pair[:2] for pair in train_pairs]
    margins = torch.tensor([float(row.get("margin", 0.0)) for row in train_rows], device=device)

    # fused=True: one kernel updates every parameter tensor (the same AdamW step without a Python loop over tensors; HF Trainer's default)
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = common.linear_schedule(optimizer, args.warmup_steps, args.total_steps)  # warm-up, then linear decay to 0
    generator = torch.Generator().manual_seed(args.seed)  # the same on every process: they agree on each batch
    order = torch.randperm(len(train_pairs), generator=generator).tolist()

    start_time = time.time()
    model.train()
    for step in range(1, args.total_steps + 1):
        # sample a batch of pairs; reshuffle after each pass over the data. Each process takes its share of it.
        while len(order) < args.batch_size:
            order += torch.randperm(len(train_pairs), generator=generator).tolist()
        global_indices, order = order[: args.batch_size], order[args.batch_size :]
        batch_indices = common.shard(global_indices, rank, world_size)

        # gradient accumulation: each micro-batch adds its share (its size / the batch size) of the batch-mean losses
        optimizer.zero_grad(set_to_none=True)
        all_chosen, all_rejected = [], []
        for start in range(0, local_batch_size, micro_batch_size):
            micro_indices = batch_indices[start : start + micro_batch_size]
            batch = collate_pairs([train_pairs[i] for i in micro_indices], tokenizer.pad_token_id, device)
            chosen_rewards, rejected_rewards = score_pairs(model, batch)  # chosen and rejected in one forward pass
            preference_loss = bradley_terry_loss(chosen_rewards, rejected_rewards, margins[micro_indices])
            center_loss = center_rewards_loss(chosen_rewards, rejected_rewards)
            ((preference_loss + args.center_rewards_coefficient * center_loss) * len(micro_indices) / args.batch_size).backward()
            all_chosen.append(chosen_rewards.detach())
            all_rejected.append(rejected_rewards.detach())
        common.all_reduce_gradients(model)  # sum over processes: the gradient of the whole batch's loss
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]  # the rate of this step; scheduler.step() moves to the next step's
        optimizer.step()
        scheduler.step()

        # metrics of the whole batch (every process's pairs)
        chosen_rewards, rejected_rewards = common.all_gather(torch.cat(all_chosen)), common.all_gather(torch.cat(all_rejected))
        preference_loss = bradley_terry_loss(chosen_rewards, rejected_rewards, margins[global_indices])
        center_loss = center_rewards_loss(chosen_rewards, rejected_rewards)
        loss = preference_loss + args.center_rewards_coefficient * center_loss
        metrics = preference_metrics(chosen_rewards, rejected_rewards)
        writer.add_scalar("losses/loss", loss.item(), step)
        writer.add_scalar("losses/bradley_terry_loss", preference_loss.item(), step)
        writer.add_scalar("losses/center_rewards_loss", center_loss.item(), step)
        writer.add_scalar("losses/grad_norm", grad_norm.item(), step)
        for tag, name in {"accuracies": "accuracy", "margins": "margin", "chosen": "chosen", "rejected": "rejected"}.items():
            writer.add_scalar(f"rewards/{tag}", metrics[name], step)
        writer.add_scalar("charts/learning_rate", learning_rate, step)
        writer.add_scalar("charts/SPS", step / (time.time() - start_time), step)

        if eval_pairs and (step % args.eval_every == 0 or step == args.total_steps):  # a file of < 10 rows holds none out
            model.eval()
            eval_chosen, eval_rejected = score_dataset(model, eval_pairs, tokenizer.pad_token_id, device, micro_batch_size)
            model.train()
            eval_metrics = preference_metrics(eval_chosen, eval_rejected)
            for name in ("accuracy", "margin", "reward_mean", "reward_std"):
                writer.add_scalar(f"charts/eval_{name}", eval_metrics[name], step)
            samples = "  ".join(
                f"{row['prompt']}{row['chosen']!r} {c:+.2f} > {row['rejected']!r} {r:+.2f}"
                for row, c, r in zip(eval_rows[:2], eval_chosen.tolist(), eval_rejected.tolist())
            )
            print(
                f"step {step:5d}  loss {loss.item():.4f}  train_acc {metrics['accuracy']:.3f}  eval_accuracy {eval_metrics['accuracy']:.3f}"
                f"  eval_margin {eval_metrics['margin']:.2f}  reward {eval_metrics['reward_mean']:+.2f} +- {eval_metrics['reward_std']:.2f}"
                f"  SPS {step / (time.time() - start_time):.1f}  {samples}",
                flush=True,
            )

    if args.shift_bias_to_zero_mean:
        # r <- r - mean over the training completions, so a policy's reward starts near 0
        model.eval()
        train_chosen, train_rejected = score_dataset(model, train_pairs, tokenizer.pad_token_id, device, micro_batch_size)
        mean_reward = torch.cat([train_chosen, train_rejected]).mean().item()
        shift_reward(model, -mean_reward)
        writer.add_scalar("charts/reward_shift", -mean_reward, args.total_steps)
        print(f"shifted rewards by {-mean_reward:+.4f}: mean reward on the training completions is now 0")

    common.save_checkpoint(to_save, tokenizer, args.output_dir)
    print(f"saved {args.output_dir} after {time.time() - start_time:.0f}s")
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
    common.finish_distributed()  # under torchrun: every process leaves the group together
