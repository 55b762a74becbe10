# Tiny helpers shared by sft.py, reward_model.py, ppo.py, grpo.py and dpo.py (DESIGN.md section 3).
# Loops, losses and advantages live in the scripts; this file holds only what two or more of them need.
import functools
import gc
import json
import math
import os
import random
import re
import shutil
import string
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

TINY_MODEL = "tiny"
"""The `--model` keyword that builds the char-level GPT-2 from scratch instead of loading one."""


# ----------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every GPU) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(device: str = "auto") -> torch.device:
    """`auto` picks cuda > mps > cpu; any other value (`cpu`, `cuda:1`, ...) is used as given."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_precision(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype or None) for the --dtype flag.

    - `mixed`: weights, gradients and AdamW state in fp32; the transformer body runs under bf16 autocast
      (its matmuls in bf16). The LM and reward heads, log-probs and losses stay fp32.
    - `auto`: `mixed` on a CUDA GPU with native bf16 (Ampere or newer; not T4/V100, where torch only emulates
      it), `float32` elsewhere (CPU training is fp32).
    - `float32`, `bfloat16`, `float16`: every weight in that dtype, no autocast. Pure bf16 suits frozen weights and
      LoRA (peft keeps the adapters in fp32). For full fine-tuning it loses AdamW steps smaller than bf16's
      resolution (about 0.4% of a weight): at a learning rate of 1e-6 most weights would never move.
    """
    if dtype == "auto":
        dtype = "mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    if dtype == "mixed":
        return torch.float32, torch.bfloat16
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"--dtype must be one of auto, mixed, {', '.join(choices)}; got {dtype!r}")
    return choices[dtype], None


def enable_autocast(model, autocast_dtype: torch.dtype | None):
    """Run the model's transformer body (`model.base_model`) under torch.autocast(autocast_dtype); None: no change.

    The body is where the compute is; the heads on top of it (LM head, score head) run in the weights' fp32, so
    logits and rewards come out fp32. Mixed precision without a wrapper class: the forward method of that one
    module is replaced, so generate, save_pretrained and peft see the same model as before. It is a method bound
    to the body, so a copy.deepcopy of the model (a reference copy) runs its own weights, not the original's.
    """
    if autocast_dtype is None:
        return model
    body = model.base_model

    @functools.wraps(type(body).forward)
    def autocast_forward(self, *args, **kwargs):
        with torch.autocast(next(self.parameters()).device.type, dtype=autocast_dtype):
            return type(self).forward(self, *args, **kwargs)

    body.forward = types.MethodType(autocast_forward, body)
    return model


def _from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """Call `loader(name_or_path)` and turn "not found" into one readable error instead of a stack trace."""
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"{what} path {name_or_path!r} does not exist")
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        if Path(name_or_path).expanduser().exists():  # the folder is there: what failed is inside it
            raise OSError(f"could not load {what} from {name_or_path!r}: {error}") from error
        raise OSError(
            f"could not load {what} {name_or_path!r}: there is no folder {str(Path(name_or_path).expanduser().resolve())!r} "
            f"(for checkpoints/sft run `python sft.py` first), and it is not a model id that can be fetched from the "
            f"Hugging Face hub here (offline?). Original error: {error}"
        ) from error


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "left"):
    """Load a tokenizer and make it ready for batching.

    A pad token is required for batches. If the tokenizer has none we reuse one that is not EOS
    (the unk token) where the vocabulary has one, and EOS otherwise (gpt2). Because pad may equal
    EOS, masks are always built from positions (`completion_mask`), never from token values.
    Left padding (the default) lines up the last prompt token of every row for generation.
    """
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name_or_path: str, model_class=None, trust_remote_code: bool = False, dtype=torch.float32, autocast_dtype=None, **kwargs):
    """Load a Hugging Face model (a causal LM unless `model_class` says otherwise) with dropout off.

    Weights in `dtype`, the body under autocast when `autocast_dtype` is set (choose_precision gives both).
    Remote code never runs unless `trust_remote_code` is set (the `--trust-remote-code` flag).

    `generate` takes every option a call leaves unset from the model's generation_config, where chat models ship
    sampling defaults (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20, top_p 0.8). The log-probs of these
    scripts are those of softmax(logits / T), so the config keeps only the special tokens and every call says how
    it samples; a checkpoint saved here has that plain config too.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    model_class = model_class or AutoModelForCausalLM
    model = _from_pretrained(model_class.from_pretrained, name_or_path, "model", trust_remote_code=trust_remote_code, dtype=dtype, **kwargs)
    disable_dropout(model)
    if getattr(model, "generation_config", None) is not None:
        special_tokens = ("bos_token_id", "eos_token_id", "pad_token_id")
        model.generation_config = GenerationConfig(**{name: getattr(model.generation_config, name) for name in special_tokens})
    return enable_autocast(model, autocast_dtype)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0: RL needs log-probs that are the same at sampling and training time.

    Besides nn.Dropout modules, many models keep a rate as a plain float that they pass to functional dropout in
    train mode (Llama's and Qwen's `attention_dropout`, OPT's `dropout`); those are set to 0 on the modules too.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """The learning rate times min((u + 1) / w, (T - u) / (T - w)) at update u (0-based): linear warm-up to the peak over
    w = warmup_steps updates, then linear decay to 0 at T = total_steps (w = 0: decay from the first update)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: min((u + 1) / max(1, warmup_steps), max(0.0, (total_steps - u) / max(1, total_steps - warmup_steps)))
    )


