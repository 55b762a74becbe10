# Direct Preference Optimization (DPO): preference pairs, no reward model, no critic, no rollouts. README.md, section "DPO".
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from transformers import AutoModelForCausalLM

import common


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
    """`auto` (mixed on a GPU with bf16, float32 elsewhere), `mixed` (fp32 weights, bf16 autocast), float32, bfloat16, float16"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project_name: str = "rlhf-reference"
    """the W&B project, when --track"""
    wandb_entity: str | None = None
    """the W&B entity (team), when --track"""
    output_dir: str = "checkpoints/dpo"
    """where the final Hugging Face checkpoint (model + tokenizer) is written"""

    # model and data
    model: str = "checkpoints/sft"
    """the starting policy, which is also the frozen reference pi_ref: a Hugging Face model id or a local checkpoint folder"""
    trust_remote_code: bool = False
    """allow a hub model to run its own Python code"""
    dataset: str = "arithmetic"
    """`arithmetic` (correct sum chosen, a near miss rejected), a prompt/chosen/rejected .jsonl file, or a Hugging Face dataset id"""
    digits: int = 2
    """operand digits of the arithmetic task"""
    num_pairs: int = 10000
    """arithmetic: preference pairs generated (training cycles through them)"""
    rejected_from_model: bool = False
    """arithmetic only: where the starting model's greedy answer is wrong, reject that answer instead of the near miss"""
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
    """prompt + completion tokens kept per sequence; longer completions are cut at the end (and counted)"""

    # algorithm
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid (DPO), ipo (squared loss on length-normalised log-ratios) or hinge (SLiC)"""
    beta: float = 0.1
    """beta: strength of the implicit KL penalty toward the reference; implicit reward = beta * log(pi / pi_ref)"""
    label_smoothing: float = 0.0
    """eps of conservative DPO (sigmoid loss only): the probability that a pair's label is flipped, in [0, 0.5)"""
    sft_coef: float = 1.0
    """weight of the per-token NLL of the chosen completions added to the loss (keeps log pi(y_w|x) from falling); 0 is plain DPO"""
    keep_reference_model: bool = False
    """keep a frozen copy of the reference model in memory and run it every step, instead of precomputing its log-probs once"""

    # memory (README.md, "Scaling up")
    micro_batch_size: int | None = None
    """pairs per forward/backward pass; gradients accumulate over the batch (default: the whole batch of this process)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of storing them: less memory, more compute"""
    lora_r: int = 0
    """rank of LoRA adapters (needs peft); 0 trains every weight. With LoRA the reference is the model with adapters off"""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A to each target weight"""
    lora_target_modules: str = "all-linear"
    """comma-separated module names that get adapters, or `all-linear`"""

    # optimisation
    total_steps: int = 3000
    """optimizer steps"""
    batch_size: int = 32
    """preference pairs per step, over all processes (the forward pass holds twice as many sequences)"""
    learning_rate: float = 3e-4
    """peak learning rate of AdamW; below SFT's, since larger rates first break the model (README.md, "Why the learning
    rates are small")"""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default; TRL's DPOTrainer uses 0)"""
    warmup_steps: int = 20
    """linear warm-up steps, then linear decay to 0"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    eval_every: int = 250
    """evaluate held-out greedy accuracy every this many steps, before training and at the end (arithmetic only)"""
    eval_size: int = 500
    """held-out problems to evaluate on"""


def load_pairs(args: Args) -> list[dict]:
    """Training pairs {"prompt", "chosen", "rejected"}."""
    if args.dataset == "arithmetic":
        return common.arithmetic_preference_pairs(args.num_pairs, args.digits, "train", seed=args.seed)
    if args.dataset.endswith(".jsonl"):
        return common.read_jsonl(args.dataset, ("prompt", "chosen", "rejected"))
    fields = {"prompt": args.prompt_field, "chosen": args.chosen_field, "rejected": args.rejected_field}
    return common.load_hf_dataset(args.dataset, args.hf_split, fields)


def rejected_from_model(model, tokenizer, pairs: list[dict], max_new_tokens: int, chat_template: bool) -> list[dict]:
    """The pairs with the rejected completion replaced by the model's own greedy answer wherever that answer is wrong.

    Preferences on the model's own mistakes push down exactly what greedy decoding gets wrong (on-policy-ish data).
    """
    problems = [{**pair, "answer": pair["chosen"]} for pair in pairs]
    _, answers = common.evaluate_accuracy(model, tokenizer, problems, max_new_tokens, chat_template=chat_template)
    print(f"{sum(answer != pair['chosen'] for pair, answer in zip(pairs, answers))} of {len(pairs)} rejected answers are the model's own")
    return [{**pair, "rejected": answer} if answer != pair["chosen"] else pair for pair, answer in zip(pairs, answers)]


def tokenize_pair(tokenizer, row: dict, max_length: int, chat_template: bool) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt_ids, chosen_ids, rejected_ids, truncated).

    The prompt is tokenised once and shared by both completions, so the two sequences of a pair
    differ only in their completions. Each completion is tokenised on its own (tokenising
    prompt + completion as one string could merge tokens across the boundary), gets EOS appended,
    and is cut at the end so that prompt + completion fits in max_length.
    """
    prompt_ids = common.tokenize_prompt(tokenizer, row["prompt"], chat_template)[:max_length]
    chosen_ids, rejected_ids = (
        tokenizer(row[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for key in ("chosen", "rejected")
    )
    room = max_length - len(prompt_ids)
    truncated = max(len(chosen_ids), len(rejected_ids)) > room
    return prompt_ids, chosen_ids[:room], rejected_ids[:room], truncated


def collate(pairs: list[tuple[list[int], list[int], list[int]]], pad_token_id: int, device) -> dict:
    """One right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones, for one forward pass.

    Returns input_ids, attention_mask and completion_mask (1 on completion tokens, EOS included;
    0 on prompt and padding).
    """
    sequences = [(prompt, chosen) for prompt, chosen, _ in pairs] + [(prompt, rejected) for prompt, _, rejected in pairs]
    prompt_lengths = torch.tensor([len(prompt) for prompt, _ in sequences])
    lengths = torch.tensor([len(prompt) + len(completion) for prompt, completion in sequences])
    length = int(lengths.max())
    # one tensor from padded lists (a copy per row took about 1 ms a batch, 2% of a tiny model's step)
    input_ids = torch.tensor(
        [prompt + completion + [pad_token_id] * (length - len(prompt) - len(completion)) for prompt, completion in sequences]
    )
    positions = torch.arange(length)
    attention_mask = (positions < lengths[:, None]).long()
    completion_mask = ((positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])).long()
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "completion_mask": completion_mask.to(device)}


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum_{t in C} log pi(y_t | x, y_<t), summed over the completion positions C only; shape (batch,).

    The logits at position t predict token t+1, so tokens and mask are shifted by one. Prompt
    and padding positions are replaced by exactly 0 (not multiplied, so even a -inf there
    cannot leak in); a row with no completion token gives 0.
    """
    logprobs = common.token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return torch.where(completion_mask[:, 1:].bool(), logprobs, 0.0).sum(-1)


def concatenated_forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_w|x), log pi(y_l|x)) for the B pairs of a `collate` batch, from one forward pass over all 2B rows."""
    attention_mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=common.position_ids_from_mask(attention_mask)
    ).logits
    return sequence_logprobs(logits, batch["input_ids"], batch["completion_mask"]).chunk(2)


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
    """(losses, chosen_rewards, rejected_rewards), one value per pair.

    Implicit rewards r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), and
    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)):
      sigmoid: L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)  (eps = label_smoothing; eps = 0 is DPO)
      ipo:     L = (h_bar - 1 / (2 beta))^2, h_bar built from length-normalised log-ratios (divided by completion tokens)
      hinge:   L = max(0, 1 - beta h)
    At policy == reference (h = 0) they equal log 2, 1 / (4 beta^2) and 1.
    """
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


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor, num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """L_SFT = -(sum_i log pi(y_w,i | x_i)) / (sum_i |y_w,i|): the NLL of the chosen completions per token (as in sft.py).

    With gradient accumulation or several processes pass the whole batch's chosen token count as `num_tokens`,
    so the parts add up to the batch loss.
    """
    num_tokens = chosen_lengths.sum() if num_tokens is None else num_tokens
    return -policy_chosen_logps.sum() / num_tokens.clamp(min=1)


