"""The learning benchmark of the built-in task: SFT from a budget of demonstrations, then every RL method from it.

    python benchmarks/arithmetic_learning.py                      # every run, seeds 1 2 3 (about 2.5 hours on 2 cores)
    python benchmarks/arithmetic_learning.py --runs sft grpo --seeds 1

For each seed S: `sft.py --seed S` with default flags (400 distinct worked problems, cycled), then from
that checkpoint, each with its script's default flags:

    grpo              grpo.py (exact-match reward on prompts of the whole training split)
    reinforce         reinforce.py (leave-one-out baseline, the same reward and prompts)
    ppo_exact         ppo.py --reward-fn arithmetic
    reward_model      reward_model.py (correct sum against a near miss), then
    ppo_reward_model  ppo.py --reward-model <that reward model>
    dpo               dpo.py (preference pairs, with its NLL term on the chosen answers)
    dpo_without_nll   dpo.py --sft-coef 0 (the preference term alone)
    dpo_nll_only      sft.py on correct answers of the whole training split with dpo.py's optimiser settings: the
                      NLL term alone, i.e. what DPO's pairs give when read as demonstrations
    sft_same_time     sft.py, the same demonstrations, continued from the SFT checkpoint for about as long as an RL run

Held-out accuracy is greedy exact match on the 500 fixed held-out problems every script evaluates on. Writes
benchmarks/results/arithmetic_learning.{md,json,png}; runs are kept per seed in checkpoints/arithmetic_learning/, so a
later invocation with other --runs adds to the same tables (a run is trained again only with --force).
"""

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

import harness

sys.path.insert(0, str(harness.ROOT))
import tasks  # noqa: E402

RUNS = ("sft", "grpo", "reinforce", "ppo_exact", "reward_model", "ppo_reward_model", "dpo", "dpo_without_nll")
RUNS += ("dpo_nll_only", "sft_same_time")
# the defaults on a task they were not tuned on: 2-digit subtraction given as JSONL files
VARIANT_RUNS = ("variant_sft", "variant_grpo", "variant_ppo")
BUDGET_MINUTES = {"grpo": 5, "reinforce": 5, "ppo_exact": 8, "ppo_reward_model": 8, "dpo": 5, "dpo_without_nll": 5}
BUDGET_MINUTES |= {"dpo_nll_only": 5, "sft_same_time": 5, "reward_model": 5}
TARGET_GAIN = {"grpo": 0.25, "ppo_exact": 0.20, "ppo_reward_model": 0.10, "dpo": 0.10}
# dpo.py's optimiser settings, for the NLL-only run (sft.py flags)
DPO_OPTIMISER = ["--learning-rate", "3e-4", "--weight-decay", "0.01", "--warmup-steps", "20", "--batch-size", "32"]


