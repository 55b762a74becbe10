# Supervised fine-tuning (SFT): next-token cross-entropy on completion tokens only. README.md, section "SFT".
import time
from dataclasses import dataclass

import torch
import tyro
from transformers import AutoModelForCausalLM

import common


@dataclass
class Args:
    # experiment
    exp_name: str = "sft"
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
    output_dir: str = "checkpoints/sft"
    """where the final Hugging Face checkpoint (model + tokenizer) is written"""

    # model and data
    model: str = common.TINY_MODEL
    """a Hugging Face model id, a local checkpoint folder, or `tiny` to build a char-level GPT-2 from scratch"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    tiny_n_layer: int = 3
    """layers of the `tiny` model"""
    tiny_n_embd: int = 128
    """width of the `tiny` model"""
    tiny_n_head: int = 4
    """attention heads of the `tiny` model"""
    dataset: str = "arithmetic"
    """`arithmetic` (built-in addition task), a prompt/completion .jsonl file, or a Hugging Face dataset id"""
    digits: int = 2
    """operand digits of the arithmetic task"""
    hf_split: str = "train"
    """split of a Hugging Face dataset"""
    prompt_field: str = "prompt"
    """prompt column of a Hugging Face dataset"""
    completion_field: str = "completion"
    """completion column of a Hugging Face dataset"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (when it has one)"""
    max_length: int = 512
    """prompt + completion tokens kept per example; longer ones are cut at the end (and counted)"""

    # memory (README.md, "Scaling up")
    micro_batch_size: int | None = None
    """examples per forward/backward pass; gradients accumulate over the batch (default: the whole batch of this process)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them: less memory, more compute"""
    lora_r: int = 0
    """rank of LoRA adapters (needs peft); 0 trains every weight"""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A to each target weight"""
    lora_target_modules: str = "all-linear"
    """comma-separated module names that get adapters, or `all-linear`"""

    # optimisation
    total_steps: int = 2000
    """optimizer steps"""
    batch_size: int = 64
    """examples per step, over all processes"""
    learning_rate: float = 1e-3
    """peak learning rate of AdamW"""
    warmup_steps: int = 50
    """linear warm-up steps, then linear decay to 0"""
    weight_decay: float = 0.1
    """AdamW weight decay (decoupled: each step shrinks every weight by learning_rate * weight_decay)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    eval_every: int = 250
    """evaluate every this many steps (and at the end)"""
    eval_size: int = 500
    """held-out examples to evaluate on"""
    max_new_tokens: int | None = None
    """tokens generated at evaluation; default digits + 2 on arithmetic"""


def load_rows(args: Args) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of {"prompt", "completion"} (plus "answer" on arithmetic)."""
    if args.dataset == "arithmetic":
        train = common.arithmetic_problems(args.total_steps * args.batch_size, args.digits, "train", seed=args.seed)
        test = common.arithmetic_eval_set(args.eval_size, args.digits)
        return [{**row, "completion": row["answer"]} for row in train], [{**row, "completion": row["answer"]} for row in test]
    if args.dataset.endswith(".jsonl"):
        rows = common.read_jsonl(args.dataset, ("prompt", "completion"))
    else:
        rows = common.load_hf_dataset(args.dataset, args.hf_split, {"prompt": args.prompt_field, "completion": args.completion_field})
    held_out = min(args.eval_size, len(rows) // 10)
    return rows[held_out:], rows[:held_out]


def tokenize_example(tokenizer, row: dict, max_length: int, chat_template: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): prompt and completion tokenised separately, EOS appended, prompt labels -100."""
    prompt_ids = common.tokenize_prompt(tokenizer, row["prompt"], chat_template)
    completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
    return input_ids, labels, len(prompt_ids) + len(completion_ids) > max_length


