# The task: where the rows come from and how a completion is scored. Replace this file (or add to it) to bring
# your own task; the training scripts only call `load_rows`, `REWARD_FUNCTIONS` and `eval_reward`.
#
# Rows are dicts of strings. What each script reads:
#   sft.py                     {"prompt", "completion"}
#   grpo.py, ppo.py, reinforce.py   {"prompt", "answer"}   (ppo.py with a reward model needs only "prompt")
#   reward_model.py, dpo.py    {"prompt", "chosen", "rejected"}   (reward_model.py: an optional numeric "margin")
# A reward function takes (prompts, completions, **fields) -- every other field of the rows, one list each -- and
# returns one float per completion. No torch here: this file is plain Python.
import json
import math
import random
import re
import zlib
from pathlib import Path

ARITHMETIC = "arithmetic"
"""The `--dataset` value of the built-in task: `37+45=` -> `82`."""

FIELDS = {"sft": ("prompt", "completion"), "prompts": ("prompt", "answer"), "pairs": ("prompt", "chosen", "rejected")}
"""The fields each kind of row must have."""


# ----------------------------------------------------------------------------- the built-in arithmetic task
def is_held_out(a: int, b: int) -> bool:
    """A fixed 10% of all operand pairs is reserved for evaluation, the same in every script and run."""
    return zlib.crc32(f"{a}+{b}".encode()) % 10 == 0


def arithmetic_problems(n: int, digits: int = 2, split: str = "train", seed: int = 0) -> list[dict]:
    """`n` addition problems {"prompt": "37+45=", "answer": "82"} with operands of up to `digits` digits, drawn with
    replacement. split="train" never yields a held-out pair; split="test" yields only held-out pairs."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if digits < 1:
        raise ValueError(f"--digits must be at least 1, got {digits}")
    rng = random.Random(seed)
    high = 10**digits - 1
    problems = []
    while len(problems) < n:
        a, b = rng.randint(0, high), rng.randint(0, high)
        if is_held_out(a, b) == (split == "test"):
            problems.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return problems


def arithmetic_demonstrations(n: int, digits: int = 2, seed: int = 0) -> list[dict]:
    """`n` distinct training problems, each with its answer as the completion: a fixed budget of demonstrations."""
    if digits < 1:
        raise ValueError(f"--digits must be at least 1, got {digits}")
    pairs = [(a, b) for a in range(10**digits) for b in range(10**digits) if not is_held_out(a, b)]
    if not 1 <= n <= len(pairs):
        raise ValueError(f"--num-demonstrations must be between 1 and {len(pairs)} (the training problems), got {n}")
    chosen = random.Random(seed).sample(pairs, n)
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b), "completion": str(a + b)} for a, b in chosen]


def arithmetic_eval_set(n: int = 500, digits: int = 2) -> list[dict]:
    """The held-out problems every script evaluates on (a fixed seed, so accuracies are comparable)."""
    return arithmetic_problems(n, digits, split="test", seed=1234)


def near_miss(a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong answer to a+b: the sum with a dropped carry, one digit off by one, or off by ten."""
    correct = a + b
    digits = str(correct)
    candidates = set()
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:012d}", f"{b:012d}")))
    if len(str(no_carry)) >= len(digits) - 1:  # 50+50 -> 0 is not plausible; 57+68 -> 15 is
        candidates.add(no_carry)
    for position in range(len(digits)):
        for delta in (-1, 1):
            digit = int(digits[position]) + delta
            if 0 <= digit <= 9 and not (position == 0 and digit == 0 and len(digits) > 1):
                candidates.add(int(digits[:position] + str(digit) + digits[position + 1 :]))
    candidates.update({correct + 10, correct - 10})
    candidates = sorted(c for c in candidates if c >= 0 and c != correct)
    return str(rng.choice(candidates))