# ----------------------------------------------------------------------------- several processes, memory savers
# `torchrun --nproc_per_node N script.py ...` starts N copies of a script (one per GPU, or N CPU processes). Each
# copy (rank) samples its own share of every batch; the losses are normalised by the whole batch's size, so the
# sum of the ranks' gradients is the gradient of the whole batch (ppo.py is the exception: it averages the ranks'
# minibatch losses, as DistributedDataParallel does). Run with plain `python` every helper below is a no-op and the
# script is the single-process one.
def setup_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process; joins the process group when started by torchrun.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. The backend is NCCL between GPUs (rank r uses GPU
    LOCAL_RANK) and gloo on CPU. Ranks other than 0 print nothing, so the console shows each line once.
    """
    device = choose_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"process {local_rank} needs GPU {local_rank}, but there are {torch.cuda.device_count()}: lower --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":  # gloo moves CPU tensors only (an Apple GPU, mps, cannot take part)
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return rank, world_size, device


def finish_distributed() -> None:
    """Leave the process group together, after a script's main() has returned: collect the garbage, a barrier, then
    destroy the group.

    gloo can abort a process at shutdown ("terminate called without an active exception") when the group or the
    models are torn down while its peers are exiting; freeing the models first and leaving together avoids it.
    """
    if world()[1] > 1:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world_size): (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks (a new tensor; the input itself in a single process)."""
    if world()[1] == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on each) concatenated along dim 0 in rank order: the whole batch."""
    if world()[1] == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world()[1])]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Copy rank 0's weights to every rank, so all ranks start from the same model (as DDP does at wrap time)."""
    if world()[1] == 1:
        return
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def all_reduce_gradients(model: torch.nn.Module) -> None:
    """Sum every trainable parameter's gradient over ranks: data parallelism's one collective.

    DistributedDataParallel does this during backward, bucket by bucket; here it is written out and runs
    once per optimizer step, after gradient accumulation, so ranks may run different numbers of
    micro-batches (grpo.py skips rows whose advantage is 0). A parameter without a gradient gets zeros.
    """
    for parameter in model.parameters():
        if parameter.requires_grad:
            if parameter.grad is None:  # in one process too, so AdamW counts the same steps with or without torchrun
                parameter.grad = torch.zeros_like(parameter)
            if world()[1] > 1:
                dist.all_reduce(parameter.grad)


def shard(items, rank: int, world_size: int):
    """Rank `rank`'s contiguous share of a global batch, a list or a tensor (its length must divide by world_size)."""
    size = len(items) // world_size
    return items[rank * size : (rank + 1) * size]


def apply_lora(model, r: int, alpha: float, target_modules: str = "all-linear", task_type: str = "CAUSAL_LM"):
    """Freeze the model and add trainable LoRA adapters W + (alpha / r) B A (peft) to `target_modules`.

    B starts at 0, so the wrapped model computes exactly what the base model does; with
    `model.disable_adapter()` it is the base model again, which is the reference policy for free.
    task_type="SEQ_CLS" (a reward model) also trains its new `score` head whole and saves it with the adapters.
    The adapters are added in place: `model` itself runs with them, the returned wrapper saves and merges them.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("--lora-r needs the peft package: pip install peft") from error
    targets = target_modules if target_modules == "all-linear" else [name.strip() for name in target_modules.split(",")]
    transposed = any(type(module).__name__ == "Conv1D" for module in model.modules())  # GPT-2 stores W transposed
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        task_type=task_type,
        lora_dropout=0.0,
        fan_in_fan_out=transposed,
    )
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model) -> None:
    """Keep only each layer's input during the forward pass and recompute the rest in backward: less memory, ~1/3 more compute.

    Active in train mode only; generation must run in eval mode, where the KV cache stays on.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------- the tiny model
