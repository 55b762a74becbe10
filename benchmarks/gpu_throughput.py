"""Throughput of grpo.py and dpo.py on a GPU: generation and training tokens per second, and model FLOPs utilisation.

    python benchmarks/gpu_throughput.py           # CUDA, a ~0.4B Qwen2-shaped model, mixed bf16
    python benchmarks/gpu_throughput.py --size tiny --device cpu --dtype float32 --peak-tflops 0.1   # same, a laptop

1. Builds a randomly initialised Qwen2-architecture model from a config, in this process (no hub), with the
   char-level tokenizer, and saves it with save_pretrained.
2. Runs grpo.py and dpo.py on it for a few steps (they must run end to end on the device, in --dtype).
3. Times, in this process and with the scripts' own functions:
   - generation: model.generate, sampled, KV cache, every completion forced to its full length;
   - a GRPO training step: grpo.completion_logprobs + grpo.grpo_loss, backward, clipping, AdamW;
   - a DPO training step: dpo.concatenated_forward + dpo.dpo_loss, backward, clipping, AdamW.
   MFU = achieved FLOP/s / the GPU's peak dense bf16 FLOP/s, with training FLOPs per token = 6 N + 12 L d T
   (N: non-embedding parameters, L layers, width d, context T; PaLM's estimate: forward + backward, attention
   scores included). Generation is memory-bound, so only its tokens per second are reported.
Writes benchmarks/results/gpu_throughput_{size}_{device}.md.
"""

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

import harness

sys.path.insert(0, str(harness.ROOT))
import common  # noqa: E402
import dpo  # noqa: E402
import grpo  # noqa: E402
import sft  # noqa: E402

SIZES = {  # Qwen2 shapes: hidden, layers, heads, key/value heads, MLP width
    "0.4b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256
    ),
}
# dense, per vendor sheets
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


@dataclass
class Args:
    size: str = "0.4b"
    """model shape: 0.4b or tiny"""
    device: str = "cuda"
    """where to run"""
    dtype: str = "mixed"
    """precision, as the scripts' --dtype"""
    peak_tflops: float | None = None
    """the device's peak dense bf16 TFLOP/s; default from the GPU's name (H100, H200, A100, ...)"""
    batch_size: int = 32
    """sequences per timed generation / GRPO step (DPO: pairs = batch_size / 2)"""
    prompt_length: int = 64
    """prompt tokens per sequence"""
    completion_length: int = 192
    """completion tokens per sequence"""
    repeats: int = 3
    """timed repetitions of each measurement (after one warm-up)"""
    script_steps: int = 3
    """steps of the grpo.py and dpo.py runs"""


def build_model(size: str, folder: Path) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = sft.build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True, **SIZES[size]
    )
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    common.save_model(model, tokenizer, str(folder / "model"))
    return str(folder / "model")


