# LM plumbing shared by the training scripts: seeding, precision, loading, log-probs and masks, several processes,
# LoRA, logging, saving and resuming. Nothing here is part of an algorithm (losses, advantages and loops live in the
# scripts, data and rewards in tasks.py), so a learner may skip this file; docs/common.md explains the choices.
import contextlib
import functools
import gc
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import tasks

RUN_FILE = "training_run.json"  # in every folder we save: what wrote it, so that a later run knows the folder is ours


# ----------------------------------------------------------------------------- setup and loading
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every GPU) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(device: str = "auto") -> torch.device:
    """`auto` picks cuda > mps > cpu; any other value (`cpu`, `cuda:1`, ...) is used as given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(device)


def choose_precision(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype or None): `mixed` is fp32 weights with a bf16-autocast body; `auto` is mixed on
    a GPU with native bf16, else float32; float32, bfloat16 and float16 store every weight in that dtype."""
    if dtype == "auto":
        dtype = (
            "mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
        )
    choices = {"mixed": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"--dtype must be one of auto, {', '.join(choices)}; got {dtype!r}")
    if dtype == "float16" and device.type == "cpu":  # no loss scaling, CPU half kernels: log-probs drift within steps
        raise ValueError("--dtype float16 does not train correctly on the CPU; use float32 or bfloat16")
    return choices[dtype], torch.bfloat16 if dtype == "mixed" else None


def enable_autocast(model, autocast_dtype: torch.dtype | None):
    """Run the body (`model.base_model`) under autocast, the heads in fp32; a bound method, so deepcopy still works."""
    if autocast_dtype is not None:
        body = model.base_model

        @functools.wraps(type(body).forward)
        def autocast_forward(self, *args, **kwargs):
            with torch.autocast(next(self.parameters()).device.type, dtype=autocast_dtype):
                return type(self).forward(self, *args, **kwargs)

        body.forward = types.MethodType(autocast_forward, body)
    return model


def _from_pretrained(loader, name: str, what: str, **kwargs):
    """`loader(name)`, with "not found" turned into one readable error."""
    path = Path(name).expanduser()
    if (name.startswith((".", "/", "~")) or name.count("/") > 1) and not path.exists():
        raise FileNotFoundError(f"{what} path {name!r} does not exist")
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as error:
        if path.exists():  # the folder is there: what failed is inside it
            raise OSError(f"could not load {what} from {name!r}: {error}") from error
        where = f"there is no folder {str(path.resolve())!r} (for checkpoints/sft run `python sft.py` first)"
        raise OSError(f"could not load {what} {name!r}: {where}, and the hub has no such id here: {error}") from error


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "left"):
    """A tokenizer ready for batches: pad is unk where there is one, else EOS (masks never rely on pad != EOS)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(
        AutoTokenizer.from_pretrained, name_or_path, "tokenizer", trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        unk = tokenizer.unk_token if tokenizer.unk_token not in (None, tokenizer.eos_token) else None
        tokenizer.pad_token = unk or tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(
    name_or_path, model_class=None, trust_remote_code=False, dtype=torch.float32, autocast_dtype=None, **kwargs
):
    """A model (a causal LM by default) with dropout off and a generation config of special tokens only, so `generate`
    samples from softmax(logits / T). trained_head="score": an error if that head would be new (not a reward model)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    head, kwargs = kwargs.pop("trained_head", None), kwargs | {"trust_remote_code": trust_remote_code, "dtype": dtype}
    loader = (model_class or AutoModelForCausalLM).from_pretrained
    model, info = _from_pretrained(loader, name_or_path, "model", output_loading_info=True, **kwargs)
    if head and any(key.startswith(f"{head}.") for key in info["missing_keys"]):
        raise ValueError(
            f"{name_or_path!r} has no trained {head!r} head: it is not a reward model (see reward_model.py)"
        )
    disable_dropout(model)
    if getattr(model, "generation_config", None) is not None:
        special = ("bos_token_id", "eos_token_id", "pad_token_id")
        model.generation_config = GenerationConfig(**{key: getattr(model.generation_config, key) for key in special})
    return enable_autocast(model, autocast_dtype)


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout rate to 0, nn.Dropout modules and float rates (Llama's `attention_dropout`) alike."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def check_minimums(args, **minimums) -> None:
    """A one-line error naming the first flag below its minimum (a flag left at None takes its default and passes)."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be >= {minimum}")


def max_positions(model) -> int:
    """The longest sequence the model's position table holds."""
    return getattr(model.config, "max_position_embeddings", None) or 1 << 30


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """lr * min((u + 1) / w, (T - u) / (T - w)) at update u: warm up over w updates, then decay to 0 at T."""
    warmup, decay = max(1, warmup_steps), max(1, total_steps - warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: min((u + 1) / warmup, max(0.0, (total_steps - u) / decay))
    )


# ----------------------------------------------------------------------------- several processes (torchrun)
# `torchrun --nproc_per_node N script.py` starts N copies (ranks); each takes its share of every batch and every loss
# is normalised by the whole batch, so the ranks' gradients sum to the batch gradient. Under plain `python` each
# helper here is the identity.
def setup_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group (NCCL on GPUs, gloo on CPU) when started by torchrun."""
    device = choose_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {local_rank} needs GPU {local_rank}, there are {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    device = device if device.type == "cuda" else torch.device("cpu")  # gloo moves CPU tensors only
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return rank, dist.get_world_size(), device


def finish_distributed() -> None:
    """Leave the process group together (models freed, a barrier), so gloo does not abort at exit."""
    if world()[1] > 1:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world_size): (0, 1) unless torch.distributed is initialised."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks (a new tensor; the input itself in a single process)."""
    if world()[1] > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on each) concatenated along dim 0 in rank order: the whole batch."""
    if world()[1] == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world()[1])]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Copy rank 0's weights to every rank, so all ranks start from the same model."""
    for tensor in model.state_dict().values() if world()[1] > 1 else []:
        dist.broadcast(tensor, src=0)


