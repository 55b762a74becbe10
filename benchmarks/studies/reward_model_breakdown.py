"""Which near misses a reward model ranks right: held-out pair accuracy split by the digit that differs.

A near miss (tasks.near_miss) differs from the correct sum in its units digit, its tens digit (off by ten, or a
dropped carry into the tens), its hundreds digit, or in several digits at once (a dropped carry that also changes
the length). Telling the units digit apart needs (a + b) mod 10 at the last token, which is where the reward model's
head reads; this table shows which checks a checkpoint has learned.

    python benchmarks/studies/reward_model_breakdown.py --checkpoints checkpoints/reward_model

Finding: benchmarks/results/2026-12-02-reward-model.md (near misses in the units digit are ranked close to chance).
"""

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import tyro
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402
import reward_model  # noqa: E402
import tasks  # noqa: E402


@dataclass
class Args:
    checkpoints: tuple[str, ...]
    """reward model checkpoints (what reward_model.py writes)"""
    size: int = 2000
    """held-out pairs"""
    digits: int = 2
    """operand digits of the arithmetic task"""


def differing_digit(chosen: str, rejected: str) -> str:
    """Where a near miss differs from the correct sum: `units`, `tens`, `hundreds` (one digit), else `several`."""
    width = max(len(chosen), len(rejected))
    chosen, rejected = chosen.zfill(width), rejected.zfill(width)
    places = [width - 1 - i for i in range(width) if chosen[i] != rejected[i]]
    return ("units", "tens", "hundreds")[places[0]] if len(places) == 1 and places[0] < 3 else "several"


def main(args: Args) -> None:
    pairs = tasks.arithmetic_preference_pairs(args.size, args.digits, "test", seed=1234)
    groups = defaultdict(list)
    for index, pair in enumerate(pairs):
        groups[differing_digit(pair["chosen"], pair["rejected"])].append(index)
        short = any(len(operand) < args.digits for operand in pair["prompt"].rstrip("=").split("+"))
        groups["one-digit operand" if short else "two 2-digit operands"].append(index)
    columns = ["units", "tens", "hundreds", "several", "two 2-digit operands", "one-digit operand"]
    print("| checkpoint | all | " + " | ".join(f"{name} ({len(groups[name])})" for name in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for checkpoint in args.checkpoints:
        tokenizer = common.load_tokenizer(checkpoint)
        model = common.load_model(checkpoint, AutoModelForSequenceClassification).eval()
        # tokenised and scored exactly as reward_model.py evaluates its held-out pairs (prompt + completion + EOS)
        tokenized = [
            reward_model.tokenize_pair(tokenizer, pair, model.config.max_position_embeddings, chat_template=False)[:2]
            for pair in pairs
        ]
        chosen_rewards, rejected_rewards = reward_model.score_dataset(model, tokenized, tokenizer.pad_token_id, "cpu")
        right = (chosen_rewards > rejected_rewards).float()
        cells = [f"{right[groups[name]].mean():.3f}" for name in columns]
        print(f"| {checkpoint} | {right.mean():.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(tyro.cli(Args))
