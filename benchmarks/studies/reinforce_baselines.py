"""What the baseline buys: reinforce.py with --baseline leave-one-out, mean and none on 2-digit addition.

From each starting checkpoint (the sft.py checkpoint, and a weaker one: sft.py stopped after --weak-sft-steps),
two measurements:

1. Variance of the gradient estimate: from the fixed starting policy, R independent rollouts of one batch each
   (reinforce.py's default batch: 16 prompts x 8 completions, fresh prompts every rollout), and for each rollout the
   flattened gradient g_r of reinforce.py's loss under each baseline (the same samples for all three). The variance
   is the mean squared distance to the mean gradient, (1/R) sum_r ||g_r - mean_g||^2 (summed over every parameter).
2. Learning: `python reinforce.py --baseline B --seed S --total-steps N` (every other flag at its default) for each
   baseline and seed; held-out greedy accuracy against steps, and the mean training reward.

    python benchmarks/studies/reinforce_baselines.py [--steps 1000] [--seeds 1 2 3] [--rollouts 200]

Writes benchmarks/results/reinforce_baselines.md and one PNG of accuracy curves per starting checkpoint. Finding:
benchmarks/results/2026-12-07-reinforce-baselines.md.
"""

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
import common  # noqa: E402
import harness  # noqa: E402
import reinforce  # noqa: E402
import tasks  # noqa: E402

BASELINES = ("leave-one-out", "mean", "none")
# the gradient estimators whose variance is measured: (baseline, a constant added to every reward); the last shows
# what no baseline does when the reward is shifted (leave-one-out and mean are unchanged by a shift)
ESTIMATORS = {baseline: (baseline, 0.0) for baseline in BASELINES} | {"none, reward + 1": ("none", 1.0)}


@dataclass
class Args:
    steps: int = 1000
    """reinforce.py --total-steps of each learning run"""
    eval_every: int = 100
    """reinforce.py --eval-every of each learning run"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of the learning runs, for each baseline and starting checkpoint"""
    rollouts: int = 200
    """R, independent rollouts from each starting policy for the gradient variance"""
    model: str = "checkpoints/sft"
    """the starting checkpoint (trained by sft.py with its default flags if missing)"""
    weak_sft_steps: int = 500
    """also start from checkpoints/sft-{this} (sft.py --total-steps this, trained if missing); 0: only --model"""


def weak_checkpoint(steps: int, seed: int = 1) -> str:
    """checkpoints/sft-{steps}: sft.py stopped early (default flags otherwise), a policy with room to learn."""
    checkpoint = harness.ROOT / "checkpoints" / f"sft-{steps}"
    if not (checkpoint / "config.json").is_file():
        print(f"training a weaker SFT model into {checkpoint} (python sft.py --total-steps {steps})", flush=True)
        harness.run_script(
            "sft.py", ["--seed", str(seed), "--total-steps", str(steps), "--output-dir", str(checkpoint)]
        )
    return str(checkpoint)


def gradient_variance(checkpoint: str, rollouts: int, seed: int = 1) -> dict[str, dict[str, float]]:
    """{estimator: {"variance", "mean_norm2", "signal"}} of the flattened gradient of reinforce.py's loss over
    `rollouts` rollouts of the fixed policy at `checkpoint` (reinforce.py's default flags). `signal` estimates
    ||E g||^2 without the noise in ||mean_g||^2: ||mean_g||^2 - variance / (R - 1)."""
    torch.manual_seed(seed)
    args = reinforce.Args(model=checkpoint)
    reinforce.validate(args)
    tokenizer, model, _, _ = reinforce.load_models(args, torch.float32, None, torch.device("cpu"))
    num_prompts = args.batch_size // args.group_size
    rows, _ = tasks.load_rows(args.dataset, "prompts", num_rows=rollouts * num_prompts, seed=seed)
    rows = common.fit_prompts(tokenizer, rows, False, common.max_positions(model) - args.max_completion_length, "rows")
    parameters = [p for p in model.parameters() if p.requires_grad]
    sums = {name: torch.zeros(sum(p.numel() for p in parameters), dtype=torch.float64) for name in ESTIMATORS}
    squares = dict.fromkeys(ESTIMATORS, 0.0)
    for r in range(rollouts):
        batch = reinforce.rollout(model, tokenizer, rows[r * num_prompts : (r + 1) * num_prompts], args)
        logprobs = reinforce.completion_logprobs(model, batch, args.temperature)
        for name, (baseline, shift) in ESTIMATORS.items():
            advantages = reinforce.baseline_advantages(batch["rewards"] + shift, args.group_size, baseline)
            loss = reinforce.reinforce_loss(
                logprobs=logprobs, advantages=advantages, mask=batch["mask"], num_completions=args.batch_size
            )
            gradients = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
            flat = torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gradients, parameters)]
            )
            sums[name] += flat.double()
            squares[name] += flat.double().square().sum().item()
        if (r + 1) % 50 == 0:
            print(f"gradient variance from {checkpoint}: {r + 1} of {rollouts} rollouts", flush=True)
    results = {}
    for name in ESTIMATORS:
        mean_norm2 = (sums[name] / rollouts).square().sum().item()
        variance = squares[name] / rollouts - mean_norm2
        signal = mean_norm2 - variance / max(1, rollouts - 1)
        results[name] = {"variance": variance, "mean_norm2": mean_norm2, "signal": signal}
    return results


