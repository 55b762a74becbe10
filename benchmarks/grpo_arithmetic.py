"""GRPO learning benchmark: from the sft.py checkpoint, `python grpo.py` with default flags on 2-digit addition.

The bar: held-out greedy exact-match accuracy rises by at least 10 points (or to at least 95%) within
5 minutes of wall time on a 2-core CPU, median of 3 seeds. Prints the accuracy curves and writes
benchmarks/results/grpo_arithmetic.md with two plots (accuracy vs step, accuracy vs wall time).

    python benchmarks/grpo_arithmetic.py
"""

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SEEDS = (1, 2, 3)
BUDGET_S = 300


def main() -> None:
    checkpoint = harness.ensure_sft_checkpoint()
    runs = {}
    for seed in SEEDS:
        print(f"grpo.py --seed {seed} (default flags)", flush=True)
        with tempfile.TemporaryDirectory() as out:
            runs[seed] = harness.run_script("grpo.py", ["--seed", str(seed), "--model", checkpoint, "--output-dir", f"{out}/grpo"])

    rows, gains, finals, step_times, walls, memories = [], [], [], [], [], []
    for seed, run in runs.items():
        accuracy = run["scalars"]["charts/eval_accuracy"]
        print(f"seed {seed} accuracy curve (step, seconds, accuracy): {[(s, round(t), round(v, 3)) for s, t, v in accuracy]}")
        # time per training step: median gap between consecutive steps' logs (evaluation pauses excluded)
        times = [t for _, t, _ in run["scalars"]["charts/reward"]]
        step_time = statistics.median(b - a for a, b in zip(times, times[1:]))
        start, final = accuracy[0][2], accuracy[-1][2]
        gains.append(final - start)
        finals.append(final)
        step_times.append(step_time)
        walls.append(run["wall_s"])
        memories.append(run["peak_rss_mb"])
        rows.append(
            [
                seed,
                f"{start:.3f}",
                f"{final:.3f}",
                f"{final - start:+.3f}",
                len(times),
                f"{run['wall_s']:.0f}",
                f"{step_time:.3f}",
                f"{run['peak_rss_mb']:.0f}",
            ]
        )
    rows.append(
        [
            "median [min, max]",
            "",
            harness.median_and_range(finals),
            harness.median_and_range(gains),
            "",
            harness.median_and_range(walls),
            harness.median_and_range(step_times),
            harness.median_and_range(memories),
        ]
    )
    headers = ["seed", "accuracy before", "accuracy after", "gain", "steps", "wall s (whole run)", "s/step", "peak RSS MB"]
    passed = (statistics.median(gains) >= 0.10 or statistics.median(finals) >= 0.95) and max(walls) <= BUDGET_S

    plot = harness.RESULTS / "grpo_arithmetic.png"
    harness.plot_curves(
        {f"seed {seed}": run["scalars"]["charts/eval_accuracy"] for seed, run in runs.items()},
        plot,
        "GRPO on 2-digit addition (default flags)",
        "held-out greedy accuracy",
    )
    text = (
        "# GRPO on 2-digit addition\n\n"
        "`python benchmarks/grpo_arithmetic.py`: `python grpo.py --seed S --model checkpoints/sft` (every other flag at its\n"
        f"default) for seeds {', '.join(map(str, SEEDS))}, on a 2-core CPU. Accuracy is held-out greedy exact match on\n"
        "500 problems, before the first and after the last step. s/step is the median time of one rollout + update\n"
        "(evaluation excluded); wall s is the whole process, model loading and evaluations included.\n\n"
        + harness.markdown_table(headers, rows)
        + f"\nBar (median gain >= 0.10 or median accuracy >= 0.95, every run within {BUDGET_S} s): "
        + ("**met**" if passed else "**not met**")
        + f"\n\n![accuracy vs step and time]({plot.name})\n"
    )
    print(text)
    harness.write_result("grpo_arithmetic.md", text)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