def all_reduce_gradients(model: torch.nn.Module) -> None:
    """Sum each trainable gradient over ranks once per optimizer step (zeros where none: AdamW steps alike)."""
    for parameter in (p for p in model.parameters() if p.requires_grad):
        parameter.grad = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
        if world()[1] > 1:
            dist.all_reduce(parameter.grad)


def shard(items, rank: int, world_size: int):
    """Rank `rank`'s contiguous share of a global batch (a list or a tensor whose length divides by world_size)."""
    size = len(items) // world_size
    return items[rank * size : (rank + 1) * size]


# ----------------------------------------------------------------------------- memory savers
def apply_lora(model, r: int, alpha: float, target_modules: str = "all-linear", task_type: str = "CAUSAL_LM"):
    """Freeze the model, add LoRA adapters W + (alpha / r) B A in place (peft). B = 0: it starts as the base model,
    which `disable_adapter()` gives back. SEQ_CLS also trains the score head whole."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("--lora-r needs the peft package: pip install peft") from error
    targets = target_modules if target_modules == "all-linear" else [name.strip() for name in target_modules.split(",")]
    transposed = any(type(module).__name__ == "Conv1D" for module in model.modules())  # GPT-2 stores W transposed
    config = dict(r=r, lora_alpha=alpha, target_modules=targets, task_type=task_type, fan_in_fan_out=transposed)
    return get_peft_model(model, LoraConfig(**config, lora_dropout=0.0))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (train mode only; generation runs in eval mode, with a cache)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------- tensors
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """cumsum(mask) - 1, clamped at 0: a left-padded row sees the positions it saw in generation."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, from the mask (pad may equal EOS), for any padding side."""
    return (attention_mask.long() * torch.arange(attention_mask.size(1), device=attention_mask.device)).argmax(dim=1)