@dataclass
class Args:
    runs: tuple[str, ...] = RUNS + VARIANT_RUNS
    """which runs (and what they need first: every RL run needs `sft`, ppo_reward_model needs `reward_model`; the
    variant_* runs: subtraction as JSONL files, sft first)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    force: bool = False
    """train again runs whose results are already in checkpoints/arithmetic_learning/"""
    sft_same_time_steps: int = 6000
    """steps of the continued SFT run (about five minutes of sft.py on 2 cores)"""
    extra_flags: tuple[str, ...] = ()
    """more flags for a run, as `run: flags`, e.g. --extra-flags "grpo: --learning-rate 1e-4" (a sweep)"""
    validation: bool = False
    """evaluate on 500 problems of the training split that are neither sft.py's demonstrations nor RL prompts instead
    of the held-out set (for choosing hyper-parameters; see write_validation); results kept apart, in
    checkpoints/arithmetic_learning/validation/ and benchmarks/results/arithmetic_learning_validation.*"""


WORK = harness.ROOT / "checkpoints" / "arithmetic_learning"
VALIDATION_SIZE = 500


def write_validation(folder: Path) -> dict[str, Path]:
    """The data hyper-parameters are chosen on: VALIDATION_SIZE distinct problems of the training split that are not
    among sft.py's default demonstrations (`eval`, for --eval-dataset), and every training problem as prompt/answer
    JSONL with those first (`rl`): the RL scripts hold a file's first --eval-size rows out of training and evaluate on
    them, so the validation problems are never RL prompts either."""
    import random

    demonstrations = {row["prompt"] for row in tasks.arithmetic_demonstrations(400)}
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(100) for b in range(100)]
    rows = [row for row in rows if not tasks.is_held_out(*map(int, row["prompt"][:-1].split("+")))]
    random.Random(7).shuffle(rows)
    validation = [row for row in rows if row["prompt"] not in demonstrations][:VALIDATION_SIZE]
    rest = [row for row in rows if row not in validation]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"eval": folder / "validation.jsonl", "rl": folder / "rl_validation_first.jsonl"}
    for name, lines in (("eval", validation), ("rl", validation + rest)):
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in lines))
    return paths


def validation_flags(name: str, folder: Path) -> list[str]:
    """--validation: the RL runs train on the training problems but the validation ones and evaluate on those (the
    arithmetic settings given explicitly, as a .jsonl file gets other defaults); the others evaluate on them."""
    data = write_validation(folder)
    exact = ["--reward-funcs", "arithmetic", "--max-completion-length", "4"]
    flags = {"grpo": exact, "reinforce": exact, "ppo_exact": ["--reward-fn", "arithmetic", "--max-new-tokens", "4"]}
    flags["ppo_reward_model"] = ["--max-new-tokens", "4"]
    if name in flags:
        return ["--dataset", str(data["rl"])] + flags[name]
    return [] if name == "reward_model" else ["--eval-dataset", str(data["eval"])]


def write_variant(folder: Path) -> dict[str, Path]:
    """2-digit subtraction `a-b=` (a >= b) as JSONL: a prompt/answer file whose first tenth (the rows grpo.py and
    ppo.py hold out) is also the eval file, and a prompt/completion file of the other problems for sft.py."""
    import random

    problems = [{"prompt": f"{a}-{b}=", "answer": str(a - b)} for a in range(100) for b in range(a + 1)]
    random.Random(0).shuffle(problems)
    held_out = len(problems) // 10
    files = {
        "rl": problems,
        "eval": problems[:held_out],
        "sft": [{"prompt": row["prompt"], "completion": row["answer"]} for row in problems[held_out:]],
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {name: folder / f"{name}.jsonl" for name in files}


def run_flags(name: str, seed: int, folder: Path, args: Args) -> tuple[str, list[str]]:
    """(script, flags) of one run of one seed."""
    sft = str(folder / "sft" / "model")
    base = ["--seed", str(seed), "--output-dir", str(folder / name / "model")]
    flags = {
        "sft": ("sft.py", []),
        "grpo": ("grpo.py", ["--model", sft]),
        "reinforce": ("reinforce.py", ["--model", sft]),
        "ppo_exact": ("ppo.py", ["--model", sft, "--reward-fn", "arithmetic"]),
        "reward_model": ("reward_model.py", ["--model", sft]),
        "ppo_reward_model": ("ppo.py", ["--model", sft, "--reward-model", str(folder / "reward_model" / "model")]),
        "dpo": ("dpo.py", ["--model", sft]),
        "dpo_without_nll": ("dpo.py", ["--model", sft, "--sft-coef", "0"]),
        "dpo_nll_only": ("sft.py", ["--model", sft, "--num-demonstrations", "None", "--total-steps", "3000"]),
        "sft_same_time": ("sft.py", ["--model", sft, "--total-steps", str(args.sft_same_time_steps)]),
    }
    variant, variant_sft = write_variant(WORK / "variant_data"), str(folder / "variant_sft" / "model")
    flags |= {
        "variant_sft": ("sft.py", ["--dataset", str(variant["sft"]), "--eval-dataset", str(variant["eval"])]),
        "variant_grpo": ("grpo.py", ["--model", variant_sft, "--dataset", str(variant["rl"])]),
        "variant_ppo": ("ppo.py", ["--model", variant_sft, "--dataset", str(variant["rl"]), "--reward-fn", "math"]),
    }
    script, extra = flags[name]
    if name == "dpo_nll_only":
        extra += DPO_OPTIMISER
    if args.validation and not name.startswith("variant_"):
        extra += validation_flags(name, folder.parent)
    more = [flags.split() for run, _, flags in (item.partition(":") for item in args.extra_flags) if run == name]
    return script, base + extra + sum(more, [])


def accuracy_curve(run: dict, name: str) -> list[tuple[int, float, float]]:
    """(step, seconds, accuracy) of the held-out evaluations; the reward model's is its held-out pair accuracy."""
    return run["scalars"]["charts/eval_accuracy"]