def timed(function, device: torch.device, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` runs after one warm-up, synchronising the GPU around each."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(args: Args) -> None:
    device = torch.device(args.device)
    peak = args.peak_tflops
    if peak is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)
        if peak is None:
            raise ValueError(f"no peak bf16 FLOP/s known for {name!r}: pass --peak-tflops")
    with tempfile.TemporaryDirectory(prefix="gpu-") as folder:
        model_path = build_model(args.size, Path(folder))
        rows = [{"prompt": f"{i} + {i % 7} =", "answer": str(i + i % 7)} for i in range(64)]
        pairs = [
            {"prompt": row["prompt"], "chosen": row["answer"], "rejected": str(int(row["answer"]) + 1)} for row in rows
        ]
        (Path(folder) / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (Path(folder) / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
        shared = ["--model", model_path, "--device", args.device, "--dtype", args.dtype]
        shared += ["--total-steps", str(args.script_steps), "--learning-rate", "1e-6", "--eval-size", "4"]
        grpo_flags = ["--dataset", f"{folder}/qa.jsonl", "--batch-size", "64", "--group-size", "8"]
        grpo_flags += ["--micro-batch-size", "32", "--max-completion-length", "32", "--output-dir", f"{folder}/grpo"]
        dpo_flags = ["--dataset", f"{folder}/pairs.jsonl", "--batch-size", "16", "--output-dir", f"{folder}/dpo"]
        script_runs = {
            "grpo.py": harness.run_script("grpo.py", shared + grpo_flags),
            "dpo.py": harness.run_script("dpo.py", shared + dpo_flags),
        }

        dtype, autocast_dtype = common.choose_precision(args.dtype, device)
        model = common.load_model(model_path, dtype=dtype, autocast_dtype=autocast_dtype).to(device)
        config = model.config
        non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
        context = args.prompt_length + args.completion_length
        flops_per_token = 6 * non_embedding + 12 * config.num_hidden_layers * config.hidden_size * context
        generator = torch.Generator().manual_seed(0)
        shape = (args.batch_size, args.prompt_length)
        prompts = torch.randint(3, config.vocab_size, shape, generator=generator).to(device)

        def generate():
            with torch.no_grad():
                return model.generate(
                    input_ids=prompts,
                    attention_mask=torch.ones_like(prompts),
                    do_sample=True,
                    max_new_tokens=args.completion_length,
                    min_new_tokens=args.completion_length,
                    pad_token_id=config.pad_token_id,
                )

        model.eval()
        generation_seconds = timed(generate, device, args.repeats)
        sequences = generate()
        attention_mask = torch.ones_like(sequences)
        mask = torch.ones(args.batch_size, args.completion_length, device=device)
        advantages = torch.randn(args.batch_size, device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def grpo_step():
            logprobs, _ = grpo.completion_logprobs(model, sequences, attention_mask, args.prompt_length, 1.0)
            loss, _ = grpo.grpo_loss(
                logprobs=logprobs, old_logprobs=logprobs.detach(), advantages=advantages, mask=mask
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        half = args.batch_size // 2
        completion_mask = torch.zeros_like(sequences)
        completion_mask[:, args.prompt_length :] = 1
        dpo_batch = {"input_ids": sequences, "attention_mask": attention_mask, "completion_mask": completion_mask}
        reference = torch.zeros(half, device=device)

        def dpo_step():
            chosen, rejected = dpo.concatenated_forward(model, dpo_batch)
            losses, _, _ = dpo.dpo_loss(
                policy_chosen_logps=chosen,
                policy_rejected_logps=rejected,
                ref_chosen_logps=reference,
                ref_rejected_logps=reference,
                beta=0.1,
            )
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        model.train()
        grpo_seconds = timed(grpo_step, device, args.repeats)
        dpo_seconds = timed(dpo_step, device, args.repeats)
        peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")

    tokens = args.batch_size * context
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    generated = args.batch_size * args.completion_length / generation_seconds
    table = [["generation (sampled, KV cache)", f"{generated:,.0f}", "-", "-"]]
    for name, seconds in (("GRPO training step", grpo_seconds), ("DPO training step", dpo_seconds)):
        achieved = flops_per_token * tokens / seconds
        table.append([name, f"{tokens / seconds:,.0f}", f"{achieved / 1e12:.1f}", f"{achieved / (peak * 1e12):.1%}"])
    script_table = [
        [script, f"{run['wall_s']:.0f}", f"{run['peak_rss_mb']:.0f}"] for script, run in script_runs.items()
    ]
    text = (
        f"# Throughput on {device_name}\n\n"
        f"Command: `python benchmarks/gpu_throughput.py --size {args.size} --device {args.device} "
        f"--dtype {args.dtype}`. Qwen2-shaped model built in-process: {non_embedding / 1e6:.0f}M non-embedding "
        "parameters, "
        f"{config.num_hidden_layers} layers, width {config.hidden_size}; batch {args.batch_size} sequences of "
        f"{args.prompt_length} prompt + {args.completion_length} completion tokens; peak dense bf16 {peak} TFLOP/s; "
        f"peak GPU memory {peak_memory:.1f} GiB.\n\n"
        + harness.markdown_table(["measurement", "tokens/s", "achieved TFLOP/s", "MFU"], table)
        + "\nThe scripts themselves, a few steps each on the same model and device (wall time includes loading):\n\n"
        + harness.markdown_table(["script", "wall s", "peak RSS MB"], script_table)
    )
    harness.write_result(f"gpu_throughput_{args.size}_{args.device.split(':')[0]}.md", text)
    print(text)


if __name__ == "__main__":
    main(tyro.cli(Args))
