"""PPO on 2-digit addition: sft.py -> reward_model.py -> ppo.py (default flags), 3 seeds, with the learned reward model
and with the verifiable exact-match reward (`--reward-fn arithmetic`).

    flock /tmp/rl-reference-cpu.lock python benchmarks/ppo_arithmetic.py

Writes benchmarks/results/ppo_arithmetic.md and ppo_arithmetic.png: held-out greedy accuracy against seconds of PPO,
final KL to the reference, wall time, time per step and peak memory. Trains the SFT base and the reward model with
their default flags first when their checkpoints are missing.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SEEDS = (1, 2, 3)
VARIANTS = {"learned reward model": [], "exact-match reward": ["--reward-fn", "arithmetic"]}


def ensure_reward_model(sft_checkpoint: str, path: str = "checkpoints/reward_model") -> tuple[str, float | None]:
    """The reward_model.py checkpoint (default flags on the SFT base); trained once if missing. Returns (path, seconds or None)."""
    checkpoint = harness.ROOT / path
    if (checkpoint / "config.json").is_file():
        return str(checkpoint), None
    print(f"training the reward model into {checkpoint} (python reward_model.py)", flush=True)
    run = harness.run_script("reward_model.py", ["--model", sft_checkpoint, "--output-dir", str(checkpoint)])
    return str(checkpoint), run["wall_s"]


def reward_model_pair_accuracy(path: str, n: int = 500) -> float:
    """Held-out accuracy of the reward model on near-miss preference pairs: how good a judge PPO optimises against."""
    import torch
    from transformers import AutoModelForSequenceClassification

    sys.path.insert(0, str(harness.ROOT))
    import common

    tokenizer = common.load_tokenizer(path)
    model = common.load_model(path, AutoModelForSequenceClassification)
    pairs = common.arithmetic_preference_pairs(n, split="test", seed=0)

    def scores(key: str) -> torch.Tensor:
        ids = [
            common.tokenize_prompt(tokenizer, p["prompt"])
            + tokenizer(p[key], add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id]
            for p in pairs
        ]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        with torch.no_grad():
            return common.reward_model_scores(model, batch["input_ids"], batch["attention_mask"])

    return (scores("chosen") > scores("rejected")).float().mean().item()


def main() -> None:
    sft_checkpoint = harness.ensure_sft_checkpoint()
    reward_model, reward_model_seconds = ensure_reward_model(sft_checkpoint)
    pair_accuracy = reward_model_pair_accuracy(reward_model)
    print(f"reward model {reward_model}: held-out near-miss pair accuracy {pair_accuracy:.3f}", flush=True)
    runs = {}
    for seed in SEEDS:
        for variant, extra in VARIANTS.items():
            print(f"== ppo.py, {variant}, seed {seed}", flush=True)
            with tempfile.TemporaryDirectory(prefix="ppo-bench-") as output_dir:
                flags = ["--seed", str(seed), "--model", sft_checkpoint, "--reward-model", reward_model, "--output-dir", output_dir]
                runs[variant, seed] = harness.run_script("ppo.py", flags + extra, echo=False)
            accuracy = runs[variant, seed]["scalars"]["charts/eval_accuracy"]
            run = runs[variant, seed]
            print(
                f"   accuracy {accuracy[0][2]:.3f} -> {accuracy[-1][2]:.3f}, final KL {run['scalars']['objective/kl'][-1][2]:.3f}, "
                f"{run['wall_s']:.0f}s, {1 / run['scalars']['charts/SPS'][-1][2]:.2f} s/step, peak RSS {run['peak_rss_mb']:.0f} MB; "
                f"curve {[round(a, 3) for _, _, a in accuracy]}",
                flush=True,
            )

    rows, summary, curves = [], [], {}
    for variant in VARIANTS:
        per_seed = {key: [] for key in ("start", "final", "gain", "kl", "max_kl", "wall", "step", "rss")}
        for seed in SEEDS:
            run = runs[variant, seed]
            accuracy, kl, sps = (run["scalars"][tag] for tag in ("charts/eval_accuracy", "objective/kl", "charts/SPS"))
            curves[f"{'RM' if variant.startswith('learned') else 'exact match'}, seed {seed}"] = accuracy
            values = {
                "start": accuracy[0][2],
                "final": accuracy[-1][2],
                "gain": accuracy[-1][2] - accuracy[0][2],
                "kl": kl[-1][2],
                "max_kl": max(value for _, _, value in kl),
                "wall": run["wall_s"],
                "step": 1 / sps[-1][2],
                "rss": run["peak_rss_mb"],
            }
            for key, value in values.items():
                per_seed[key].append(value)
            rows.append(
                [
                    variant,
                    seed,
                    *(f"{values[key]:.3f}" for key in ("start", "final", "gain", "kl", "max_kl")),
                    *(f"{values[key]:.2f}" for key in ("wall", "step")),
                    f"{values['rss']:.0f}",
                ]
            )
        summary.append(
            [
                variant,
                *(harness.median_and_range(per_seed[key]) for key in ("start", "final", "gain", "kl", "max_kl", "wall", "step", "rss")),
            ]
        )

    harness.plot_curves(curves, harness.RESULTS / "ppo_arithmetic.png", "PPO on 2-digit addition", "held-out greedy accuracy")
    headers = ["reward", "accuracy before", "accuracy after", "gain", "final KL (nats/seq)", "max KL", "wall s", "s/step", "peak RSS MB"]
    text = (
        "# PPO on 2-digit addition\n\n"
        "`flock /tmp/rl-reference-cpu.lock python benchmarks/ppo_arithmetic.py`: `python sft.py` (seed 1) -> "
        "`python reward_model.py` -> `python ppo.py` with default flags, seeds 1, 2, 3, once with the learned reward model "
        "and once with `--reward-fn arithmetic` (exact match). Accuracy is held-out greedy exact match on 500 problems "
        "(`common.arithmetic_eval_set`); KL is the mean per-sequence KL to the reference (k1, summed over completion tokens) "
        "of the last rollout, max KL the largest over all rollouts. Wall time is the whole `ppo.py` process (loading, evaluations, saving included); s/step "
        "includes the periodic evaluations. Peak RSS is the process's maximum resident memory.\n\n"
        + f"Reward model `{Path(reward_model).relative_to(harness.ROOT)}`: held-out near-miss pair accuracy {pair_accuracy:.3f}"
        + (f", trained by this run in {reward_model_seconds:.0f}s" if reward_model_seconds else "")
        + ".\n\n"
        + "## Median [min, max] over 3 seeds\n\n"
        + harness.markdown_table(headers, summary)
        + "\n## Per seed\n\n"
        + harness.markdown_table(["reward", "seed", *headers[1:]], rows)
        + "\n![accuracy curves](ppo_arithmetic.png)\n"
    )
    harness.write_result("ppo_arithmetic.md", text)
    print(text)


if __name__ == "__main__":
    main()
