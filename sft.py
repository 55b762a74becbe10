# Supervised fine-tuning (SFT): next-token cross-entropy on the completion tokens of demonstrations. See docs/sft.md.
import string
import time
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import common
import tasks

TINY_MODEL = "tiny"  # the `--model` value that builds the char-level GPT-2 from scratch instead of loading one


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
    """`auto` (mixed on a bf16 GPU, else float32), `mixed` (fp32 weights, bf16 autocast), float32, bfloat16, float16"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project_name: str = "rlhf-reference"
    """the W&B project, when --track"""
    wandb_entity: str | None = None
    """the W&B entity (team), when --track"""

    # run: output, checkpoints, resume
    output_dir: str = "checkpoints/sft"
    """where the final Hugging Face checkpoint (model + tokenizer) and the checkpoint-N folders go"""
    overwrite_output_dir: bool = False
    """write into --output-dir even if it holds files these scripts did not write (nothing of them is deleted)"""
    save_every: int = 500
    """save a checkpoint-N folder for --resume every this many steps (0: only on SIGINT/SIGTERM)"""
    keep_checkpoints: int = 2
    """checkpoint-N folders kept (the newest)"""
    resume: str | None = None
    """a checkpoint-N folder to continue from, or `auto`: the newest under --output-dir (none there: a fresh start)"""

    # model and data
    model: str = TINY_MODEL
    """a Hugging Face model id, a local checkpoint folder, or `tiny` to build a char-level GPT-2 from scratch"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    tiny_n_layer: int = 3
    """layers of the `tiny` model"""
    tiny_n_embd: int = 128
    """width of the `tiny` model"""
    tiny_n_head: int = 4
    """attention heads of the `tiny` model"""
    dataset: str = tasks.ARITHMETIC
    """`arithmetic` (built-in addition task), a prompt/completion .jsonl file, or a Hugging Face dataset id"""
    num_demonstrations: int | None = 400
    """N demonstrations, cycled: on arithmetic N distinct problems, on a file its first N rows (all when it has fewer);
    None: every row, and on arithmetic a new problem for every example"""
    eval_dataset: str | None = None
    """a prompt/answer .jsonl file of held-out problems for the greedy accuracy (None: the arithmetic test split)"""
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
    """prompt + completion tokens kept per example (at most the model's positions); longer ones are cut at the end"""

    # SFT hyper-parameters
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
    """tokens generated at evaluation (None: digits + 2 on arithmetic, else 64; at most half the model's positions)"""

    # memory savers
    micro_batch_size: int | None = None
    """examples per forward/backward pass; gradients accumulate over the batch (None: this process's whole batch)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them: less memory, more compute"""
    lora_r: int = 0
    """rank of LoRA adapters (needs peft); 0 trains every weight"""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A to each target weight"""
    lora_target_modules: str = "all-linear"
    """comma-separated module names that get adapters, or `all-linear`"""


# ----------------------------------------------------------------------------- the math of SFT
def tokenize_example(tokenizer, row: dict, max_length: int, chat_template: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): prompt and completion tokenised separately, EOS appended, prompt labels -100."""
    prompt_ids = common.tokenize_prompt(tokenizer, row["prompt"], chat_template)
    completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
    return input_ids, labels, len(prompt_ids) + len(completion_ids) > max_length


def sft_loss(model, batch: dict, num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """L = -(1/|C|) sum_{t in C} log pi(y_t | y_<t): mean negative log-likelihood over the completion tokens C only
    (labels not -100, shifted by one). `num_tokens`: |C| of a whole batch that arrives in parts, so the parts add up."""
    mask = batch["attention_mask"]
    position_ids = common.position_ids_from_mask(mask)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids).logits
    targets = batch["labels"][:, 1:]  # the logits at position t predict token t + 1
    loss_mask = targets != -100
    logprobs = common.token_logprobs(logits[:, :-1], targets.clamp(min=0))
    num_tokens = loss_mask.sum() if num_tokens is None else num_tokens
    return -(logprobs * loss_mask).sum() / num_tokens.clamp(min=1)


