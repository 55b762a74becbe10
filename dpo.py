# Direct Preference Optimization (DPO): offline preference pairs, no reward model, no critic, no rollouts.
# docs/dpo.md explains the algorithm, its flags and its implementation details.
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import common
import tasks


@dataclass
class Args:
    # experiment
    exp_name: str = "dpo"
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
    output_dir: str = "checkpoints/dpo"
    """where the final Hugging Face checkpoint (model + tokenizer) and the checkpoint-N folders go"""
    overwrite_output_dir: bool = False
    """write into --output-dir even if it holds files these scripts did not write (nothing of them is deleted)"""
    save_every: int = 500
    """save a checkpoint-N folder for --resume every this many steps (0: only on SIGINT/SIGTERM)"""
    keep_checkpoints: int = 2
    """checkpoint-N folders kept (the newest)"""
    resume: str | None = None
    """a checkpoint-N folder to continue from, or `auto`: the newest under --output-dir (a fresh start when none)"""

    # model and data
    model: str = "checkpoints/sft"
    """the starting policy, also the frozen reference pi_ref: a Hugging Face model id or a local checkpoint folder"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    dataset: str = "arithmetic"
    """`arithmetic` (correct sum chosen, a near miss rejected), a prompt/chosen/rejected .jsonl file or a hub dataset"""
    digits: int = 2
    """operand digits of the arithmetic task"""
    num_pairs: int = 10000
    """arithmetic: preference pairs generated (training cycles through them)"""
    rejected_from_model: bool = False
    """arithmetic: where the starting model's greedy answer is wrong, reject that answer instead of the near miss"""
    hf_split: str = "train"
    """split of a Hugging Face dataset"""
    prompt_field: str = "prompt"
    """prompt column of a Hugging Face dataset"""
    chosen_field: str = "chosen"
    """chosen (preferred) completion column of a Hugging Face dataset"""
    rejected_field: str = "rejected"
    """rejected completion column of a Hugging Face dataset"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template (when it has one)"""
    max_length: int = 512
    """prompt + completion tokens kept per sequence (at most the model's positions); longer completions are cut"""
    eval_every: int = 250
    """evaluate held-out greedy accuracy every this many steps, before training and at the end"""
    eval_size: int = 500
    """held-out problems to evaluate on"""
    eval_dataset: str | None = None
    """a prompt/answer .jsonl file of held-out problems (default: the arithmetic test split; none for other data)"""
    max_new_tokens: int | None = None
    """tokens generated at evaluation; default digits + 2 on arithmetic, else min(64, the model's positions / 2)"""

    # the algorithm
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid (DPO), ipo (squared loss on length-normalised log-ratios) or hinge (SLiC)"""
    beta: float = 0.1
    """strength of the implicit KL penalty toward the reference; implicit reward = beta * log(pi / pi_ref)"""
    label_smoothing: float = 0.0
    """eps of conservative DPO (sigmoid loss only): the probability that a pair's label is flipped, in [0, 0.5)"""
    sft_coef: float = 1.0
    """weight of the per-token NLL of the chosen completions added to the loss; 0 is plain DPO"""
    keep_reference_model: bool = False
    """run a frozen reference model every step instead of precomputing its log-probs once"""

    # optimisation
    total_steps: int = 3000
    """optimizer steps"""
    batch_size: int = 32
    """preference pairs per step, over all processes (the forward pass holds twice as many sequences)"""
    learning_rate: float = 3e-4
    """peak learning rate of AdamW; below SFT's, since larger rates first break the model (docs/dpo.md)"""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default; TRL's DPOTrainer uses 0)"""
    warmup_steps: int = 20
    """linear warm-up steps, then linear decay to 0"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # memory savers
    micro_batch_size: int | None = None
    """pairs per forward/backward pass; gradients accumulate over the batch (default: this process's whole batch)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them: less memory, more compute"""
    lora_r: int = 0
    """rank of LoRA adapters (needs peft); 0 trains every weight. The reference is then the model, adapters off"""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A to each target weight"""
    lora_target_modules: str = "all-linear"
    """comma-separated module names that get adapters, or `all-linear`"""


# ============================================================================= the math of DPO
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen_rewards, rejected_rewards) per pair, the implicit rewards r(x, y) = beta * log(pi(y|x) /
    pi_ref(y|x)), with h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)):
      sigmoid: L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)  (eps = label_smoothing; eps = 0 is DPO)
      ipo:     L = (h_bar - 1 / (2 beta))^2, h_bar built from length-normalised log-ratios (divided by their tokens)
      hinge:   L = max(0, 1 - beta h)
    At policy == reference (h = 0) they equal log 2, 1 / (4 beta^2) and 1."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        h_bar = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (h_bar - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type must be sigmoid, ipo or hinge; got {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def chosen_nll(policy_chosen_logps, chosen_lengths, num_tokens=None) -> torch.Tensor:
    """L_SFT = -(sum_i log pi(y_w,i | x_i)) / (sum_i |y_w,i|), summed over the whole batch's `num_tokens`."""
    num_tokens = chosen_lengths.sum() if num_tokens is None else num_tokens
    return -policy_chosen_logps.sum() / num_tokens.clamp(min=1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum_{t in C} log pi(y_t | x, y_<t) over the completion positions C only; shape (batch,)."""
    logprobs = common.token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return torch.where(completion_mask[:, 1:].bool(), logprobs, 0.0).sum(-1)


# ============================================================================= the pairs as tokens, their log-probs
def tokenize_pair(tokenizer, row: dict, max_length: int, chat_template: bool) -> tuple:
    """(prompt_ids, chosen_ids, rejected_ids, truncated): tokenised apart, EOS after each completion, cut to fit."""
    prompt_ids = common.tokenize_prompt(tokenizer, row["prompt"], chat_template)[:max_length]
    chosen_ids = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rejected_ids = tokenizer(row["rejected"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    return prompt_ids, chosen_ids[:room], rejected_ids[:room], max(len(chosen_ids), len(rejected_ids)) > room


def rejected_from_model(model, tokenizer, pairs: list[dict], max_new_tokens: int, chat_template: bool) -> list[dict]:
    """The pairs with the rejected completion replaced by the model's own greedy answer where that one is wrong."""
    problems = [{**pair, "answer": pair["chosen"]} for pair in pairs]
    _, answers = common.evaluate_accuracy(model, tokenizer, problems, max_new_tokens, chat_template=chat_template)
    own = sum(answer != pair["chosen"] for pair, answer in zip(pairs, answers))
    print(f"{own} of {len(pairs)} rejected answers are the model's own")
    return [{**pair, "rejected": answer} if answer != pair["chosen"] else pair for pair, answer in zip(pairs, answers)]


def collate(pairs: list[tuple], pad_token_id: int, device) -> dict:
    """A right-padded batch: the B prompt + chosen rows, then the B prompt + rejected rows, and completion_mask."""
    sequences = [(pair[0], pair[1]) for pair in pairs] + [(pair[0], pair[2]) for pair in pairs]
    length = max(len(prompt) + len(completion) for prompt, completion in sequences)
    rows = {"input_ids": [], "attention_mask": [], "completion_mask": []}
    for prompt, completion in sequences:
        padding = length - len(prompt) - len(completion)
        rows["input_ids"].append(prompt + completion + [pad_token_id] * padding)
        rows["attention_mask"].append([1] * (len(prompt) + len(completion)) + [0] * padding)
        rows["completion_mask"].append([0] * len(prompt) + [1] * len(completion) + [0] * padding)
    return {key: torch.tensor(values, device=device) for key, values in rows.items()}


def concatenated_forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_w|x), log pi(y_l|x)) of the B pairs of a `collate` batch, from one forward pass over its 2B rows."""
    mask, position_ids = batch["attention_mask"], common.position_ids_from_mask(batch["attention_mask"])
    # logits only from the first position that predicts a completion token on: the vocabulary projection of the
    # prompt positions is a large share of the step's work and none of them enters log pi(y|x)
    first = max(int(batch["completion_mask"].any(dim=0).int().argmax()) - 1, 0)  # argmax: the first True column
    inputs = dict(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids)
    logits = model(**inputs, logits_to_keep=batch["input_ids"].size(1) - first).logits
    return sequence_logprobs(logits, batch["input_ids"][:, first:], batch["completion_mask"][:, first:]).chunk(2)


@torch.no_grad()
def reference_logprobs(model, pairs: list[tuple], indices: list[int], batch_size: int, pad_token_id: int, device):
    """(log pi_ref(y_w|x), log pi_ref(y_l|x)) of the pairs at `indices`, NaN at the others (never trained on); under
    torchrun each process computes a share."""
    rank, world_size = common.world()
    share = math.ceil(len(indices) / world_size)
    own_pairs = [pairs[i] for i in indices[rank * share : (rank + 1) * share]]  # the last share may be short or empty
    own_logps = torch.zeros(share, 2, device=device)  # `share` rows on every process: all_gather needs one shape
    for start in range(0, len(own_pairs), batch_size):
        batch = collate(own_pairs[start : start + batch_size], pad_token_id, device)
        logps = torch.stack(concatenated_forward(model, batch), dim=1)
        own_logps[start : start + len(logps)] = logps
    all_logps = torch.full((len(pairs), 2), math.nan, device=device)
    all_logps[indices] = common.all_gather(own_logps)[: len(indices)]
    return all_logps[:, 0], all_logps[:, 1]


# ============================================================================= the update
def update(model, reference, optimizer, scheduler, pairs, indices, args, micro_batch_size, pad_token_id) -> dict:
    """One optimizer step on this process's `indices` of the batch: L = mean_pairs(L_DPO) + sft_coef * L_SFT, summed
    over micro-batches whose parts are normalised by the whole batch, so the parts (and processes) add up to L."""
    device = model.device
    num_chosen_tokens = common.all_reduce_sum(torch.tensor(sum(len(pairs[i][1]) for i in indices), device=device))
    optimizer.zero_grad(set_to_none=True)
    per_pair = {"logps/chosen": [], "logps/rejected": [], "rewards/chosen": [], "rewards/rejected": []}
    preference_loss = sft_loss = 0.0
    for start in range(0, len(indices), micro_batch_size):
        micro_indices = indices[start : start + micro_batch_size]
        batch = collate([pairs[i] for i in micro_indices], pad_token_id, device)
        chosen_lengths, rejected_lengths = batch["completion_mask"].sum(-1).chunk(2)
        policy_chosen_logps, policy_rejected_logps = concatenated_forward(model, batch)
        if isinstance(reference, tuple):  # log pi_ref of every pair, precomputed
            ref_chosen_logps, ref_rejected_logps = reference[0][micro_indices], reference[1][micro_indices]
        else:  # a frozen model (with LoRA: the policy, adapters off)
            with torch.no_grad(), model.disable_adapter() if reference is model else contextlib.nullcontext():
                ref_chosen_logps, ref_rejected_logps = concatenated_forward(reference, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            beta=args.beta,
            loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        micro_preference_loss = losses.sum() / args.batch_size
        micro_sft_loss = chosen_nll(policy_chosen_logps, chosen_lengths, num_tokens=num_chosen_tokens)
        (micro_preference_loss + args.sft_coef * micro_sft_loss).backward()
        preference_loss, sft_loss = preference_loss + micro_preference_loss.detach(), sft_loss + micro_sft_loss.detach()
        for key, value in zip(per_pair, (policy_chosen_logps, policy_rejected_logps, chosen_rewards, rejected_rewards)):
            per_pair[key].append(value.detach())
    common.all_reduce_gradients(model)  # sum over processes: the gradient of the whole batch's loss
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    learning_rate = scheduler.get_last_lr()[0]  # this step's rate; scheduler.step() moves to the next step's
    optimizer.step()
    scheduler.step()
    metrics = {key: common.all_gather(torch.cat(values)) for key, values in per_pair.items()}
    margins = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics = {key: values.mean().item() for key, values in metrics.items()} | {
        "losses/dpo_loss": common.all_reduce_sum(preference_loss).item(),
        "losses/sft_loss": common.all_reduce_sum(sft_loss).item(),
        "losses/grad_norm": grad_norm.item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "rewards/margins": margins.mean().item(),
    }
    return metrics | {"charts/learning_rate": learning_rate}


# ----------------------------------------------------------------------------- plumbing a learner may skip: checks,
# ----------------------------------------------------------------------------- loading, evaluation
def validate(args: Args) -> None:
    """Every flag checked before anything is loaded: one clear line for the first that cannot work."""
    if args.loss_type not in ("sigmoid", "ipo", "hinge"):
        raise ValueError(f"--loss-type must be sigmoid, ipo or hinge; got {args.loss_type!r}")
    if args.beta <= 0:
        raise ValueError(f"--beta must be > 0; got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5); got {args.label_smoothing}")
    if args.label_smoothing > 0 and args.loss_type != "sigmoid":
        raise ValueError(f"--label-smoothing applies to --loss-type sigmoid only; got --loss-type {args.loss_type}")
    if args.rejected_from_model and args.dataset != tasks.ARITHMETIC:
        raise ValueError("--rejected-from-model needs --dataset arithmetic")
    minimum = dict(total_steps=1, batch_size=1, micro_batch_size=1, num_pairs=1, max_length=1, eval_every=1)
    minimum |= dict(
        eval_size=1, max_new_tokens=1, keep_checkpoints=1, save_every=0, warmup_steps=0, lora_r=0, sft_coef=0
    )
    common.check_minimums(args, **minimum, digits=1)


def load_policy(args: Args, device, dtype, autocast_dtype):
    """(tokenizer, policy pi_theta): the starting model, with LoRA adapters and gradient checkpointing when asked."""
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    model = common.load_model(args.model, None, args.trust_remote_code, dtype, autocast_dtype).to(device)
    if args.lora_r:
        model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    common.broadcast_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters ({trainable:,} trained) on {device}"
        f" in {dtype}, autocast {autocast_dtype}"
    )
    return tokenizer, model


def load_pairs(args: Args, model, tokenizer, max_length: int, max_new_tokens: int) -> tuple[list[tuple], int]:
    """(the training pairs as token ids, how many were cut); a pair left without a completion is dropped."""
    columns = {"prompt": args.prompt_field, "chosen": args.chosen_field, "rejected": args.rejected_field}
    options = dict(num_rows=args.num_pairs, digits=args.digits, seed=args.seed, hf_split=args.hf_split, columns=columns)
    rows, _ = tasks.load_rows(args.dataset, "pairs", held_out=0, **options)  # DPO trains on every pair
    if args.rejected_from_model:
        rows = rejected_from_model(model, tokenizer, rows, max_new_tokens, args.chat_template)
    tokenized = [tokenize_pair(tokenizer, row, max_length, args.chat_template) for row in rows]
    empty = next((number for number, (prompt_ids, *_) in enumerate(tokenized, start=1) if not prompt_ids), None)
    if empty is not None:  # log pi(y_1|x) needs a prompt token to be predicted from
        raise ValueError(f"{args.dataset}: pair {empty} (counting non-blank lines) has an empty prompt")
    kept = [pair for pair in tokenized if pair[1] and pair[2]]
    dropped = len(tokenized) - len(kept)  # pairs that would train on nothing
    if dropped:
        print(f"dropped {dropped} of {len(tokenized)} pairs: their prompt fills --max-length {max_length}")
    if not kept:
        raise ValueError(f"{args.dataset}: no pair left, every prompt fills --max-length {max_length}")
    num_truncated = sum(truncated for *_, truncated in kept)
    if num_truncated:
        print(f"{num_truncated} of {len(kept)} pairs had a completion cut to fit --max-length {max_length}")
    return [pair[:3] for pair in kept], num_truncated


def evaluate(model, tokenizer, eval_rows, max_new_tokens, args: Args, writer, step: int) -> str:
    """Held-out greedy accuracy, logged as charts/eval_accuracy; returns its part of the console line."""
    if not eval_rows:
        return ""
    reward_fn, chat_template = tasks.eval_reward(args.dataset), args.chat_template
    accuracy, completions = common.evaluate_accuracy(
        model, tokenizer, eval_rows, max_new_tokens, chat_template=chat_template, reward_fn=reward_fn
    )
    writer.add_scalar("charts/eval_accuracy", accuracy, step)
    samples = "  ".join(f"{row['prompt']}{text!r}" for row, text in zip(eval_rows[:3], completions))
    return f"  eval_accuracy {accuracy:.3f}  samples: {samples}"


def progress_line(step: int, metrics: dict) -> str:
    """The console line of a step: the batch's DPO loss, reward accuracy and margin, log pi(y_w|x), steps per second."""
    line = f"step {step:5d}  loss {metrics['losses/dpo_loss']:.4f}  reward_accuracy {metrics['rewards/accuracies']:.2f}"
    line += f"  margin {metrics['rewards/margins']:.3f}  logps/chosen {metrics['logps/chosen']:.3f}"
    return line + f"  SPS {metrics['charts/SPS']:.1f}"