def variance_section(variance: dict, rollouts: int, seconds: float) -> str:
    reference = variance["leave-one-out"]["variance"]
    rows = [
        [name]
        + [f"{variance[name][key]:.4g}" for key in ("variance", "mean_norm2", "signal")]
        + [f"{variance[name]['variance'] / reference:.3f}"]
        for name in ESTIMATORS
    ]
    headers = ["estimator", "variance", "squared norm of mean_g", "squared norm of E g (estimate)"]
    k = reinforce.Args.group_size
    return (
        f"Variance of the gradient estimate over R = {rollouts} rollouts ({seconds:.0f} s): the variance is"
        " (1/R) sum_r ||g_r - mean_g||^2; ||E g||^2 is estimated as ||mean_g||^2 - variance / (R - 1).\n\n"
        + harness.markdown_table(headers + ["variance / leave-one-out's"], rows)
        + f"\n`mean`'s advantages are exactly (k-1)/k = {(k - 1) / k:.3f} times leave-one-out's, so its variance is"
        f" ((k-1)/k)^2 = {((k - 1) / k) ** 2:.3f} of it and its mean gradient is scaled by (k-1)/k (Adam's step is"
        " almost blind to that scale). The others are unbiased: their ||E g||^2 differ by noise only. Adding 1 to"
        " every reward changes nothing with a baseline; without one it adds (1/N) sum_i grad log pi(y_i), noise of"
        " mean 0.\n\n"
    )


def learning_section(runs: dict, seeds: tuple[int, ...], plot_name: str) -> str:
    rows, summary = [], []
    for baseline in BASELINES:
        finals, mean_accuracies, rewards = [], [], []
        for seed in seeds:
            run = runs[baseline, seed]
            accuracy, reward = run["scalars"]["charts/eval_accuracy"], run["scalars"]["charts/reward"]
            times = [t for _, t, _ in reward]
            step_time = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else 0.0
            finals.append(accuracy[-1][2])
            mean_accuracies.append(statistics.mean(value for step, _, value in accuracy if step > 0))
            rewards.append(statistics.mean(value for _, _, value in reward))
            rows.append(
                [baseline, seed, f"{accuracy[0][2]:.3f}", f"{finals[-1]:.3f}", f"{mean_accuracies[-1]:.3f}"]
                + [f"{rewards[-1]:.3f}", f"{run['wall_s']:.0f}", f"{step_time:.3f}"]
            )
        medians = [harness.median_and_range(values) for values in (finals, mean_accuracies, rewards)]
        summary.append([f"**{baseline}**", "median [min, max]", "", *medians, "", ""])
    headers = ["baseline", "seed", "accuracy before", "accuracy after", "mean accuracy, steps > 0"]
    headers += ["mean training reward", "wall s", "s/step"]
    return (
        "Learning: held-out greedy exact match on 500 problems; the mean accuracy is over every evaluation after step 0"
        " (the area under the curve: how fast it learns); the training reward is the mean of charts/reward over all"
        " steps; s/step is the median time of a step, evaluations excluded.\n\n"
        + harness.markdown_table(headers, rows + summary)
        + f"\n![accuracy vs step and time]({plot_name})\n\n"
    )


def main(args: Args) -> None:
    starts = {"the sft.py checkpoint": harness.ensure_sft_checkpoint(args.model)}
    if args.weak_sft_steps:
        starts[f"sft.py stopped after {args.weak_sft_steps} steps"] = weak_checkpoint(args.weak_sft_steps)
    seeds = " ".join(map(str, args.seeds))
    text = (
        "# REINFORCE: what the baseline buys\n\n"
        f"`python benchmarks/studies/reinforce_baselines.py --steps {args.steps} --eval-every {args.eval_every}"
        f" --seeds {seeds}"
        f" --rollouts {args.rollouts} --weak-sft-steps {args.weak_sft_steps}`, on a 2-core CPU. Each learning run is"
        f" `python reinforce.py --baseline B --seed S --model START --total-steps {args.steps} --eval-every"
        f" {args.eval_every}`, every other flag at its default (batch 16 prompts x {reinforce.Args.group_size}"
        " completions). The gradients of the variance measurement are those of reinforce.py's loss on one such batch"
        " from the fixed starting policy, fresh prompts each rollout, the same samples for the three baselines.\n\n"
    )
    for index, (name, checkpoint) in enumerate(starts.items()):
        start = time.time()
        variance = gradient_variance(checkpoint, args.rollouts)
        seconds = time.time() - start
        runs = {}
        for baseline in BASELINES:
            for seed in args.seeds:
                print(f"reinforce.py --baseline {baseline} --seed {seed} --model {checkpoint}", flush=True)
                flags = ["--baseline", baseline, "--seed", str(seed), "--model", checkpoint]
                flags += ["--total-steps", str(args.steps), "--eval-every", str(args.eval_every)]
                with tempfile.TemporaryDirectory() as out:
                    runs[baseline, seed] = harness.run_script("reinforce.py", flags + ["--output-dir", f"{out}/r"])
        plot = harness.RESULTS / f"reinforce_baselines{'' if index == 0 else f'_{index}'}.png"
        curves = {
            f"{b}, seed {s}": runs[b, s]["scalars"]["charts/eval_accuracy"] for b in BASELINES for s in args.seeds
        }
        harness.plot_curves(curves, plot, f"REINFORCE from {name}: three baselines", "held-out greedy accuracy")
        text += f"## From {name} (`{os.path.relpath(checkpoint, harness.ROOT)}`)\n\n"
        text += variance_section(variance, args.rollouts, seconds) + learning_section(runs, args.seeds, plot.name)
    print(text)
    harness.write_result("reinforce_baselines.md", text)


if __name__ == "__main__":
    main(tyro.cli(Args))