def arithmetic_preference_pairs(n: int, digits: int = 2, split: str = "train", seed: int = 0) -> list[dict]:
    """`n` pairs {"prompt", "chosen", "rejected"}: the correct sum against a near miss (see `near_miss`)."""
    rng = random.Random(seed + 1)
    pairs = []
    for problem in arithmetic_problems(n, digits, split, seed):
        a, b = (int(x) for x in problem["prompt"][:-1].split("+"))
        pairs.append({"prompt": problem["prompt"], "chosen": problem["answer"], "rejected": near_miss(a, b, rng)})
    return pairs


# ----------------------------------------------------------------------------- rule-based rewards
_INTEGER = re.compile(r"-?\d{1,30}")


def exact_match(completion: str, answer: str) -> float:
    """1.0 if the completion, stripped of surrounding whitespace, is exactly the answer as an integer, else 0.0.
    Parsed with a regular expression, never `eval`: garbage, empty or overlong text scores 0.0 and never raises."""
    text = completion.strip()
    return 1.0 if _INTEGER.fullmatch(text) is not None and text == answer.strip() else 0.0


def arithmetic_reward(prompts: list[str], completions: list[str], answer: list[str], **unused_fields) -> list[float]:
    """Reward of the arithmetic task: exact match of each completion with its answer."""
    return [exact_match(completion, target) for completion, target in zip(completions, answer)]


# a number in running text: `-` is a sign only where it cannot be a minus (`x = -5`, not `12-5`); thousands separators
# only in groups of three (`1,234`, not the list `3,4`); never the tail of a longer number (`.5` is not 5)
_NUMBER = r"(?:(?<![\w).])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"


def final_answer(text: str) -> str | None:
    """The text after the last `####` or `Answer:` (its first line), else inside the last `\\boxed{}`, else the last
    number."""
    marker = max(text.rfind("####"), text.rfind("Answer:"))
    if marker >= 0:
        after = text[marker:].removeprefix("####").removeprefix("Answer:").strip()
        text = after.splitlines()[0] if after else ""
    if "\\boxed{" in text:
        start, depth = text.rfind("\\boxed{") + len("\\boxed{"), 1
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start:end].strip()
        return None
    if marker >= 0:
        return text.strip() or None
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> float | None:
    """`1,234.5`, `$12`, `7.` -> a float; anything else -> None (parsed with a regular expression, never eval)."""
    text = text.strip().removeprefix("$").rstrip(".").replace(",", "")
    return float(text) if re.fullmatch(r"-?\d+(\.\d+)?", text) else None


def math_answer_reward(prompts: list[str], completions: list[str], answer: list[str], **unused_fields) -> list[float]:
    """1.0 when the completion's final answer equals the reference answer (numerically where both parse), else 0.0."""
    rewards = []
    for completion, target in zip(completions, answer):
        found = final_answer(completion)
        number, target_number = as_number(found or ""), as_number(target)
        if number is not None and target_number is not None:
            rewards.append(float(math.isclose(number, target_number, rel_tol=1e-9, abs_tol=1e-9)))
        else:
            rewards.append(float(found is not None and found.strip() == target.strip()))
    return rewards


def format_reward(prompts: list[str], completions: list[str], **unused_fields) -> list[float]:
    """1.0 when the completion states an explicit final answer (`#### x`, `Answer: x` or `\\boxed{x}`), else 0.0."""
    return [float(re.search(r"(####|Answer:)\s*\S|\\boxed\{[^}]", text) is not None) for text in completions]


REWARD_FUNCTIONS = {"arithmetic": arithmetic_reward, "math": math_answer_reward, "format": format_reward}
"""The rule-based rewards a script can name (`--reward-funcs`, `--reward-fn`)."""


def eval_reward(dataset: str):
    """The reward held-out greedy accuracy is measured with: exact match on arithmetic, the final answer otherwise."""
    return arithmetic_reward if dataset == ARITHMETIC else math_answer_reward


def row_fields(rows: list[dict]) -> dict[str, list]:
    """Every field but the prompt as one list per field, the keyword arguments of a reward function. A field that
    only some rows have is passed as None where it is missing."""
    names = dict.fromkeys(key for row in rows for key in row if key not in ("prompt", "prompt_ids"))
    return {name: [row.get(name) for row in rows] for name in names}