# ============================================================================= main
def main(args: Args) -> None:
    validate(args)
    common.check_output_dir(args.output_dir, args.overwrite_output_dir)  # before any model is loaded
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the number of processes, {world_size}")
    local_batch_size = args.batch_size // world_size
    micro_batch_size = min(args.micro_batch_size or local_batch_size, local_batch_size)
    common.seed_everything(args.seed)
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)

    tokenizer, model = load_policy(args, device, dtype, autocast_dtype)
    positions = common.max_positions(model)
    default_new_tokens = args.digits + 2 if args.dataset == tasks.ARITHMETIC else min(64, positions // 2)
    max_new_tokens = default_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    eval_rows = tasks.eval_problems(args.dataset, args.eval_dataset, args.digits, args.eval_size)
    eval_rows = common.fit_prompts(tokenizer, eval_rows, args.chat_template, positions - max_new_tokens, "held-out set")
    pairs, num_truncated = load_pairs(args, model, tokenizer, min(args.max_length, positions), max_new_tokens)
    # pi_ref is the starting policy, frozen: its log-probs of the pairs are computed here, before a resume loads the
    # trained weights. --keep-reference-model runs it every step instead (a copy; with LoRA the policy, adapters off)
    if args.keep_reference_model and args.lora_r:
        reference = model
    elif args.keep_reference_model:  # frozen: run under no_grad only
        reference = common.load_model(args.model, None, args.trust_remote_code, dtype, autocast_dtype).to(device)
    else:
        # only the pairs this run trains on: the start of the loop's first shuffle (below), or every pair
        start, first_pass = time.time(), torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed))
        visited = first_pass[: args.total_steps * args.batch_size].sort().values.tolist()
        reference = reference_logprobs(model, pairs, visited, micro_batch_size, tokenizer.pad_token_id, device)
        print(f"reference log-probs of {len(visited)} of {len(pairs)} pairs computed in {time.time() - start:.1f}s")

    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = common.linear_schedule(optimizer, args.warmup_steps, args.total_steps)
    generator = torch.Generator().manual_seed(args.seed)  # the same on every process: they agree on each batch
    order, start_step = [], 0
    checkpoint = common.find_checkpoint(args.resume, args.output_dir)
    if checkpoint is not None:
        start_step, data = common.load_checkpoint(checkpoint, {"policy": model}, optimizer, scheduler, args)
        order = data["order"]
        generator.set_state(data["generator"])
    writer = common.setup_logging(args, common.run_name_for(args))
    writer.add_scalar("charts/truncated_examples", num_truncated, 0)
    if start_step == 0:
        print(f"step     0{evaluate(model, tokenizer, eval_rows, max_new_tokens, args, writer, 0)}", flush=True)

    start_time = time.time()
    model.train()
    with common.stop_on_signal() as stop:
        for step in range(start_step + 1, args.total_steps + 1):
            while len(order) < args.batch_size:  # a new shuffle of the pairs after each pass over them
                order += torch.randperm(len(pairs), generator=generator).tolist()
            indices, order = common.shard(order[: args.batch_size], rank, world_size), order[args.batch_size :]
            metrics = update(
                model, reference, optimizer, scheduler, pairs, indices, args, micro_batch_size, tokenizer.pad_token_id
            )
            metrics["charts/SPS"] = (step - start_step) / (time.time() - start_time)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
            if step % args.eval_every == 0 or step == args.total_steps:
                evaluation = evaluate(model, tokenizer, eval_rows, max_new_tokens, args, writer, step)
                print(progress_line(step, metrics) + evaluation, flush=True)
            if common.checkpoint_due(stop, step, args.save_every):
                data, models = {"order": order, "generator": generator.get_state()}, {"policy": model}
                common.save_checkpoint(args, step, models, optimizer, scheduler, data)
                if stop.name:
                    raise SystemExit(f"stopped by {stop.name} after step {step}; continue with --resume auto")

    common.save_model(model, tokenizer, args.output_dir, args)
    print(f"saved {args.output_dir} after {time.time() - start_time:.0f}s")
    writer.close()


if __name__ == "__main__":
    common.run(main, Args)