def policy_sample_accuracy(reward_model: str, policy: str, num_prompts: int = 200, samples: int = 8) -> float:
    """How often the reward model ranks a correct completion of the policy above a wrong one of the same prompt: its
    accuracy on the policy's own samples (at ppo.py's sampling temperature 0.7), which is what PPO optimises against."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import common

    tokenizer, model = common.load_tokenizer(policy), common.load_model(policy).eval()
    judge_tokenizer = common.load_tokenizer(reward_model)
    judge = common.load_model(reward_model, AutoModelForSequenceClassification, trained_head="score").eval()
    problems = tasks.arithmetic_problems(num_prompts, split="test", seed=99)
    prompts = [common.tokenize_prompt(tokenizer, row["prompt"]) for row in problems for _ in range(samples)]
    torch.manual_seed(0)
    with torch.no_grad():
        batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
        special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        output = model.generate(
            **batch, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=4, **special
        )
    completion_ids = output[:, batch["input_ids"].size(1) :]
    mask, has_eos = common.completion_mask(completion_ids, tokenizer.eos_token_id)
    completions = common.decode_completions(tokenizer, completion_ids, mask)
    texts = [row["prompt"] for row in problems for _ in range(samples)]
    answers = [row["answer"] for row in problems for _ in range(samples)]
    correct = tasks.arithmetic_reward(texts, completions, answers)
    scores = common.score_completions(judge, judge_tokenizer, texts, completions, has_eos.tolist(), False, 256).tolist()
    right = total = 0
    for start in range(0, len(texts), samples):
        group = list(zip(correct[start : start + samples], scores[start : start + samples]))
        for good in (score for reward, score in group if reward == 1.0):
            for bad in (score for reward, score in group if reward == 0.0):
                right, total = right + (good > bad), total + 1
    return right / total if total else float("nan")


def summarise(name: str, run: dict) -> dict:
    """The numbers of one run that the tables and the JSON report."""
    curve = accuracy_curve(run, name)
    summary = {
        "start_accuracy": curve[0][2],
        "final_accuracy": curve[-1][2],
        "best_accuracy": max(value for _, _, value in curve),
        "train_minutes": run["wall_s"] / 60,
        "peak_rss_mb": run["peak_rss_mb"],
        "curve": [[step, round(seconds, 1), value] for step, seconds, value in curve],
    }
    for tag in ("objective/kl", "losses/kl"):
        if tag in run["scalars"]:
            summary["final_kl"] = run["scalars"][tag][-1][2]
    return summary


def main(args: Args) -> None:
    unknown = set(args.runs) - set(RUNS + VARIANT_RUNS)
    if unknown:
        raise SystemExit(f"unknown --runs {sorted(unknown)}; choose from {RUNS}")
    work = WORK / "validation" if args.validation else WORK
    for seed in args.seeds:
        folder = work / f"seed-{seed}"
        for name in RUNS + VARIANT_RUNS:
            result_file = folder / name / "result.json"
            if name not in args.runs or (result_file.is_file() and not args.force):
                continue
            first = "variant_sft" if name.startswith("variant_") else "sft"
            if name != first and not (folder / first / "result.json").is_file():
                raise SystemExit(f"{name} starts from the SFT model of seed {seed}: add `{first}` to --runs")
            if name == "ppo_reward_model" and not (folder / "reward_model" / "result.json").is_file():
                raise SystemExit(
                    f"ppo_reward_model needs the reward model of seed {seed}: add `reward_model` to --runs"
                )
            script, flags = run_flags(name, seed, folder, args)
            print(f"== seed {seed}, {name}: python {script} {' '.join(flags)}", flush=True)
            remove_previous_output(folder / name / "model")
            run = harness.run_script(script, flags, echo=False)
            command = f"python {script} {' '.join(flags)}".replace(f"{harness.ROOT}/", "")  # paths from the repository
            summary = summarise(name, run) | {"command": command, "seed": seed}
            if name == "reward_model":
                sft = str(folder / "sft" / "model")
                summary["policy_sample_accuracy"] = policy_sample_accuracy(str(folder / name / "model"), sft)
            result_file.parent.mkdir(parents=True, exist_ok=True)
            result_file.write_text(json.dumps(summary, indent=1))
            print(
                f"   {summary['start_accuracy']:.3f} -> {summary['final_accuracy']:.3f}, {run['wall_s']:.0f} s",
                flush=True,
            )
    write_tables(work, "_validation" if args.validation else "")


def write_tables(work: Path, suffix: str = "") -> None:
    """benchmarks/results/arithmetic_learning{suffix}.{md,json,png} from every result under `work`."""
    results = {}
    for path in sorted(work.glob("seed-*/*/result.json")):
        results.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    if not results:
        return
    sft_final = {run["seed"]: run["final_accuracy"] for run in results.get("sft", [])}
    summary, rows, curves = {}, [], {}
    for name in RUNS:
        if name not in results:
            continue
        runs = sorted(results[name], key=lambda run: run["seed"])
        if name in ("sft", "reward_model"):  # from random weights (sft), a pair accuracy of its own (reward_model)
            start = [0.0 if name == "sft" else run["start_accuracy"] for run in runs]
        else:
            start = [sft_final[run["seed"]] for run in runs]
        final = [run["final_accuracy"] for run in runs]
        gains = [after - before for before, after in zip(start, final)]
        summary[name] = {
            "start_accuracy": statistics.median(start),
            "final_accuracy": statistics.median(final),
            "gain": statistics.median(gains),
            "train_minutes": statistics.median(run["train_minutes"] for run in runs),
            "seeds": [run["seed"] for run in runs],
        }
        if name == "reward_model":
            samples = [run["policy_sample_accuracy"] for run in runs]
            summary[name]["policy_sample_accuracy"] = statistics.median(samples)
        if any("final_kl" in run for run in runs):
            summary[name]["final_kl"] = statistics.median(run.get("final_kl", float("nan")) for run in runs)
        target = TARGET_GAIN.get(name)
        within = max(run["train_minutes"] for run in runs) <= BUDGET_MINUTES.get(name, float("inf"))
        verdict = "" if target is None else ("yes" if summary[name]["gain"] >= target and within else "no")
        rows.append(
            [
                name,
                " ".join(f"{value:.3f}" for value in final),
                f"{summary[name]['start_accuracy']:.3f}",
                f"{summary[name]['final_accuracy']:.3f}",
                f"{summary[name]['gain']:+.3f}",
                f"{summary[name]['train_minutes']:.1f}",
                f"{summary[name].get('final_kl', float('nan')):.2f}",
                "" if target is None else f"+{target:.2f} in {BUDGET_MINUTES[name]} min: {verdict}",
            ]
        )
        for run in runs:
            if run["seed"] == runs[0]["seed"]:
                curves[f"{name} (seed {run['seed']})"] = [tuple(point) for point in run["curve"]]
    headers = ["run", "final accuracy per seed", "start (median)", "final (median)", "gain", "minutes", "final KL"]
    headers.append("target")
    reward_model_line = ""
    if "reward_model" in summary:
        reward_model_line = (
            f"\nThe reward model's held-out pair accuracy (correct sum against a near miss) is its `final` column; on "
            f"the SFT policy's own samples (a correct and a wrong completion of one prompt, sampled at T = 0.7) "
            f"it ranks {summary['reward_model']['policy_sample_accuracy']:.3f} of pairs right (median over seeds).\n"
        )
    text = (
        "# The built-in task: SFT from a budget of demonstrations, then RL\n\n"
        + (
            "**Validation: accuracy on 500 problems of the training split that are neither demonstrations nor RL "
            "prompts (for choosing hyper-parameters), not on the held-out set.**\n\n"
            if suffix
            else ""
        )
        + "`python benchmarks/arithmetic_learning.py` on a 2-core CPU, every run alone, default flags of each script "
        "(commands below). `start` is the SFT model's accuracy (for `sft`: the untrained model's, 0), `final` the last "
        "evaluation, `minutes` the whole process (loading, evaluations and saving included), `final KL` the KL to the "
        "starting model at the end (PPO: nats per sequence; GRPO/REINFORCE with --beta: per token).\n\n"
        + harness.markdown_table(headers, rows)
        + reward_model_line
        + "\n![held-out accuracy against wall time](arithmetic_learning.png)\n\n## Commands (seed 1)\n\n"
        + "\n".join(f"- {name}: `{results[name][0]['command']}`" for name in RUNS if name in results)
        + "\n"
        + variant_section(results)
    )
    harness.write_result(f"arithmetic_learning{suffix}.md", text)
    harness.write_result(f"arithmetic_learning{suffix}.json", json.dumps(summary, indent=1) + "\n")
    sft_start = sft_final[min(sft_final)] if sft_final else None  # the seed of the plotted curves (the first)
    plot(curves, sft_start, harness.RESULTS / f"arithmetic_learning{suffix}.png")


def variant_section(results: dict) -> str:
    """The defaults on a task they were not tuned on: how far each evaluation of the first half of a default run
    falls below the start."""
    rows = []
    for name in ("variant_grpo", "variant_ppo"):
        for run in sorted(results.get(name, []), key=lambda run: run["seed"]):
            curve = run["curve"]
            start, last_step = curve[0][2], curve[-1][0]
            first_half = [value for step, _, value in curve if 0 < step <= last_step / 2]
            drop = max(0.0, round(start - min(first_half), 6))  # accuracies are logged as float32
            rows.append([name, run["seed"], f"{start:.3f}", " ".join(f"{v:.3f}" for v in first_half), f"{drop:.3f}"])
            rows[-1] += [f"{run['final_accuracy']:.3f}", "yes" if drop <= 0.03 else "no"]
    if not rows:
        return ""
    headers = [
        "run",
        "seed",
        "start",
        "evaluations in the first half",
        "largest fall below the start",
        "final",
        "fall <= 3 points",
    ]
    commands = "\n".join(
        f"- {n}: `{results[n][0]['command']}`" for n in ("variant_sft", *VARIANT_RUNS[1:]) if n in results
    )
    return (
        "\n## The defaults on another task: 2-digit subtraction as JSONL\n\n`sft.py` on a prompt/completion file (its "
        "default 400 demonstrations), then `grpo.py` and `ppo.py --reward-fn math` with default flags on the "
        "prompt/answer file, whose first tenth is held out (accuracy: the final number against the answer).\n\n"
        + harness.markdown_table(headers, rows)
        + "\n"
        + commands
        + "\n"
    )


def remove_previous_output(folder: Path) -> None:
    """A run trained again (--force) writes into an empty folder: the scripts refuse to mix two runs' files."""
    import shutil

    if (folder / "training_run.json").is_file() or (folder.is_dir() and not any(folder.iterdir())):
        shutil.rmtree(folder)


def plot(curves: dict, sft_start: float | None, path: Path) -> None:
    """Held-out accuracy against wall time, one line per run (seed 1), the SFT start as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5))
    for label, points in curves.items():
        if not label.startswith("reward_model"):  # a pair accuracy, not the policy's
            axis.plot(
                [seconds / 60 for _, seconds, _ in points],
                [value for *_, value in points],
                marker="o",
                ms=2,
                label=label,
            )
    if sft_start is not None:
        axis.axhline(sft_start, color="black", linestyle="--", linewidth=1, label=f"SFT start ({sft_start:.3f})")
    axis.set(xlabel="minutes since the run's first logged event", ylabel="held-out greedy accuracy", ylim=(0, 1))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.suptitle("2-digit addition: SFT from few demonstrations, then RL (seed 1)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main(tyro.cli(Args))
