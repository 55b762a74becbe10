"""DPO learning benchmark: from the sft.py checkpoint, `python dpo.py` with default flags on the built-in arithmetic
preference pairs, 3 seeds. Bar: held-out greedy accuracy up by >= 5 points (median of seeds) within 5 minutes on a
2-core CPU, with rewards/accuracies > 0.9 at the end.

    flock /tmp/rl-reference-cpu.lock python benchmarks/dpo_arithmetic.py [--ablation]

`--ablation` adds one run of plain DPO (`--sft-coef 0`, seed 1) to the table's text and the plot.

Writes benchmarks/results/dpo_arithmetic.md and dpo_arithmetic.png.
"""

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SEEDS = [1, 2, 3]
TAIL = 20  # rewards/accuracies is one batch per step, so the end value is also given as the mean of the last TAIL steps


def main() -> None:
    checkpoint = harness.ensure_sft_checkpoint()
    runs = {}
    for seed in SEEDS:
        print(f"seed {seed}: python dpo.py --model {checkpoint} --seed {seed}", flush=True)
        with tempfile.TemporaryDirectory() as output_dir:  # the default output_dir would land in run_script's temporary folder anyway
            runs[seed] = harness.run_script("dpo.py", ["--model", checkpoint, "--seed", str(seed), "--output-dir", f"{output_dir}/dpo"])

    ablation = ""
    if "--ablation" in sys.argv:  # not part of the bar: plain DPO, without the NLL term on the chosen completions
        with tempfile.TemporaryDirectory() as output_dir:
            plain = harness.run_script(
                "dpo.py", ["--model", checkpoint, "--seed", "1", "--sft-coef", "0", "--output-dir", f"{output_dir}/dpo"]
            )
        plain_curve = plain["scalars"]["charts/eval_accuracy"]
        plain_accuracy = [(step, value) for step, _, value in plain_curve]
        plain_reward_accuracy = statistics.mean(value for _, _, value in plain["scalars"]["rewards/accuracies"][-TAIL:])
        ablation = (
            f"Ablation, plain DPO (`--sft-coef 0`, seed 1, otherwise default flags): held-out accuracy {plain_accuracy[0][1]:.3f} -> "
            f"{plain_accuracy[-1][1]:.3f} (lowest {min(value for _, value in plain_accuracy):.3f}), rewards/accuracies (mean of last "
            f"{TAIL}) {plain_reward_accuracy:.3f}, {plain['wall_s']:.0f} s.\n\n"
        )

    rows, summary = [], {"start": [], "end": [], "gain": [], "reward_accuracy": [], "wall_s": [], "s_per_step": [], "rss": []}
    for seed, run in runs.items():
        accuracy = [(step, value) for step, _, value in run["scalars"]["charts/eval_accuracy"]]
        reward_accuracy = [value for _, _, value in run["scalars"]["rewards/accuracies"]]
        # time per training step: the median gap between consecutive steps' logged events (evaluation steps are the outliers)
        times = [seconds for _, seconds, _ in run["scalars"]["losses/dpo_loss"]]
        s_per_step = statistics.median(later - earlier for earlier, later in zip(times, times[1:]))
        values = {
            "start": accuracy[0][1],
            "end": accuracy[-1][1],
            "gain": accuracy[-1][1] - accuracy[0][1],
            "reward_accuracy": statistics.mean(reward_accuracy[-TAIL:]),
            "wall_s": run["wall_s"],
            "s_per_step": s_per_step,
            "rss": run["peak_rss_mb"],
        }
        for key, value in values.items():
            summary[key].append(value)
        rows.append(
            [
                seed,
                f"{values['start']:.3f}",
                f"{values['end']:.3f}",
                f"{values['gain'] * 100:+.1f}",
                f"{reward_accuracy[-1]:.2f} / {values['reward_accuracy']:.3f}",
                f"{values['wall_s']:.0f}",
                f"{s_per_step:.4f}",
                f"{values['rss']:.0f}",
            ]
        )
    rows.append(
        [
            "median [min, max]",
            harness.median_and_range(summary["start"]),
            harness.median_and_range(summary["end"]),
            harness.median_and_range([gain * 100 for gain in summary["gain"]]),
            harness.median_and_range(summary["reward_accuracy"]),
            harness.median_and_range(summary["wall_s"]),
            harness.median_and_range(summary["s_per_step"]),
            harness.median_and_range(summary["rss"]),
        ]
    )
    headers = [
        "seed",
        "held-out accuracy, start",
        "held-out accuracy, end",
        "gain (points)",
        f"rewards/accuracies: last step / mean of last {TAIL}",
        "wall time (s)",
        "s/step",
        "peak RSS (MB)",
    ]
    curves = {f"seed {seed}": run["scalars"]["charts/eval_accuracy"] for seed, run in runs.items()}
    if ablation:
        curves["seed 1, --sft-coef 0 (plain DPO)"] = plain_curve
    harness.plot_curves(curves, harness.RESULTS / "dpo_arithmetic.png", "DPO on arithmetic near-miss pairs", "held-out greedy accuracy")
    gain, reward_accuracy, wall_s = (statistics.median(summary[key]) for key in ("gain", "reward_accuracy", "wall_s"))
    passed = gain >= 0.05 and reward_accuracy > 0.9 and max(summary["wall_s"]) <= 300
    text = (
        "# DPO on arithmetic\n\n"
        f"`python dpo.py --model checkpoints/sft --seed {{{', '.join(map(str, SEEDS))}}}` (default flags), run by\n"
        "`flock /tmp/rl-reference-cpu.lock python benchmarks/dpo_arithmetic.py` on the project's 2-core CPU machine.\n"
        "Wall time is the whole run: loading, precomputing the reference log-probs, training, evaluation and saving.\n\n"
        + harness.markdown_table(headers, rows)
        + f"\nBar (median gain >= 5 points, median rewards/accuracies > 0.9, every run <= 300 s): "
        f"{'met' if passed else 'NOT met'} (gain {gain * 100:+.1f} points, rewards/accuracies {reward_accuracy:.3f}, "
        f"slowest run {max(summary['wall_s']):.0f} s).\n\n"
        + ablation
        + "![held-out accuracy against steps and wall time](dpo_arithmetic.png)\n"
    )
    harness.write_result("dpo_arithmetic.md", text)
    print(text)


if __name__ == "__main__":
    main()