# ----------------------------------------------------------------------------- the update
def sft_step(model, optimizer, scheduler, micro_batches: list[dict], num_tokens, max_grad_norm: float) -> dict:
    """One optimizer step; each micro-batch's loss is divided by |C| of the whole batch (all processes' shares)."""
    num_tokens = common.all_reduce_sum(num_tokens)
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for micro_batch in micro_batches:
        micro_loss = sft_loss(model, micro_batch, num_tokens)
        micro_loss.backward()
        loss += micro_loss.detach()
    loss = common.all_reduce_sum(loss)
    common.all_reduce_gradients(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    learning_rate = scheduler.get_last_lr()[0]  # the rate of this step; scheduler.step() moves to the next step's
    optimizer.step()
    scheduler.step()
    return {"losses/sft_loss": loss.item(), "losses/grad_norm": grad_norm.item(), "charts/learning_rate": learning_rate}


# ----------------------------------------------------------------------------- plumbing a learner may skip: the tiny
# model, flags, loading, batching, evaluation
def build_tiny_tokenizer(padding_side: str = "left"):
    """A char-level tokenizer: one token per printable ASCII character, plus <pad>, <eos> and <unk>."""
    characters = list(string.digits + string.ascii_letters + string.punctuation + " \n")
    vocab = {token: index for index, token in enumerate(["<pad>", "<eos>", "<unk>"] + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # joins characters without the spaces a word-level decoder would insert
    specials = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", clean_up_tokenization_spaces=False)
    # a transformers fast tokenizer: save_pretrained / AutoTokenizer.from_pretrained round-trip it
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=padding_side, **specials)


def build_tiny_gpt2(tokenizer, n_layer: int = 3, n_embd: int = 128, n_head: int = 4, n_positions: int = 64):
    """A small randomly initialised GPT-2 (about 0.6M parameters at the defaults) with dropout off."""
    sizes = dict(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(GPT2Config(**sizes, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, **no_dropout))


def validate(args: Args) -> None:  # every flag, before anything is loaded: one line naming it (None is the default)
    minimums = dict(
        total_steps=1, batch_size=1, micro_batch_size=1, eval_every=1, eval_size=0, warmup_steps=0, digits=1
    )
    minimums |= dict(max_length=1, max_new_tokens=1, num_demonstrations=1, lora_r=0, save_every=0, keep_checkpoints=1)
    common.check_minimums(args, **minimums)


def load_policy(args: Args, dtype, autocast_dtype, device):
    """(model in train mode, tokenizer), LoRA and gradient checkpointing when asked, the same weights everywhere."""
    if args.model == TINY_MODEL:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_gpt2(tokenizer, args.tiny_n_layer, args.tiny_n_embd, args.tiny_n_head).to(dtype)
    else:
        tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
        model = common.load_model(args.model, AutoModelForCausalLM, args.trust_remote_code, dtype)
    model = common.enable_autocast(model.to(device), autocast_dtype)
    model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules) if args.lora_r else model
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    common.broadcast_parameters(model)
    print(f"{args.model}: {model.num_parameters(only_trainable=True):,} trained parameters on {device} in {dtype}")
    return model.train(), tokenizer


def load_demonstrations(args: Args) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): --num-demonstrations distinct problems on arithmetic, the first that many
    training rows of a file (all of them when it has fewer), or with None every row (arithmetic: a fresh stream)."""
    columns = {"prompt": args.prompt_field, "completion": args.completion_field}
    options = dict(digits=args.digits, seed=args.seed, held_out=args.eval_size, hf_split=args.hf_split, columns=columns)
    stream = args.total_steps * args.batch_size if args.num_demonstrations is None else 0  # a new problem per example
    train_rows, held_out_rows = tasks.load_rows(args.dataset, "sft", num_rows=stream, **options)
    if args.num_demonstrations is not None and args.dataset == tasks.ARITHMETIC:
        train_rows = tasks.arithmetic_demonstrations(args.num_demonstrations, args.digits)  # one set, whatever --seed
    return train_rows[: args.num_demonstrations], held_out_rows


def tokenize_rows(tokenizer, rows: list[dict], max_length: int, chat_template: bool, what: str):
    """(examples, number cut): each row's (input_ids, labels) cut at max_length, those left with no target dropped."""
    tokenized = [tokenize_example(tokenizer, row, max_length, chat_template) for row in rows]
    examples = [(ids, labels) for ids, labels, _ in tokenized if any(label != -100 for label in labels[1:])]
    num_cut, limit = sum(cut for *_, cut in tokenized), f"{max_length} tokens (--max-length or the model's positions)"
    if num_cut:  # cut before its first completion token, a row would train on nothing: it is dropped
        print(f"{what}: {num_cut} of {len(rows)} examples cut at {limit}, {len(rows) - len(examples)} dropped")
    if rows and not examples:
        raise ValueError(f"{what}: no example keeps a completion token within {limit}")
    return examples, num_cut


def collate(examples: list[tuple[list[int], list[int]]], pad_token_id: int, device) -> dict:
    """Right-pad a batch: input_ids, attention_mask, labels (-100 on prompt and padding)."""

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], True, value).to(device)

    ids, labels = zip(*examples)
    mask = [[1] * len(row) for row in ids]
    return {"input_ids": pad(ids, pad_token_id), "attention_mask": pad(mask, 0), "labels": pad(labels, -100)}