# ----------------------------------------------------------------------------- files and hub datasets
def read_jsonl(path: str, required_fields: tuple[str, ...]) -> list[dict]:
    """Read a JSONL file of objects; every line must hold each required field as a string (numbers are converted).
    A bad line raises ValueError naming the file, the line number and the field. Blank lines are ignored."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    rows = []
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text (byte {raw[error.start]:#04x})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            for field in required_fields:
                if field not in row:
                    raise ValueError(
                        f"{path}:{line_number}: missing field {field!r} (required: {', '.join(required_fields)})"
                    )
                value = row[field]
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    raise ValueError(
                        f"{path}:{line_number}: field {field!r} must be a string, got {type(value).__name__}"
                    )
                if isinstance(value, float) and not math.isfinite(value):  # json reads NaN and Infinity
                    raise ValueError(
                        f"{path}:{line_number}: field {field!r} must be a string or a finite number, got {value}"
                    )
                row[field] = str(value)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def load_hf_dataset(name: str, split: str, columns: dict[str, str]) -> list[dict]:
    """Rows of a Hugging Face dataset (needs the `datasets` package); `columns` maps our field to its column."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"dataset {name!r} is neither 'arithmetic' nor a .jsonl file; from the hub it needs `pip install datasets`"
        ) from None
    table = datasets.load_dataset(name, split=split)
    missing = [column for column in columns.values() if column not in table.column_names]
    if missing:
        raise ValueError(f"dataset {name!r} has no column(s) {missing}; it has {table.column_names}")
    return [{ours: str(row[theirs]) for ours, theirs in columns.items()} for row in table]


def _read(dataset: str, kind: str, hf_split: str = "train", columns: dict[str, str] | None = None) -> list[dict]:
    """The rows of a .jsonl file or a Hugging Face dataset with the fields of `kind` (columns renamed by `columns`)."""
    if dataset.endswith(".jsonl"):
        return read_jsonl(dataset, FIELDS[kind])
    return load_hf_dataset(dataset, hf_split, {field: (columns or {}).get(field, field) for field in FIELDS[kind]})


def load_rows(
    dataset: str,
    kind: str,
    *,
    num_rows: int = 0,
    digits: int = 2,
    seed: int = 0,
    held_out: int = 500,
    hf_split: str = "train",
    columns: dict[str, str] | None = None,
) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) with the fields of FIELDS[kind]: the one loader every script uses.

    `arithmetic`: `num_rows` training rows drawn afresh (kind "sft" adds the answer as the completion; "pairs" puts
    it against a near miss) and `held_out` rows of the held-out operand pairs. A .jsonl file or a Hugging Face
    dataset: its first min(held_out, 10%) rows are held out and the rest are the training rows.
    """
    if kind not in FIELDS:
        raise ValueError(f"kind must be one of {list(FIELDS)}, got {kind!r}")
    if dataset != ARITHMETIC:
        rows = _read(dataset, kind, hf_split, columns)
        count = min(held_out, len(rows) // 10)
        return rows[count:], rows[:count]
    if kind == "pairs":
        return arithmetic_preference_pairs(num_rows, digits, "train", seed), arithmetic_preference_pairs(
            held_out, digits, "test", 1234
        )
    train, test = arithmetic_problems(num_rows, digits, "train", seed), arithmetic_eval_set(held_out, digits)
    if kind == "sft":
        train, test = ([{**row, "completion": row["answer"]} for row in rows] for rows in (train, test))
    return train, test


def eval_problems(dataset: str, eval_dataset: str | None, digits: int = 2, size: int = 500) -> list[dict]:
    """The {prompt, answer} rows held-out greedy accuracy is measured on: the first `size` rows of `eval_dataset` (a
    .jsonl file) when given, the arithmetic test split on `arithmetic`, else none."""
    if eval_dataset is not None:
        return read_jsonl(eval_dataset, FIELDS["prompts"])[:size]
    return arithmetic_eval_set(size, digits) if dataset == ARITHMETIC else []
