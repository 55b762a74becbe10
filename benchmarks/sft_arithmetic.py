"""Benchmark: sft.py with default flags on 2-digit addition, 3 seeds: the first stage of the arithmetic pipeline.

Bar (the foundation issue): held-out greedy accuracy >= 0.60 within 3 minutes on a 2-core CPU.
Run (from the repository root): flock /tmp/rl-reference-cpu.lock python benchmarks/sft_arithmetic.py
Writes benchmarks/results/sft_arithmetic.md and sft_arithmetic.png. The checkpoint the other benchmarks
start from (checkpoints/sft) is seed 1 of this run's flags; this benchmark trains in temporary folders.
"""

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SEEDS = [1, 2, 3]
BAR_ACCURACY = 0.60
BAR_SECONDS = 180


def main() -> None:
    rows, curves, finals, walls, step_times, memories = [], {}, [], [], [], []
    for seed in SEEDS:
        print(f"sft.py --seed {seed}", flush=True)
        with tempfile.TemporaryDirectory() as output_dir:
            result = harness.run_script("sft.py", ["--seed", str(seed), "--output-dir", output_dir])
        accuracy = result["scalars"]["charts/eval_accuracy"]
        curves[f"seed {seed}"] = accuracy
        finals.append(accuracy[-1][2])
        walls.append(result["wall_s"])
        step_times.append(1 / result["scalars"]["charts/SPS"][-1][2])
        memories.append(result["peak_rss_mb"])
        eval_loss = result["scalars"]["charts/eval_loss"][-1][2]
        rows.append([seed, f"{finals[-1]:.3f}", f"{eval_loss:.3f}", f"{walls[-1]:.0f}", f"{step_times[-1]:.3f}", f"{memories[-1]:.0f}"])

    headers = ["seed", "final held-out greedy accuracy", "final eval loss", "wall s", "s/step", "peak RSS MB"]
    summary = ["median [min, max]", harness.median_and_range(finals), ""]
    summary += [harness.median_and_range(values) for values in (walls, step_times, memories)]
    passed = statistics.median(finals) >= BAR_ACCURACY and max(walls) <= BAR_SECONDS
    plot = harness.RESULTS / "sft_arithmetic.png"
    harness.plot_curves(curves, plot, "SFT on 2-digit addition (default flags)", "held-out greedy accuracy")
    text = (
        "# SFT on 2-digit addition\n\n"
        f"`python sft.py --seed S` (default flags: the tiny char-level GPT-2 from scratch), seeds {', '.join(map(str, SEEDS))}, "
        "run by `flock /tmp/rl-reference-cpu.lock python benchmarks/sft_arithmetic.py` on a 2-core CPU.\n"
        "Accuracy is held-out greedy exact match on 500 problems (`common.arithmetic_eval_set`). Wall time is the whole\n"
        "process (start-up, evaluations and saving included); s/step includes the evaluations.\n\n"
        + harness.markdown_table(headers, rows + [summary])
        + f"\nBar (median final accuracy >= {BAR_ACCURACY}, every run within {BAR_SECONDS} s): {'met' if passed else 'NOT met'}.\n\n"
        f"![held-out accuracy against steps and wall time]({plot.name})\n"
    )
    harness.write_result("sft_arithmetic.md", text)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