@torch.no_grad()
def reference_logprobs(model, tokenized: list[tuple], batch_size: int, pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_ref(y_w|x), log pi_ref(y_l|x)) of every pair, computed once before training with the frozen reference.

    Under torchrun each process computes a contiguous share of the pairs and the shares are gathered, so every
    process ends with all of them for 1 / world_size of the work.
    """
    rank, world_size = common.world()
    share = math.ceil(len(tokenized) / world_size)
    own_pairs = tokenized[rank * share : (rank + 1) * share]  # the last share may be shorter, or empty
    was_training = model.training
    model.eval()
    own_logps = torch.zeros(share, 2, device=device)  # padded to `share` rows: all_gather needs one shape everywhere
    for start in range(0, len(own_pairs), batch_size):
        pairs = own_pairs[start : start + batch_size]
        own_logps[start : start + len(pairs)] = torch.stack(concatenated_forward(model, collate(pairs, pad_token_id, device)), dim=1)
    model.train(was_training)
    all_logps = common.all_gather(own_logps)[: len(tokenized)]
    return all_logps[:, 0], all_logps[:, 1]


def validate(args: Args) -> None:
    """Reject flags that cannot work before anything is loaded."""
    if args.loss_type not in ("sigmoid", "ipo", "hinge"):
        raise ValueError(f"--loss-type must be sigmoid, ipo or hinge; got {args.loss_type!r}")
    if args.beta <= 0:
        raise ValueError(f"--beta must be > 0; got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5); got {args.label_smoothing}")
    if args.label_smoothing > 0 and args.loss_type != "sigmoid":
        raise ValueError(f"--label-smoothing applies to --loss-type sigmoid only; got --loss-type {args.loss_type}")
    if args.sft_coef < 0:
        raise ValueError(f"--sft-coef must be >= 0; got {args.sft_coef}")
    if args.rejected_from_model and args.dataset != "arithmetic":
        raise ValueError("--rejected-from-model needs --dataset arithmetic")
    if args.batch_size < 1 or (args.micro_batch_size is not None and args.micro_batch_size < 1) or args.lora_r < 0:
        raise ValueError(f"--batch-size {args.batch_size} and --micro-batch-size {args.micro_batch_size} must be >= 1, --lora-r >= 0")


def main(args: Args) -> None:
    validate(args)
    rank, world_size, device = common.setup_distributed(args.device)  # (0, 1, device) without torchrun
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the number of processes, {world_size}")
    local_batch_size = args.batch_size // world_size
    micro_batch_size = min(args.micro_batch_size or local_batch_size, local_batch_size)
    run_name = common.run_name_for(args)
    writer = common.setup_logging(args, run_name)
    common.seed_everything(args.seed)
    dtype, autocast_dtype = common.choose_precision(args.dtype, device)

    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    model = common.load_model(args.model, AutoModelForCausalLM, args.trust_remote_code, dtype, autocast_dtype).to(device)
    # sequences longer than the position table are cut (and counted), not an index error in the embedding
    args.max_length = min(args.max_length, getattr(model.config, "max_position_embeddings", args.max_length))
    if args.lora_r:
        model = common.apply_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    common.broadcast_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters ({trainable:,} trained) on {device} in {dtype}, autocast {autocast_dtype}"
    )

    pairs = load_pairs(args)
    if args.rejected_from_model:
        pairs = rejected_from_model(model, tokenizer, pairs, args.digits + 2, args.chat_template)
    tokenized = [tokenize_pair(tokenizer, row, args.max_length, args.chat_template) for row in pairs]
    empty = next((number for number, (prompt_ids, *_) in enumerate(tokenized, start=1) if not prompt_ids), None)
    if empty is not None:  # log pi(y_1 | x) needs at least one prompt token to be predicted from
        raise ValueError(
            f"{args.dataset}: pair {empty} (counting non-blank lines) has an empty prompt; the first completion token needs one"
        )
    num_truncated = sum(truncated for *_, truncated in tokenized)
    if num_truncated:
        print(f"{num_truncated} of {len(tokenized)} pairs had a completion longer than --max-length {args.max_length} allows; cut")
    writer.add_scalar("charts/truncated_examples", num_truncated, 0)
    tokenized = [ids[:3] for ids in tokenized]
    eval_rows = common.arithmetic_eval_set(args.eval_size, args.digits) if args.dataset == "arithmetic" else []

    # the reference pi_ref is the starting policy, frozen. By default its log-probs are computed once here (each
    # process its share of the pairs), so no second model stays in memory; --keep-reference-model runs a frozen copy every
    # step instead (the same numbers, up to rounding). With LoRA that copy is the model itself with its adapters switched off.
    if args.keep_reference_model:
        ref_model = (
            None if args.lora_r else common.load_model(args.model, AutoModelForCausalLM, args.trust_remote_code, dtype, autocast_dtype)
        )
        ref_model = ref_model if ref_model is None else ref_model.to(device).eval().requires_grad_(False)
    else:
        start = time.time()
        all_ref_chosen, all_ref_rejected = reference_logprobs(model, tokenized, micro_batch_size, tokenizer.pad_token_id, device)
        print(f"reference log-probs of {len(tokenized)} pairs computed in {time.time() - start:.1f}s")

    # fused=True: one kernel updates every parameter tensor (the same AdamW step without a Python loop over tensors; HF Trainer's default)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay, fused=True
    )
    scheduler = common.linear_schedule(optimizer, args.warmup_steps, args.total_steps)  # warm-up, then linear decay to 0
    generator = torch.Generator().manual_seed(args.seed)  # the same on every process: they agree on each batch
    order = []

    def evaluate(step: int) -> str:
        """Held-out greedy accuracy on arithmetic, logged as charts/eval_accuracy, with a few samples for the console."""
        if not eval_rows:
            return ""
        accuracy, completions = common.evaluate_accuracy(model, tokenizer, eval_rows, args.digits + 2, chat_template=args.chat_template)
        writer.add_scalar("charts/eval_accuracy", accuracy, step)
        samples = "  ".join(f"{row['prompt']}{text!r}" for row, text in zip(eval_rows[:3], completions))
        return f"  eval_accuracy {accuracy:.3f}  samples: {samples}"

    print(f"step     0{evaluate(0)}", flush=True)
    start_time = time.time()
    model.train()
    for step in range(1, args.total_steps + 1):
        # sample a batch of pairs; reshuffle after each pass over the data. Each process takes its share of it.
        while len(order) < args.batch_size:
            order += torch.randperm(len(tokenized), generator=generator).tolist()
        indices, order = common.shard(order[: args.batch_size], rank, world_size), order[args.batch_size :]
        chosen_token_counts = torch.tensor([len(tokenized[i][1]) for i in indices], device=device)
        num_chosen_tokens = common.all_reduce_sum(chosen_token_counts.sum())  # the whole batch's, for L_SFT

        # L = mean over pairs of L_DPO + sft_coef * L_SFT (the NLL term that keeps the chosen log-probs from falling),
        # accumulated micro-batch by micro-batch: each part is normalised by the whole batch, so the parts add up to L
        optimizer.zero_grad(set_to_none=True)
        parts = {key: [] for key in ("policy_chosen", "policy_rejected", "chosen_rewards", "rejected_rewards")}
        preference_loss, sft_loss = torch.zeros((), device=device), torch.zeros((), device=device)
        for start in range(0, local_batch_size, micro_batch_size):
            micro_indices = indices[start : start + micro_batch_size]
            batch = collate([tokenized[i] for i in micro_indices], tokenizer.pad_token_id, device)
            chosen_lengths, rejected_lengths = batch["completion_mask"].sum(-1).chunk(2)
            policy_chosen_logps, policy_rejected_logps = concatenated_forward(model, batch)
            if args.keep_reference_model:
                with torch.no_grad(), model.disable_adapter() if args.lora_r else contextlib.nullcontext():
                    ref_chosen_logps, ref_rejected_logps = concatenated_forward(model if ref_model is None else ref_model, batch)
            else:
                ref_chosen_logps, ref_rejected_logps = all_ref_chosen[micro_indices], all_ref_rejected[micro_indices]
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen_logps,
                policy_rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                args.beta,
                args.loss_type,
                args.label_smoothing,
                chosen_lengths,
                rejected_lengths,
            )
            micro_preference_loss = losses.sum() / args.batch_size
            micro_sft_loss = chosen_nll(policy_chosen_logps, chosen_lengths, num_chosen_tokens)
            (micro_preference_loss + args.sft_coef * micro_sft_loss).backward()
            preference_loss, sft_loss = preference_loss + micro_preference_loss.detach(), sft_loss + micro_sft_loss.detach()
            for key, value in zip(parts, (policy_chosen_logps, policy_rejected_logps, chosen_rewards, rejected_rewards)):
                parts[key].append(value.detach())
        common.all_reduce_gradients(model)  # sum over processes: the gradient of the whole batch's loss
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]  # the rate of this step; scheduler.step() moves to the next step's
        optimizer.step()
        scheduler.step()

        # metrics of the whole batch (every process's pairs)
        policy_chosen_logps, policy_rejected_logps, chosen_rewards, rejected_rewards = (
            common.all_gather(torch.cat(values)) for values in parts.values()
        )
        preference_loss, sft_loss = common.all_reduce_sum(preference_loss), common.all_reduce_sum(sft_loss)
        reward_accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
        writer.add_scalar("losses/dpo_loss", preference_loss.item(), step)
        writer.add_scalar("losses/sft_loss", sft_loss.item(), step)
        writer.add_scalar("losses/grad_norm", grad_norm.item(), step)
        writer.add_scalar("rewards/chosen", chosen_rewards.mean().item(), step)
        writer.add_scalar("rewards/rejected", rejected_rewards.mean().item(), step)
        writer.add_scalar("rewards/accuracies", reward_accuracy, step)
        writer.add_scalar("rewards/margins", (chosen_rewards - rejected_rewards).mean().item(), step)
        writer.add_scalar("logps/chosen", policy_chosen_logps.mean().item(), step)
        writer.add_scalar("logps/rejected", policy_rejected_logps.mean().item(), step)
        writer.add_scalar("charts/learning_rate", learning_rate, step)
        writer.add_scalar("charts/SPS", step / (time.time() - start_time), step)

        if step % args.eval_every == 0 or step == args.total_steps:
            line = (
                f"step {step:5d}  loss {preference_loss.item():.4f}  reward_accuracy {reward_accuracy:.2f}"
                f"  margin {(chosen_rewards - rejected_rewards).mean().item():.3f}  logps/chosen {policy_chosen_logps.mean().item():.3f}"
                f"  SPS {step / (time.time() - start_time):.1f}"
            )
            print(line + evaluate(step), flush=True)

    common.save_checkpoint(model, tokenizer, args.output_dir)
    print(f"saved {args.output_dir} after {time.time() - start_time:.0f}s")
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
    common.finish_distributed()  # under torchrun: every process leaves the group together