LOGITS_CHUNK_ELEMENTS = 2**24  # float32 values that token_logprobs and entropy_from_logits copy at once


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    rows = max(1, LOGITS_CHUNK_ELEMENTS // max(1, logits[0].numel()))
    return [slice(start, start + rows) for start in range(0, logits.size(0), rows)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token_t | context) = logits_t[token_t] / T - logsumexp(logits_t / T) at the sampling temperature T,
    in float32, a chunk of rows at a time (never the whole log-softmax)."""
    parts = []
    for rows in _row_chunks(logits):
        chunk = logits[rows].float() / temperature
        parts.append(chunk.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
    return torch.cat(parts)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H_t = -sum_v p_v log p_v of the temperature-scaled distribution at every position, shape (batch, length)."""
    parts = [F.log_softmax(logits[rows].float() / temperature, dim=-1) for rows in _row_chunks(logits)]
    return torch.cat([-(logp.exp() * logp).sum(-1) for logp in parts])


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, has_eos): 1 up to and including the first EOS, found by position (pad may equal EOS); a row without
    EOS was cut at the length limit and is kept whole."""
    is_eos, length = completion_ids == eos_token_id, completion_ids.size(1)
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), length)
    return (torch.arange(length, device=completion_ids.device) <= first_eos.unsqueeze(1)).long(), is_eos.any(dim=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask) over `dim` (all entries if None); 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


# ----------------------------------------------------------------------------- prompts, generation, reward models
def tokenize_prompt(tokenizer, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt, as a user turn of the chat template when asked and the tokenizer has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds its special tokens
    return tokenizer(prompt)["input_ids"]


def fit_prompts(tokenizer, rows: list[dict], chat_template: bool, room: int, what: str) -> list[dict]:
    """The rows whose prompt has 1 to `room` tokens, each with its "prompt_ids"; the others are dropped and counted."""
    rows = [{**row, "prompt_ids": tokenize_prompt(tokenizer, row["prompt"], chat_template)} for row in rows]
    kept = [row for row in rows if 0 < len(row["prompt_ids"]) <= room]
    if len(kept) < len(rows):
        print(f"{what}: dropped {len(rows) - len(kept)} of {len(rows)} prompts, empty or longer than {room} tokens")
    if rows and not kept:
        raise ValueError(f"{what}: no prompt fits in {room} tokens (the model's positions less the generation length)")
    return kept


def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Text of each completion's real tokens (the mask of `completion_mask`), special tokens dropped."""
    kept = [
        [token for token, keep in zip(ids, row) if keep] for ids, row in zip(completion_ids.tolist(), mask.tolist())
    ]
    return tokenizer.batch_decode(kept, skip_special_tokens=True)


