"""Side by side with Hugging Face TRL: the same tiny SFT model, data, batch shapes and hyper-parameters,
ours and TRL's run alternately in one invocation, each in its own process.

    pip install -r benchmarks/requirements-bench.txt
    python benchmarks/trl_comparison.py                 # grpo, dpo and reward_model, 3 seeds each

Per run: median seconds per optimizer step, the whole training loop included on both sides (ours: the gaps
between its per-step TensorBoard events; TRL: the gaps between TrainerCallback.on_step_end calls), the first
step left out, peak resident memory of the process (VmHWM),
and the quality after the same number of steps, measured the same way for both from the saved
checkpoints (held-out greedy accuracy for GRPO and DPO, held-out pair accuracy for the reward model).
DPO and the reward model are controlled runs: both sides train on the same pairs in the same order
(ours shuffles with torch.randperm(seed); the TRL runner feeds TRL that permutation with a sequential
sampler), and both reward models start from the same weights (one new head, drawn as reward_model.py
draws it, saved once per seed), so what differs is the implementation, not the luck of the draw.
Writes benchmarks/results/trl_comparison.md (--output names another file).
"""

import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

import harness

sys.path.insert(0, str(harness.ROOT))
import common  # noqa: E402
import tasks  # noqa: E402


@dataclass
class Args:
    algorithms: tuple[Literal["grpo", "dpo", "reward_model"], ...] = ("grpo", "dpo", "reward_model")
    seeds: tuple[int, ...] = (1, 2, 3)
    steps: int = 100
    """optimizer steps per run"""
    model: str = "checkpoints/sft"
    """the starting checkpoint (trained by sft.py if missing)"""
    output: str = "trl_comparison.md"
    """file name under benchmarks/results/ (another name keeps a run of some algorithms or more seeds apart)"""


# The hyper-parameters both sides get, set explicitly where the two projects' defaults differ.
# Everywhere: no gradient checkpointing (TRL's configs turn it on by default; trl_runners turns it off).
# GRPO: 16 prompts x 8 completions of <= 5 tokens, beta 0 (no reference model), the per-completion "grpo"
# normalisation (TRL's default is "dapo"), group std scaling, one update per rollout, temperature 1.
# DPO: plain sigmoid DPO, reference log-probs precomputed on both sides. Reward model: no centring term.
SETTINGS = {
    "grpo": {
        "learning_rate": 3e-5,
        "batch_size": 16,
        "group_size": 8,
        "max_completion_length": 5,
        "beta": 0.0,
        "loss_type": "grpo",
    },
    "dpo": {"learning_rate": 1e-4, "batch_size": 32, "dpo_beta": 0.1},
    "reward_model": {"learning_rate": 1e-3, "batch_size": 64},
}


def ours_command(algorithm: str, seed: int, steps: int, model: str, output_dir: str) -> tuple[str, list[str]]:
    s = SETTINGS[algorithm]
    common_flags = ["--model", model, "--seed", str(seed), "--total-steps", str(steps), "--eval-every", str(10 * steps)]
    common_flags += ["--learning-rate", str(s["learning_rate"]), "--warmup-steps", "0", "--output-dir", output_dir]
    if algorithm == "grpo":
        flags = ["--batch-size", str(s["batch_size"] * s["group_size"]), "--group-size", str(s["group_size"])]
        flags += ["--max-completion-length", str(s["max_completion_length"])]
        flags += ["--beta", str(s["beta"]), "--loss-type", s["loss_type"]]
        flags += ["--temperature", "1.0", "--num-iterations", "1", "--scale-rewards", "group", "--epsilon", "0.2"]
        return "grpo.py", common_flags + flags
    if algorithm == "dpo":
        # plain sigmoid DPO on both sides: TRL adds no NLL term by default, ours does unless --sft-coef 0; and TRL's
        # weight decay (0; dpo.py's default is torch's 0.01)
        # --num-pairs steps x batch: the pairs TRL gets (trl_runners.preference_pairs), one pass over them
        flags = ["--batch-size", str(s["batch_size"]), "--beta", str(s["dpo_beta"])]
        flags += ["--sft-coef", "0", "--weight-decay", "0"]
        return "dpo.py", common_flags + flags + ["--num-pairs", str(steps * s["batch_size"])]
    return "reward_model.py", common_flags + ["--batch-size", str(s["batch_size"]), "--center-rewards-coefficient", "0"]


def trl_command(algorithm: str, seed: int, steps: int, model: str, output_dir: str) -> list[str]:
    flags = [algorithm, "--model", model, "--seed", str(seed), "--steps", str(steps), "--output-dir", output_dir]
    return flags + [
        arg for key, value in SETTINGS[algorithm].items() for arg in (f"--{key.replace('_', '-')}", str(value))
    ]


def ours_step_seconds(scalars: dict) -> float:
    """Median gap between the wall times of consecutive steps of the most frequently logged per-step tag."""
    series = max(scalars.values(), key=len)
    times = [t for _, t, _ in series]
    return statistics.median(b - a for a, b in zip(times[1:], times[2:]))


