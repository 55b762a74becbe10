"""Why the RL scripts' learning rates are small: the early accuracy dip is gradient noise turned into full-size steps
by Adam.

From the sft.py checkpoint, a few GRPO steps (grpo.py, default flags but the learning rate) twice per learning rate:
with the real group-relative advantages, and with the same advantages shuffled across the batch, which keeps
their sizes and destroys their information (pure noise). If the shuffled run falls as far as the real one, the fall
is noise, not a wrong sign or a bad reward. A third row moves every parameter by the learning rate per step with
a random sign (what Adam's first steps do to a parameter whose gradient is pure noise, but in random directions
rather than along the gradient's). Held-out greedy accuracy every few steps.

    python benchmarks/studies/gradient_noise.py [--steps 25] [--learning-rates 5e-4 3e-5]

Writes benchmarks/results/gradient_noise.md. Finding: benchmarks/results/2026-12-02-learning-rates.md.
"""

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
import common  # noqa: E402
import grpo  # noqa: E402
import harness  # noqa: E402
import tasks  # noqa: E402


@dataclass
class Args:
    steps: int = 25
    """GRPO steps per run"""
    eval_every: int = 5
    """held-out greedy accuracy every this many steps"""
    learning_rates: tuple[float, ...] = (5e-4, 3e-5)
    seed: int = 1
    model: str = "checkpoints/sft"
    """the starting checkpoint (trained by sft.py if missing)"""


def run(args: Args, learning_rate: float, shuffled: bool) -> dict[int, float]:
    """{step: held-out accuracy} of one grpo.main run; with `shuffled`, every rollout's advantages are permuted at
    random."""
    accuracy = {}

    class Recorder:  # stands in for the TensorBoard writer: keeps charts/eval_accuracy
        def add_scalar(self, tag, value, step):
            if tag == "charts/eval_accuracy":
                accuracy[step] = value

        def __getattr__(self, name):
            return lambda *a, **k: None

    real_advantages, real_logging = grpo.group_advantages, common.setup_logging

    def shuffled_advantages(rewards, group_size, scale_rewards="group"):
        advantages = real_advantages(rewards, group_size, scale_rewards)
        return advantages[torch.randperm(advantages.numel())]

    grpo.group_advantages = shuffled_advantages if shuffled else real_advantages
    common.setup_logging = lambda *a, **k: Recorder()
    try:
        with tempfile.TemporaryDirectory() as out:
            grpo.main(
                grpo.Args(
                    model=args.model,
                    seed=args.seed,
                    learning_rate=learning_rate,
                    total_steps=args.steps,
                    eval_every=args.eval_every,
                    output_dir=f"{out}/grpo",
                )
            )
    finally:
        grpo.group_advantages, common.setup_logging = real_advantages, real_logging
    return accuracy


@torch.no_grad()
def random_sign_steps(args: Args, learning_rate: float) -> dict[int, float]:
    """{step: held-out accuracy} after `step` steps that add +-learning_rate to every parameter, each sign drawn at
    random."""
    tokenizer, model = common.load_tokenizer(args.model), common.load_model(args.model)
    problems = tasks.arithmetic_eval_set()
    generator = torch.Generator().manual_seed(args.seed)
    accuracy = {0: common.evaluate_accuracy(model, tokenizer, problems, max_new_tokens=4)[0]}
    for step in range(1, args.steps + 1):
        for parameter in model.parameters():
            signs = torch.randint(0, 2, parameter.shape, generator=generator) * 2 - 1
            parameter.add_(learning_rate * signs)
        if step % args.eval_every == 0 or step == args.steps:
            accuracy[step] = common.evaluate_accuracy(model, tokenizer, problems, max_new_tokens=4)[0]
    return accuracy


def main(args: Args) -> None:
    model_name = args.model
    args.model = harness.ensure_sft_checkpoint(args.model)
    curves = {}
    for learning_rate in args.learning_rates:
        for shuffled in (False, True):
            label = f"lr {learning_rate:g}, {'shuffled' if shuffled else 'real'} advantages"
            print(label, flush=True)
            curves[label] = run(args, learning_rate, shuffled)
        curves[f"lr {learning_rate:g}, random signs (no gradient)"] = random_sign_steps(args, learning_rate)
    steps = sorted(next(iter(curves.values())))
    rows = [[label] + [f"{curve[step]:.3f}" for step in steps] for label, curve in curves.items()]
    text = (
        "# Gradient noise and the early dip\n\n"
        f"`python benchmarks/studies/gradient_noise.py --steps {args.steps}`: GRPO from `{model_name}` "
        f"(seed {args.seed}, default flags but\n"
        "the learning rate), with the real advantages and with the same advantages shuffled across the batch (no\n"
        "information, the same sizes), and every parameter moved by +-lr per step with random signs. Held-out greedy\n"
        "accuracy after each number of steps:\n\n"
        + harness.markdown_table(["run"] + [f"step {step}" for step in steps], rows)
    )
    print(text)
    harness.write_result("gradient_noise.md", text)


if __name__ == "__main__":
    main(tyro.cli(Args))
