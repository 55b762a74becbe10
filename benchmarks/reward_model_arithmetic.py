"""Benchmark: reward_model.py with default flags on arithmetic near-miss preferences, 3 seeds, from the sft.py checkpoint.

Bar: held-out pair accuracy >= 0.90 within 3 minutes on a 2-core CPU.
Run (from the repository root): flock /tmp/rl-reference-cpu.lock python benchmarks/reward_model_arithmetic.py
Writes benchmarks/results/reward_model_arithmetic.md and reward_model_arithmetic.png.
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SEEDS = [1, 2, 3]
BAR_ACCURACY = 0.90
BAR_SECONDS = 180


def main() -> None:
    sft_checkpoint = harness.ensure_sft_checkpoint()
    rows, curves, finals, walls, step_times, memories = [], {}, [], [], [], []
    for seed in SEEDS:
        print(f"reward_model.py --seed {seed}", flush=True)
        # default flags; the checkpoint lands in the run's temporary working folder
        result = harness.run_script("reward_model.py", ["--model", sft_checkpoint, "--seed", str(seed)])
        accuracy = result["scalars"]["charts/eval_accuracy"]
        sps = result["scalars"]["charts/SPS"][-1][2]
        reached = next((f"{seconds:.0f}s (step {step})" for step, seconds, value in accuracy if value >= BAR_ACCURACY), "never")
        curves[f"seed {seed}"] = accuracy
        finals.append(accuracy[-1][2])
        walls.append(result["wall_s"])
        step_times.append(1 / sps)
        memories.append(result["peak_rss_mb"])
        margin = result["scalars"]["charts/eval_margin"][-1][2]
        rows.append(
            [seed, f"{finals[-1]:.3f}", f"{margin:.2f}", reached, f"{walls[-1]:.0f}", f"{step_times[-1]:.3f}", f"{memories[-1]:.0f}"]
        )

    headers = ["seed", "final held-out pair accuracy", "mean margin", f"first eval >= {BAR_ACCURACY}", "wall s", "s/step", "peak RSS MB"]
    summary = [
        "median [min, max]",
        harness.median_and_range(finals),
        "",
        "",
        harness.median_and_range(walls),
        harness.median_and_range(step_times),
        harness.median_and_range(memories),
    ]
    passed = statistics.median(finals) >= BAR_ACCURACY and statistics.median(walls) <= BAR_SECONDS
    plot = harness.RESULTS / "reward_model_arithmetic.png"
    harness.plot_curves(curves, plot, "reward model: held-out pair accuracy (near-miss arithmetic)", "pair accuracy")
    text = (
        "# Reward model on arithmetic near-miss preferences\n\n"
        "`python reward_model.py --model checkpoints/sft --seed S` (default flags), seeds "
        f"{', '.join(map(str, SEEDS))}, run by `flock /tmp/rl-reference-cpu.lock python benchmarks/reward_model_arithmetic.py`.\n"
        "Held-out pairs: 500 test-split problems, correct sum vs a near miss (dropped carry, one digit off by one, off by ten).\n"
        "Wall time includes start-up (imports, loading, tokenising) and the final save.\n\n"
        + harness.markdown_table(headers, rows + [summary])
        + f"\nBar (median final accuracy >= {BAR_ACCURACY} within {BAR_SECONDS} s): {'met' if passed else 'NOT met'}.\n\n"
        f"![held-out pair accuracy against steps and wall time]({plot.name})\n"
    )
    harness.write_result("reward_model_arithmetic.md", text)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
