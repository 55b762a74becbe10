"""What the memory savers cost and save on a real model: SmolLM2-135M-Instruct on this CPU.

    python benchmarks/studies/memory_savers.py      # converts SmolLM2 once if missing (benchmarks/convert_smollm2.py)

dpo.py (8 pairs per step) and grpo.py (4 prompts x 8 completions of <= 24 tokens), each as is, with
--gradient-checkpointing, with LoRA (--lora-r 16 on every linear layer) and with both: seconds per step and the
process's peak resident memory, one run after the other in this one invocation. Writes
benchmarks/results/memory_savers.md. Finding: benchmarks/results/2026-11-21-memory-savers.md.
"""

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro
from smollm2 import step_seconds, write_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

VARIANTS = {
    "full fine-tuning": [],
    "--gradient-checkpointing": ["--gradient-checkpointing"],
    "--lora-r 16": ["--lora-r", "16"],
    "--lora-r 16 --gradient-checkpointing": ["--lora-r", "16", "--gradient-checkpointing"],
}


@dataclass
class Args:
    steps: int = 4
    """optimizer steps per run (the first is not timed)"""
    model: str = "checkpoints/smollm2-135m-instruct"
    """the converted SmolLM2 folder (converted if missing)"""


def main(args: Args) -> None:
    model = str(harness.ROOT / args.model)
    if not (Path(model) / "config.json").is_file():
        harness.run_script("benchmarks/convert_smollm2.py", ["--output-dir", model])
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-") as folder:
        qa, preferences = write_data(Path(folder), rows=48)  # few pairs: dpo.py precomputes their reference log-probs
        common_flags = ["--model", model, "--chat-template", "--total-steps", str(args.steps), "--eval-every", "1000"]
        scripts = {
            "dpo.py": ["--dataset", preferences, "--batch-size", "8", "--learning-rate", "1e-6", "--eval-size", "8"],
            "grpo.py": ["--dataset", qa, "--reward-funcs", "math", "--batch-size", "32", "--group-size", "8"]
            + [
                "--micro-batch-size",
                "32",
                "--max-completion-length",
                "24",
                "--learning-rate",
                "1e-6",
                "--eval-size",
                "4",
            ],
        }
        for script, flags in scripts.items():
            for index, (name, extra) in enumerate(VARIANTS.items()):
                output_dir = f"{folder}/{script.removesuffix('.py')}-{index}"  # a new folder for each run
                run = harness.run_script(script, common_flags + flags + extra + ["--output-dir", output_dir])
                rows.append([script, name, f"{step_seconds(run['scalars']):.2f}", f"{run['peak_rss_mb']:.0f}"])
    text = (
        "# Memory savers on SmolLM2-135M-Instruct (this CPU)\n\n"
        f"Command: `python benchmarks/studies/memory_savers.py --steps {args.steps}`. dpo.py: 8 pairs per step; "
        "grpo.py: 4 prompts "
        "x 8 completions of <= 24 tokens, one micro-batch of 32; chat template, fp32 on CPU. Peak RSS is the whole "
        "process (weights, optimizer state, activations, the Python runtime).\n\n"
        + harness.markdown_table(["script", "variant", "s/step", "peak RSS MB"], rows)
    )
    harness.write_result("memory_savers.md", text)


if __name__ == "__main__":
    main(tyro.cli(Args))