def initial_reward_model(sft_checkpoint: str, seed: int, folder: str) -> str:
    """The SFT backbone with a new scalar head drawn as reward_model.py draws it, saved: both sides start from it."""
    from transformers import AutoModelForSequenceClassification

    import reward_model

    common.seed_everything(seed)
    tokenizer = common.load_tokenizer(sft_checkpoint)
    model = common.load_model(sft_checkpoint, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    reward_model.init_reward_head(model)
    common.save_model(model, tokenizer, folder)
    return folder


def quality(algorithm: str, checkpoint: str) -> float:
    """The same held-out measurement for both sides, from the saved checkpoint."""
    tokenizer = common.load_tokenizer(checkpoint)
    if algorithm in ("grpo", "dpo"):
        model = common.load_model(checkpoint)
        return common.evaluate_accuracy(model, tokenizer, tasks.arithmetic_eval_set(500), max_new_tokens=4)[0]
    from transformers import AutoModelForSequenceClassification

    model = common.load_model(checkpoint, AutoModelForSequenceClassification).eval()
    pairs = tasks.arithmetic_preference_pairs(500, split="test", seed=1234)
    rows = [pair["prompt"] + pair[key] + tokenizer.eos_token for key in ("chosen", "rejected") for pair in pairs]
    batch = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        scores = common.reward_model_scores(model, batch["input_ids"], batch["attention_mask"])
    return (scores[: len(pairs)] > scores[len(pairs) :]).float().mean().item()


def run_side(algorithm: str, side: str, seed: int, steps: int, start: str) -> dict:
    """One run of ours or TRL's: seconds per step, peak resident memory, and quality of the saved checkpoint."""
    with tempfile.TemporaryDirectory(prefix=f"{algorithm}-{side}-") as output_dir:
        if side == "ours":
            script, flags = ours_command(algorithm, seed, steps, start, output_dir)
            run = harness.run_script(script, flags, echo=False)
            seconds = ours_step_seconds(run["scalars"])
        else:
            run = harness.run_script(
                "benchmarks/trl_runners.py", trl_command(algorithm, seed, steps, start, output_dir), echo=False
            )
            seconds = statistics.median(json.loads((Path(output_dir) / "timing.json").read_text())["step_times"][1:])
        result = {"s_per_step": seconds, "peak_rss_mb": run["peak_rss_mb"], "quality": quality(algorithm, output_dir)}
    print(f"   {result}", flush=True)
    return result


def main(args: Args) -> None:
    model = harness.ensure_sft_checkpoint(args.model)
    results = {}
    for algorithm in args.algorithms:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix="initial-reward-model-") as start_dir:
                # the reward model's new head is drawn once per seed and both sides start from it
                start = initial_reward_model(model, seed, start_dir) if algorithm == "reward_model" else model
                for side in ("ours", "TRL"):  # alternate, so drift on the shared machine hits both alike
                    print(f"== {algorithm} seed {seed}: {side}", flush=True)
                    results.setdefault((algorithm, side), []).append(run_side(algorithm, side, seed, args.steps, start))

    quality_name = {"grpo": "held-out accuracy", "dpo": "held-out accuracy", "reward_model": "held-out pair accuracy"}
    rows = []
    for algorithm in args.algorithms:
        ours, trl = results[(algorithm, "ours")], results[(algorithm, "TRL")]
        row = [algorithm]
        for key, fmt in (("s_per_step", "{:.3f}"), ("peak_rss_mb", "{:.0f}"), ("quality", "{:.3f}")):
            ours_median = statistics.median(r[key] for r in ours)
            trl_median = statistics.median(r[key] for r in trl)
            row += [fmt.format(ours_median), fmt.format(trl_median), f"{ours_median / trl_median:.2f}"]
            if key == "s_per_step":
                # each seed's ours and TRL ran back to back: their ratio cancels the machine's slow and fast minutes
                paired_ratios = [o[key] / t[key] for o, t in zip(ours, trl)]
                row.append(
                    f"{statistics.median(paired_ratios):.2f} [{min(paired_ratios):.2f}, {max(paired_ratios):.2f}]"
                )
        row.append(quality_name[algorithm])
        rows.append(row)
    headers = [
        "algorithm",
        "ours s/step",
        "TRL s/step",
        "ratio",
        "ratio per seed, median [min, max]",
        "ours peak MB",
        "TRL peak MB",
        "ratio",
        "ours quality",
        "TRL quality",
        "ratio",
        "quality is",
    ]
    settings = "\n".join(f"- {algorithm}: {SETTINGS[algorithm]}" for algorithm in args.algorithms)
    text = (
        f"# Ours vs TRL, {args.steps} steps, median of seeds {list(args.seeds)}\n\n"
        f"Command: `{' '.join(['python benchmarks/trl_comparison.py', *sys.argv[1:]])}`. Ratios are ours / TRL "
        "(below 1 is faster or leaner for time and memory; above 1 is better for quality); the ratio per seed compares "
        "the two runs made back to back.\n\n"
        + harness.markdown_table(headers, rows)
        + "\nSettings given to both sides (no gradient checkpointing, which TRL's configs turn on by default; fused "
        "AdamW; DPO: plain sigmoid DPO, ours with `--sft-coef 0 --weight-decay 0`; reference log-probs precomputed on "
        "both sides; reward model: no centring term, both start from the same initial head; DPO and reward model: the "
        f"same pairs in the same order on both sides; warm-up 0 and a linear decay everywhere):\n{settings}\n\n"
        "Every run:\n\n"
        + harness.markdown_table(
            ["algorithm", "side", "seed", "s/step", "peak MB", "quality"],
            [
                [a, side, seed, f"{r['s_per_step']:.3f}", f"{r['peak_rss_mb']:.0f}", f"{r['quality']:.3f}"]
                for (a, side), runs in results.items()
                for seed, r in zip(args.seeds, runs)
            ],
        )
    )
    harness.write_result(args.output, text)


if __name__ == "__main__":
    main(tyro.cli(Args))