def build_tiny_tokenizer(padding_side: str = "left"):
    """A char-level tokenizer: one token per printable ASCII character, plus <pad>, <eos> and <unk>.

    Built with the `tokenizers` library and wrapped in a transformers fast tokenizer, so
    `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it. The `Fuse` decoder joins
    characters without the spaces a word-level decoder would insert.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    characters = list(string.digits + string.ascii_letters + string.punctuation + " \n")
    vocab = {token: index for index, token in enumerate(specials + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_gpt2(tokenizer, n_layer: int = 3, n_embd: int = 128, n_head: int = 4, n_positions: int = 64):
    """A small randomly initialised GPT-2 (about 0.6M parameters at the defaults) with dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


# ----------------------------------------------------------------------------- tensors
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids = cumsum(mask) - 1, clamped at 0: the first real token of every row is position 0.

    Passing these to every teacher-forced forward makes a left-padded row see the same positions
    it saw during generation, so training log-probs equal sampling log-probs.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, from the attention mask (never from token values: pad may equal EOS).

    Right for left padding, right padding and no padding; a row with no real token gives 0.
    """
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def reward_model_scores(reward_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y): the scalar `score` head of an AutoModelForSequenceClassification on the last real token's hidden state.

    Used instead of the model's own forward so positions come from the mask (left padding is safe)
    and the last token is found from the mask, not by looking for pad ids.
    """
    hidden = reward_model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state
    last_hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), last_token_index(attention_mask)]
    return reward_model.score(last_hidden).squeeze(-1).float()