def micro_batches(examples: list, size: int, pad_token_id: int, device) -> tuple[list[dict], torch.Tensor]:
    """(the examples collated `size` at a time, |C|: the completion tokens they predict)."""
    batches = [collate(examples[i : i + size], pad_token_id, device) for i in range(0, len(examples), size)]
    return batches, sum((batch["labels"][:, 1:] != -100).sum() for batch in batches)


# the console line of an evaluation: these metrics, in this order
PROGRESS = {"losses/sft_loss": "loss {:.4f}", "charts/eval_loss": "eval_loss {:.4f}", "charts/SPS": "SPS {:.1f}"}
PROGRESS["charts/eval_accuracy"] = "eval_accuracy {:.3f}"


@torch.no_grad()
def evaluate(model, tokenizer, eval_batches, eval_tokens, problems, max_new_tokens: int, args: Args, metrics: dict):
    """Add L over every held-out completion token and the greedy accuracy to `metrics`; return the console line."""
    model.eval()
    if eval_batches:
        metrics["charts/eval_loss"] = sum(sft_loss(model, batch, eval_tokens).item() for batch in eval_batches)
    samples = ""
    if problems:
        reward_fn = tasks.eval_reward(args.dataset)
        metrics["charts/eval_accuracy"], completions = common.evaluate_accuracy(
            model, tokenizer, problems, max_new_tokens, chat_template=args.chat_template, reward_fn=reward_fn
        )
        samples = "  samples: " + "  ".join(f"{row['prompt']}{text!r}" for row, text in zip(problems[:3], completions))
    model.train()
    return "  ".join(text.format(metrics[tag]) for tag, text in PROGRESS.items() if tag in metrics) + samples


# ----------------------------------------------------------------------------- main
def main(args: Args) -> None:
    validate(args)
    common.check_output_dir(args.output_dir, args.overwrite_output_dir)
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the number of processes ({world_size})")
    common.seed_everything(args.seed)
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)
    model, tokenizer = load_policy(args, dtype, autocast_dtype, device)
    positions, pad_token_id = common.max_positions(model), tokenizer.pad_token_id

    # the demonstrations; held-out examples (loss) and problems (greedy accuracy)
    train_rows, held_out_rows = load_demonstrations(args)
    max_length = min(args.max_length, positions)  # a longer sequence would be an index error in the embedding
    examples, num_cut = tokenize_rows(tokenizer, train_rows, max_length, args.chat_template, "training")
    print(f"training on {len(examples)} examples, {len({tuple(ids) for ids, _ in examples})} distinct demonstrations")
    eval_examples, _ = tokenize_rows(tokenizer, held_out_rows, max_length, args.chat_template, "held-out")
    micro_batch_size = min(args.batch_size // world_size, args.micro_batch_size or args.batch_size)  # validated >= 1
    eval_batches, eval_tokens = micro_batches(eval_examples, micro_batch_size, pad_token_id, device)
    default_new_tokens = args.digits + 2 if args.dataset == tasks.ARITHMETIC else 64
    max_new_tokens = min(default_new_tokens, positions // 2) if args.max_new_tokens is None else args.max_new_tokens
    problems = tasks.eval_problems(args.dataset, args.eval_dataset, args.digits, args.eval_size)
    problems = common.fit_prompts(tokenizer, problems, args.chat_template, positions - max_new_tokens, "eval problems")

    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = common.linear_schedule(optimizer, args.warmup_steps, args.total_steps)
    generator = torch.Generator().manual_seed(args.seed)  # the same on every process: they agree on each batch
    order = torch.randperm(len(examples), generator=generator).tolist()
    start_step, checkpoint = 0, common.find_checkpoint(args.resume, args.output_dir)
    if checkpoint is not None:
        start_step, data = common.load_checkpoint(checkpoint, {"policy": model}, optimizer, scheduler, args)
        order = data["order"]
        generator.set_state(data["generator"])
    writer = common.setup_logging(args, common.run_name_for(args))
    writer.add_scalar("charts/truncated_examples", num_cut, 0)

    start_time = time.time()
    with common.stop_on_signal() as stop:
        for step in range(start_step + 1, args.total_steps + 1):
            # a batch of demonstrations, reshuffled after each pass over them; each process takes its share
            while len(order) < args.batch_size:
                order += torch.randperm(len(examples), generator=generator).tolist()
            indices, order = common.shard(order[: args.batch_size], rank, world_size), order[args.batch_size :]
            batch, num_tokens = micro_batches([examples[i] for i in indices], micro_batch_size, pad_token_id, device)
            metrics = sft_step(model, optimizer, scheduler, batch, num_tokens, args.max_grad_norm)
            metrics["charts/SPS"] = (step - start_step) / (time.time() - start_time)
            if (eval_batches or problems) and (step % args.eval_every == 0 or step == args.total_steps):
                line = evaluate(model, tokenizer, eval_batches, eval_tokens, problems, max_new_tokens, args, metrics)
                print(f"step {step:5d}  {line}", flush=True)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
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