@torch.no_grad()
def evaluate_accuracy(model, tokenizer, problems, max_new_tokens, batch_size=256, chat_template=False, reward_fn=None):
    """(mean reward of greedy completions, the completions), scored by `reward_fn` (default exact match). Under
    torchrun each rank generates every world_size-th problem and gets all completions back."""
    was_training, (rank, world_size), completions = model.training, world(), []
    model.eval()
    mine = problems[rank::world_size]
    for start in range(0, len(mine), batch_size):
        prompt_ids = [
            tokenize_prompt(tokenizer, row["prompt"], chat_template) for row in mine[start : start + batch_size]
        ]
        inputs = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt", padding_side="left")
        special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        output = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False, **special)
        completion_ids = output[:, inputs["input_ids"].size(1) :]
        completions += decode_completions(
            tokenizer, completion_ids, completion_mask(completion_ids, special["eos_token_id"])[0]
        )
    model.train(was_training)
    if world_size > 1:
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, completions)
        completions = [per_rank[index % world_size][index // world_size] for index in range(len(problems))]
    prompts, reward_fn = [row["prompt"] for row in problems], reward_fn or tasks.arithmetic_reward
    rewards = reward_fn(prompts, completions, **tasks.row_fields(problems))
    return sum(rewards) / len(rewards), completions


def reward_model_scores(reward_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y): the scalar `score` head on the hidden state of the last real token, positions from the mask."""
    position_ids = position_ids_from_mask(attention_mask)
    hidden = reward_model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    rows = torch.arange(input_ids.size(0), device=input_ids.device)
    return reward_model.score(hidden.last_hidden_state[rows, last_token_index(attention_mask)]).squeeze(-1).float()


@torch.no_grad()
def score_completions(reward_model, tokenizer, prompts, completions, has_eos, chat_template, batch_size):
    """r(x, y) of prompt + completion texts in the reward model's own tokens, built as reward_model.py builds its
    pairs: prompt and completion tokenised apart, EOS after a completion that ended with one."""
    ids = [
        tokenize_prompt(tokenizer, prompt, chat_template)
        + tokenizer(completion, add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id] * bool(ended)
        for prompt, completion, ended in zip(prompts, completions, has_eos)
    ]
    scores = []
    for start in range(0, len(ids), batch_size):
        batch = tokenizer.pad({"input_ids": ids[start : start + batch_size]}, return_tensors="pt", padding_side="left")
        batch = batch.to(reward_model.device)
        scores.append(reward_model_scores(reward_model, batch["input_ids"], batch["attention_mask"]))
    return torch.cat(scores)


# ----------------------------------------------------------------------------- logging
class _NoWriter:
    """The writer of ranks other than 0: metrics are reduced over ranks and logged once, by rank 0."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def setup_logging(args, run_name: str, log_dir: str = "runs"):
    """A TensorBoard writer at runs/{run_name} with the hyper-parameters as a table; Weights & Biases with --track."""
    from torch.utils.tensorboard import SummaryWriter

    if world()[0] != 0:
        return _NoWriter()
    if getattr(args, "track", False):
        import wandb

        config = dict(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name)
        wandb.init(**config, sync_tensorboard=True, save_code=True)
    writer = SummaryWriter(str(Path(log_dir, run_name).resolve()))  # absolute: the writer thread outlives a chdir
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )
    return writer


def run_name_for(args) -> str:
    """`{exp_name}__{seed}__{unix time}`, the CleanRL run naming."""
    return f"{args.exp_name}__{args.seed}__{int(time.time())}"


# ----------------------------------------------------------------------------- the output folder, saving, resuming
def check_output_dir(output_dir: str, overwrite: bool = False) -> None:
    """At start-up: `output_dir` must be writable and new, empty or ours, or `overwrite` set (then our files go into it
    and nothing else there is touched). Temporary folders of ours that a kill left behind are removed."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-dir {output_dir!r} is a file, not a folder")
    ours = lambda entry: entry.name.startswith((".tmp-", "checkpoint-")) or (path / RUN_FILE).is_file()  # noqa: E731
    foreign = [entry.name for entry in path.iterdir() if not ours(entry)] if path.is_dir() else []
    if foreign and not overwrite:
        raise ValueError(
            f"--output-dir {output_dir!r} holds files not written here ({foreign[0]!r}): choose another"
            " folder, or write into it anyway with --overwrite-output-dir"
        )
    for temporary in path.glob(".tmp-*"):
        shutil.rmtree(temporary, ignore_errors=True)
    created = [folder for folder in [path, *path.parents] if not folder.exists()]
    try:  # a probe file now, rather than an error after hours of training
        path.mkdir(parents=True, exist_ok=True)
        (path / f".tmp-probe-{os.getpid()}").touch()
        (path / f".tmp-probe-{os.getpid()}").unlink()
    except OSError as error:
        raise ValueError(f"--output-dir {output_dir!r} cannot be written: {error.strerror or error}") from None
    finally:
        for folder in created:  # the final save makes them again; a run that fails early leaves no empty folder
            with contextlib.suppress(OSError):
                folder.rmdir()


def save_model(model, tokenizer, output_dir: str, args=None) -> None:
    """The final model and tokenizer (Hugging Face format) into `output_dir`, written to a temporary folder there first
    and then moved into place, so a crash while writing leaves the previous files whole. LoRA: saved merged, the
    exact adapters under adapter/ (the merge changes `model`, so save at the end). Only rank 0 writes."""
    target, rank = Path(output_dir), world()[0]
    temporary = target / f".tmp-model-{os.getpid()}"
    try:
        if hasattr(model, "merge_and_unload"):
            if rank == 0:
                model.save_pretrained(temporary / "adapter")
            model = model.merge_and_unload()
        if rank == 0:
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            names = sorted(entry.name for entry in temporary.iterdir()) + [RUN_FILE]
            previous = json.loads((target / RUN_FILE).read_text())["files"] if (target / RUN_FILE).is_file() else []
            for name in set(previous + names):  # ours only: the last save's files, and those about to be replaced
                shutil.rmtree(target / name) if (target / name).is_dir() else (target / name).unlink(missing_ok=True)
            run = {"script": Path(sys.argv[0]).name, "args": vars(args) if args else {}, "files": names}
            (temporary / RUN_FILE).write_text(json.dumps(run, indent=1, default=str))
            for name in [RUN_FILE] + names[:-1]:  # the marker first: a kill in between leaves a folder known to be ours
                os.replace(temporary / name, target / name)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    if world()[1] > 1:
        dist.barrier()


def save_checkpoint(args, step: int, models: dict, optimizer, scheduler, data: dict) -> None:
    """`--output-dir/checkpoint-{step}` for --resume: the trained parameters of `models`, optimizer, scheduler, step,
    `data` (the place in the data order) and each rank's RNG states; written aside and renamed, whole or absent. The
    newest --keep-checkpoints are kept."""
    output_dir, keep = args.output_dir, args.keep_checkpoints
    numpy_state = np.random.get_state()
    rng = {"python": random.getstate(), "numpy": [*numpy_state[:1], numpy_state[1].tolist(), *numpy_state[2:]]}
    rngs = [rng | {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}] * world()[1]
    if world()[1] > 1:
        dist.all_gather_object(rngs, rngs[0])
    if world()[0] == 0:
        target, temporary = Path(output_dir, f"checkpoint-{step}"), Path(output_dir, f".tmp-checkpoint-{step}")
        trained = {
            name: {key: p.detach() for key, p in m.named_parameters() if p.requires_grad} for name, m in models.items()
        }
        state = {
            "step": step,
            "models": trained,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        temporary.mkdir(parents=True, exist_ok=True)
        torch.save(state | {"data": data, "rng": rngs, "args": vars(args)}, temporary / "training_state.pt")
        shutil.rmtree(target, ignore_errors=True)
        temporary.rename(target)
        for old in sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name[11:]))[:-keep]:
            shutil.rmtree(old)
        print(f"saved {target}", flush=True)


def find_checkpoint(resume: str | None, output_dir: str) -> Path | None:
    """The folder --resume names: a checkpoint path, or `auto`, the newest under --output-dir (None when none)."""
    if resume not in (None, "auto") and not Path(resume, "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume {resume!r} is not a checkpoint folder (it holds no training_state.pt)")
    found = sorted(Path(output_dir).glob("checkpoint-*/training_state.pt"), key=lambda p: int(p.parent.name[11:]))
    return Path(resume) if resume not in (None, "auto") else found[-1].parent if resume and found else None


RESUME_MAY_CHANGE = ("resume", "save_every", "keep_checkpoints", "overwrite_output_dir", "device", "track", "exp_name")


def load_checkpoint(path: Path, models: dict, optimizer, scheduler, args) -> tuple[int, dict]:
    """Restore a checkpoint into the freshly built models, optimizer and scheduler, and this rank's RNG states; returns
    (step, data). A checkpoint made with other flags is refused: it would not continue the same run."""
    state = torch.load(path / "training_state.pt", weights_only=True)
    for key, value in state["args"].items():
        current = getattr(args, key, None)
        if key not in RESUME_MAY_CHANGE and str(current) != str(value):
            raise ValueError(f"--resume {str(path)!r} was made with --{key.replace('_', '-')} {value}, not {current}")
    for name, model in models.items():
        if set(state["models"][name]) != {key for key, p in model.named_parameters() if p.requires_grad}:
            raise ValueError(f"--resume {str(path)!r}: the trained parameters of the {name} differ from this run's")
        model.load_state_dict(state["models"][name], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][world()[0]]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    print(f"resumed from {path} at step {state['step']}", flush=True)
    return state["step"], state["data"]


@contextlib.contextmanager
def stop_on_signal():
    """Within it SIGINT (Ctrl-C) and SIGTERM only set `.name`: the loop ends its step, saves a checkpoint and stops.
    A second signal stops at once."""
    stop = types.SimpleNamespace(name=None)

    def handle(number, frame):
        if stop.name is not None:
            raise KeyboardInterrupt
        stop.name = signal.Signals(number).name
        print(f"\n{stop.name}: saving a checkpoint after this step (send it again to stop at once)", flush=True)

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def checkpoint_due(stop, step: int, save_every: int) -> bool:
    """Whether to save after `step`: every `save_every` steps (0: never), and after a signal to any rank."""
    signalled = bool(all_reduce_sum(torch.tensor(float(stop.name is not None))).item())
    return signalled or (save_every > 0 and step % save_every == 0)


def run(main, args_class) -> None:
    """The command line: parse the flags, run main, leave the process group. An error raised in these files (a bad
    flag, row or path) prints as one line; any other exception keeps its traceback."""
    import tyro

    try:
        main(tyro.cli(args_class))
    except (ValueError, OSError, ImportError) as error:
        if Path(traceback.extract_tb(error.__traceback__)[-1].filename).parent != Path(__file__).parent:
            raise
        sys.exit(f"error: {error}")
    finish_distributed()