def collate(examples: list[tuple[list[int], list[int]]], pad_token_id: int, device) -> dict:
    """Right-pad a batch: input_ids, attention_mask, labels (-100 on prompt and padding)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def sft_loss(model, batch: dict, num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """L = -(1/|C|) sum_{t in C} log pi(y_t | y_<t): mean negative log-likelihood over completion tokens C only.

    Logits at position t predict token t+1, so log-probs are taken of the inputs shifted by one;
    prompt and padding positions carry the label -100 and are masked out. With gradient accumulation or
    several processes pass |C| of the whole batch as `num_tokens`, so the parts add up to the batch loss.
    """
    attention_mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=common.position_ids_from_mask(attention_mask)
    ).logits
    targets = batch["labels"][:, 1:]
    loss_mask = targets != -100
    logprobs = common.token_logprobs(logits[:, :-1], targets.clamp(min=0))
    num_tokens = loss_mask.sum() if num_tokens is None else num_tokens
    return -(logprobs * loss_mask).sum() / num_tokens.clamp(min=1)


def main(args: Args) -> None:
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    if (
        args.batch_size < 1
        or args.batch_size % world_size
        or (args.micro_batch_size is not None and args.micro_batch_size < 1)
        or args.lora_r < 0
    ):
        raise ValueError(
            f"--batch-size {args.batch_size} must be >= 1 and divide by the number of processes ({world_size}), "
            f"--micro-batch-size {args.micro_batch_size} >= 1, --lora-r {args.lora_r} >= 0"
        )
    local_batch_size = args.batch_size // world_size
    micro_batch_size = min(args.micro_batch_size or local_batch_size, local_batch_size)
    run_name = common.run_name_for(args)
    writer = common.setup_logging(args, run_name)
    common.seed_everything(args.seed)
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)

    # model and tokenizer: built from scratch for `tiny`, loaded otherwise
    if args.model == common.TINY_MODEL:
        tokenizer = common.build_tiny_tokenizer()
        model = common.build_tiny_gpt2(tokenizer, args.tiny_n_layer, args.tiny_n_embd, args.tiny_n_head).to(dtype)
        common.enable_autocast(model, autocast_dtype)
    else:
        tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
        model = common.load_model(args.model, AutoModelForCausalLM, args.trust_remote_code, dtype, autocast_dtype)
    # sequences longer than the position table are cut (and counted), not an index error in the embedding
    args.max_length = min(args.max_length, getattr(model.config, "max_position_embeddings", args.max_length))
    model.to(device)
    if args.lora_r:
        model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    common.broadcast_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters ({trainable:,} trained) on {device} in {dtype}, autocast {autocast_dtype}"
    )

    train_rows, eval_rows = load_rows(args)
    tokenized = [tokenize_example(tokenizer, row, args.max_length, args.chat_template) for row in train_rows]
    eval_tokenized = [tokenize_example(tokenizer, row, args.max_length, args.chat_template) for row in eval_rows]
    num_truncated = sum(truncated for _, _, truncated in tokenized)
    if num_truncated:
        print(f"{num_truncated} of {len(tokenized)} training examples were longer than --max-length {args.max_length} and cut")
    writer.add_scalar("charts/truncated_examples", num_truncated, 0)
    max_new_tokens = args.max_new_tokens or (args.digits + 2 if args.dataset == "arithmetic" else 64)

    # fused=True: one kernel updates every parameter tensor (the same AdamW step without a Python loop over tensors; HF Trainer's default)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay, fused=True
    )
    scheduler = common.linear_schedule(optimizer, args.warmup_steps, args.total_steps)  # warm-up, then linear decay to 0
    generator = torch.Generator().manual_seed(args.seed)  # the same on every process: they agree on each batch
    order = torch.randperm(len(tokenized), generator=generator).tolist()

    start_time = time.time()
    model.train()
    for step in range(1, args.total_steps + 1):
        # sample a batch; reshuffle after each pass over the data. Each process takes its share of it.
        while len(order) < args.batch_size:
            order += torch.randperm(len(tokenized), generator=generator).tolist()
        batch_indices, order = common.shard(order[: args.batch_size], rank, world_size), order[args.batch_size :]
        # |C| of the whole batch, every process's share: the completion tokens that are predicted (labels after the shift)
        num_tokens = sum(sum(label != -100 for label in tokenized[i][1][1:]) for i in batch_indices)
        num_tokens = common.all_reduce_sum(torch.tensor(num_tokens, device=device))

        # gradient accumulation: each micro-batch's loss is normalised by the whole batch's |C|, so they add up to L
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for start in range(0, local_batch_size, micro_batch_size):
            micro_batch = collate(
                [tokenized[i][:2] for i in batch_indices[start : start + micro_batch_size]], tokenizer.pad_token_id, device
            )
            micro_loss = sft_loss(model, micro_batch, num_tokens)
            micro_loss.backward()
            loss += micro_loss.detach()
        loss = common.all_reduce_sum(loss)
        common.all_reduce_gradients(model)  # sum over processes: the gradient of the whole batch's loss
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]  # the rate of this step; scheduler.step() moves to the next step's
        optimizer.step()
        scheduler.step()

        writer.add_scalar("losses/sft_loss", loss.item(), step)
        writer.add_scalar("losses/grad_norm", grad_norm.item(), step)
        writer.add_scalar("charts/learning_rate", learning_rate, step)
        writer.add_scalar("charts/SPS", step / (time.time() - start_time), step)

        if eval_tokenized and (step % args.eval_every == 0 or step == args.total_steps):  # a file of < 10 rows holds none out
            model.eval()
            with torch.no_grad():  # the mean over every held-out completion token: each batch's loss is normalised by their count
                eval_tokens = torch.tensor(sum(label != -100 for _, labels, _ in eval_tokenized for label in labels[1:]), device=device)
                eval_loss = sum(
                    sft_loss(
                        model,
                        collate([e[:2] for e in eval_tokenized[i : i + micro_batch_size]], tokenizer.pad_token_id, device),
                        eval_tokens,
                    ).item()
                    for i in range(0, len(eval_tokenized), micro_batch_size)
                )
            writer.add_scalar("charts/eval_loss", eval_loss, step)
            line = f"step {step:5d}  loss {loss.item():.4f}  eval_loss {eval_loss:.4f}  SPS {step / (time.time() - start_time):.1f}"
            if args.dataset == "arithmetic":
                accuracy, completions = common.evaluate_accuracy(
                    model, tokenizer, eval_rows, max_new_tokens, chat_template=args.chat_template
                )
                writer.add_scalar("charts/eval_accuracy", accuracy, step)
                samples = "  ".join(f"{row['prompt']}{text!r}" for row, text in zip(eval_rows[:3], completions))
                line += f"  eval_accuracy {accuracy:.3f}  samples: {samples}"
            print(line, flush=True)
            model.train()

    common.save_checkpoint(model, tokenizer, args.output_dir)
    print(f"saved {args.output_dir} after {time.time() - start_time:.0f}s")
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
    common.finish_distributed()  # under torchrun: every process leaves the group together