LOGITS_CHUNK_ELEMENTS = 2**24  # 64 MB of float32: the chunk token_logprobs and entropy_from_logits copy at once


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    """Slices of rows of `logits` holding at most LOGITS_CHUNK_ELEMENTS values each, or one row where a row alone holds
    more (length x vocabulary: 78M values for 512 tokens of a 152k vocabulary). A small model's batch is one chunk."""
    rows_per_chunk = max(1, LOGITS_CHUNK_ELEMENTS // max(1, logits[0].numel()))
    return [slice(start, start + rows_per_chunk) for start in range(0, logits.size(0), rows_per_chunk)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token_t | context) = logits_t[token_t] / T - logsumexp(logits_t / T), shape (batch, length).

    The logits are divided by the sampling temperature T so the log-probs are those of the
    distribution the tokens were sampled from. Rows are processed a chunk at a time and the result keeps only
    the chosen token's logit and the log-normaliser, never the full log-softmax. That bounds the memory of
    no-grad passes (reference, old policy); with gradients, autograd still saves each chunk's float32 logits
    for the backward pass. Computed in float32 whatever the logits' dtype.
    """
    parts = []
    for rows in _row_chunks(logits):
        chunk = logits[rows].float() / temperature
        chosen = chunk.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
        parts.append(chosen - torch.logsumexp(chunk, dim=-1))
    return torch.cat(parts)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H_t = -sum_v p_v log p_v of the temperature-scaled distribution at every position, shape (batch, length)."""
    parts = []
    for rows in _row_chunks(logits):
        logp = F.log_softmax(logits[rows].float() / temperature, dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the real completion tokens: 1 up to and including the first EOS, 0 after it.

    Built from positions (index <= index of the first EOS), never from token values, so it is
    right when the pad token equals EOS (gpt2). Rows without EOS are kept whole.
    Returns (mask as long, has_eos as bool per row); has_eos False means the completion was truncated.
    """
    is_eos = completion_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    length = completion_ids.size(1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device).unsqueeze(0)
    return (positions <= first_eos.unsqueeze(1)).long(), has_eos


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask) over `dim` (all entries if None); 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries (Bessel's correction, as in the PPO details)."""
    mean = masked_mean(values, mask)
    count = mask.sum().clamp(min=2.0)
    return ((values - mean) ** 2 * mask).sum() / (count - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; with shift_mean=False the mean is added back.

    PPO whitens advantages with shift_mean=True and rewards with shift_mean=False (whitening
    must not move the reward's sign). Masked-out entries are returned as 0. The mean and the
    (unbiased) variance are those of the whole batch: under torchrun, of every process's entries.
    """
    mask = mask.to(values.dtype)
    count = all_reduce_sum(mask.sum())
    mean = all_reduce_sum((values * mask).sum()) / count.clamp(min=1)
    var = all_reduce_sum(((values - mean) ** 2 * mask).sum()) / (count.clamp(min=2) - 1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ----------------------------------------------------------------------------- data
def read_jsonl(path: str, required_fields: tuple[str, ...]) -> list[dict]:
    """Read a JSONL file of objects; every line must hold each required field as a string (numbers are converted).

    A bad line raises ValueError naming the file, the line number and the field, so nothing is
    silently skipped. Blank lines are ignored.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    rows = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            for field in required_fields:
                if field not in row:
                    raise ValueError(f"{path}:{line_number}: missing field {field!r} (required: {', '.join(required_fields)})")
                value = row[field]
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    raise ValueError(f"{path}:{line_number}: field {field!r} must be a string, got {type(value).__name__}")
                if isinstance(value, float) and not math.isfinite(value):  # json reads NaN and Infinity
                    raise ValueError(f"{path}:{line_number}: field {field!r} must be a string or a finite number, got {value}")
                row[field] = str(value)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def load_hf_dataset(name: str, split: str, fields: dict[str, str]) -> list[dict]:
    """Rows of a Hugging Face dataset (needs the optional `datasets` package), with columns renamed by `fields`.

    `fields` maps our field name (prompt, answer, ...) to the dataset's column name.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"dataset {name!r} is neither 'arithmetic' nor a .jsonl file; loading it from the hub needs `pip install datasets`"
        ) from None
    table = datasets.load_dataset(name, split=split)
    missing = [column for column in fields.values() if column not in table.column_names]
    if missing:
        raise ValueError(f"dataset {name!r} has no column(s) {missing}; it has {table.column_names}")
    return [{ours: str(row[theirs]) for ours, theirs in fields.items()} for row in table]


def format_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    """Wrap the prompt as a user turn of the tokenizer's chat template when asked and one exists."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


def tokenize_prompt(tokenizer, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt. A templated prompt already carries its special tokens; a plain one gets BOS where the tokenizer adds it."""
    text = format_prompt(tokenizer, prompt, chat_template)
    templated = chat_template and text != prompt
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


# ----------------------------------------------------------------------------- the arithmetic task
def _is_held_out(a: int, b: int) -> bool:
    """A fixed 10% of all operand pairs is reserved for evaluation, the same in every script and run."""
    return zlib.crc32(f"{a}+{b}".encode()) % 10 == 0


def arithmetic_problems(n: int, digits: int = 2, split: str = "train", seed: int = 0) -> list[dict]:
    """`n` addition problems {"prompt": "37+45=", "answer": "82"} with operands of up to `digits` digits.

    split="train" never yields a held-out pair; split="test" yields only held-out pairs.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    high = 10**digits - 1
    problems = []
    while len(problems) < n:
        a, b = rng.randint(0, high), rng.randint(0, high)
        if _is_held_out(a, b) == (split == "test"):
            problems.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return problems


def arithmetic_eval_set(n: int = 500, digits: int = 2) -> list[dict]:
    """The held-out problems every script evaluates on (a fixed seed, so accuracies are comparable)."""
    return arithmetic_problems(n, digits, split="test", seed=1234)


def near_miss(a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong answer to a+b: the sum with a dropped carry, one digit off by one, or off by ten."""
    correct = a + b
    digits = str(correct)
    candidates = set()
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:012d}", f"{b:012d}")))
    if len(str(no_carry)) >= len(digits) - 1:  # 50+50 -> 0 is not plausible; 57+68 -> 15 is
        candidates.add(no_carry)
    for position in range(len(digits)):
        for delta in (-1, 1):
            digit = int(digits[position]) + delta
            if 0 <= digit <= 9 and not (position == 0 and digit == 0 and len(digits) > 1):
                candidates.add(int(digits[:position] + str(digit) + digits[position + 1 :]))
    candidates.update({correct + 10, correct - 10})
    candidates = sorted(c for c in candidates if c >= 0 and c != correct)
    return str(rng.choice(candidates))


def arithmetic_preference_pairs(n: int, digits: int = 2, split: str = "train", seed: int = 0) -> list[dict]:
    """`n` pairs {"prompt", "chosen", "rejected"}: the correct sum against a near miss (see `near_miss`)."""
    rng = random.Random(seed + 1)
    pairs = []
    for problem in arithmetic_problems(n, digits, split, seed):
        a, b = (int(x) for x in problem["prompt"][:-1].split("+"))
        pairs.append({"prompt": problem["prompt"], "chosen": problem["answer"], "rejected": near_miss(a, b, rng)})
    return pairs


_INTEGER = re.compile(r"-?\d{1,30}")


def exact_match(completion: str, answer: str) -> float:
    """1.0 if the completion, stripped of surrounding whitespace, is exactly the answer as an integer, else 0.0.

    The completion is parsed with a regular expression, never `eval`: garbage, empty or
    overlong text scores 0.0 and never raises.
    """
    text = completion.strip()
    return 1.0 if _INTEGER.fullmatch(text) is not None and text == answer.strip() else 0.0


def arithmetic_reward(prompts: list[str], completions: list[str], answer: list[str], **unused_fields) -> list[float]:
    """Reward function of the arithmetic task: exact match of each completion with its answer."""
    return [exact_match(completion, target) for completion, target in zip(completions, answer)]


# ----------------------------------------------------------------------------- generation and evaluation
def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Text of each completion's real tokens (the mask of `completion_mask`), special tokens dropped."""
    kept = [[token for token, keep in zip(ids, row_mask) if keep] for ids, row_mask in zip(completion_ids.tolist(), mask.tolist())]
    return tokenizer.batch_decode(kept, skip_special_tokens=True)


@torch.no_grad()
def evaluate_accuracy(
    model, tokenizer, problems: list[dict], max_new_tokens: int, batch_size: int = 256, chat_template: bool = False, reward_fn=None
) -> tuple[float, list[str]]:
    """Held-out greedy accuracy: generate with do_sample=False and score with `reward_fn` (exact match by default).

    Returns (mean reward, the completions) so callers can show a few samples.
    """
    reward_fn = reward_fn or arithmetic_reward
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, world_size = world()
    mine = problems[rank::world_size]  # under torchrun each rank generates every world_size-th problem
    completions = []
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        prompt_ids = [tokenize_prompt(tokenizer, problem["prompt"], chat_template) for problem in batch]
        inputs = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt", padding_side="left").to(device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        completion_ids = output[:, inputs["input_ids"].size(1) :]
        mask, _ = completion_mask(completion_ids, tokenizer.eos_token_id)
        completions += decode_completions(tokenizer, completion_ids, mask)
    model.train(was_training)
    if world_size > 1:  # every rank gets all completions back, in the order of `problems`
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, completions)
        completions = [per_rank[index % world_size][index // world_size] for index in range(len(problems))]
    fields = {key: [problem[key] for problem in problems] for key in problems[0] if key != "prompt"}
    rewards = reward_fn([problem["prompt"] for problem in problems], completions, **fields)
    return sum(rewards) / len(rewards), completions


# ----------------------------------------------------------------------------- logging and saving
class _NoWriter:
    """The writer of ranks other than 0: metrics are reduced over ranks and logged once, by rank 0."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def setup_logging(args, run_name: str, log_dir: str = "runs"):
    """A TensorBoard SummaryWriter at runs/{run_name} with the hyper-parameters as a text table; W&B too when args.track."""
    from torch.utils.tensorboard import SummaryWriter

    if world()[0] != 0:
        return _NoWriter()

    if getattr(args, "track", False):
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    writer = SummaryWriter(str(Path(log_dir, run_name).resolve()))  # absolute: the writer thread outlives a chdir
    table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def run_name_for(args) -> str:
    """`{exp_name}__{seed}__{unix time}`, the CleanRL run naming."""
    return f"{args.exp_name}__{args.seed}__{int(time.time())}"


def save_checkpoint(model, tokenizer, output_dir: str) -> None:
    """Write model + tokenizer in Hugging Face format, whole or not at all: `output_dir` is never a partial checkpoint.

    Everything is written to a temporary sibling folder first, which then replaces `output_dir` by two
    renames (the old folder aside, the new one in). A crash while writing leaves the previous checkpoint as
    it was; a crash in the instant between the renames leaves it whole under `.{name}.old-{pid}`, with
    `output_dir` missing (a folder cannot be swapped in one portable step). Under torchrun only rank 0
    writes (the others wait for it). A LoRA model is saved with its adapters merged into the weights, a
    plain model that `from_pretrained` loads, and the adapters alone under `adapter/` as well: merged into
    bf16 weights (--dtype bfloat16) the update is rounded, the adapters keep it exact. The merge changes
    `model`, so save at the end.
    """
    rank = world()[0]
    target = Path(output_dir)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    previous = target.with_name(f".{target.name}.old-{os.getpid()}")
    if rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    try:
        if hasattr(model, "merge_and_unload"):
            if rank == 0:
                model.save_pretrained(temporary / "adapter")
            model = model.merge_and_unload()
        if rank == 0:
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if rank == 0:
        if target.exists():
            target.rename(previous)
        temporary.rename(target)
        shutil.rmtree(previous, ignore_errors=True)
    if world()[1] > 1:
        dist.barrier()
