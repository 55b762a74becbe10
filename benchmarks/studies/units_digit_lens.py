"""In which layer does the SFT model know the units digit of the sum? A logit lens and a linear probe per layer.

The reward model reads one hidden state, the last layer's at EOS (docs/reward_model.md), and ranks near misses in
the units digit (`91+14=106` against `105`) little better than chance, while the same SFT model's own
log-likelihood ranks them right. In a causal transformer the EOS position's layer l reads the other positions'
states after layer l - 1, never their last-layer states. So where the model predicts the units digit matters:
at the position before it (the tens digit of the answer), this script takes the residual stream after every layer
and asks how well it gives the units digit,

- logit lens: argmax of the LM head applied to the final LayerNorm of that state (the last layer's is the model's
  own prediction);
- linear probe: a multinomial logistic regression from that state to the digit, fit on training-split problems
  and scored on the held-out ones (does the state hold the digit in any linear form, not only the head's).

If only the last layer holds the digit, no layer at EOS can copy it from there: the reward model must learn to
compute (a + b) mod 10 anew at EOS from one bit per pair.

    python benchmarks/studies/units_digit_lens.py --checkpoints checkpoints/sft

Finding: benchmarks/results/2026-12-02-reward-model.md (the section on the units digit; this script's table is
benchmarks/results/units_digit_lens.md).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402
import tasks  # noqa: E402


@dataclass
class Args:
    checkpoints: tuple[str, ...]
    """causal LM checkpoints (what sft.py writes)"""
    size: int = 2000
    """problems per split (train: fits the probe; test: scores lens and probe)"""
    digits: int = 2
    """operand digits of the arithmetic task"""
    probe_steps: int = 500
    """full-batch Adam steps that fit each probe"""
    seed: int = 0
    """seed of the probes' initial weights"""


@torch.no_grad()
def states_before_units_digit(model, tokenizer, problems: list[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(residual stream after each layer at the position that predicts the units digit, the units digits' token ids).

    Element 0 of the list is the embedding output, element L the last layer's (already through the final norm in HF's
    GPT-2, so the lens applies the norm to every other element only).
    """
    texts = [problem["prompt"] + problem["answer"] for problem in problems]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="right")
    lengths = batch["attention_mask"].sum(-1)
    hidden = model(
        **batch, position_ids=common.position_ids_from_mask(batch["attention_mask"]), output_hidden_states=True
    ).hidden_states
    rows = torch.arange(len(ids))
    return [layer[rows, lengths - 2] for layer in hidden], batch["input_ids"][rows, lengths - 1]


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int) -> torch.nn.Linear:
    """A linear softmax classifier fit by full-batch Adam on standardised features (mean and std kept in the probe)."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    probe = torch.nn.Linear(features.size(1), num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe((features - mean) / std), labels).backward()
        optimizer.step()
    probe.mean, probe.std = mean, std
    return probe


def main(args: Args) -> None:
    torch.manual_seed(args.seed)
    train = [p for p in tasks.arithmetic_problems(args.size, args.digits, "train", seed=7) if len(p["answer"]) >= 2]
    test = [p for p in tasks.arithmetic_problems(args.size, args.digits, "test", seed=1234) if len(p["answer"]) >= 2]
    print("| checkpoint | layer | logit lens, held-out | linear probe, held-out |")
    print("|---|---|---|---|")
    for checkpoint in args.checkpoints:
        tokenizer = common.load_tokenizer(checkpoint, padding_side="right")
        model = common.load_model(checkpoint, AutoModelForCausalLM).eval()
        train_states, train_digits = states_before_units_digit(model, tokenizer, train)
        test_states, test_digits = states_before_units_digit(model, tokenizer, test)
        last = len(test_states) - 1
        for layer, (train_x, test_x) in enumerate(zip(train_states, test_states)):
            with torch.no_grad():
                normed = test_x if layer == last else model.transformer.ln_f(test_x)
                lens = (model.lm_head(normed).argmax(-1) == test_digits).float().mean().item()
            probe = fit_probe(train_x, train_digits, len(tokenizer), args.probe_steps)
            with torch.no_grad():
                probed = (probe((test_x - probe.mean) / probe.std).argmax(-1) == test_digits).float().mean().item()
            name = (
                "embeddings"
                if layer == 0
                else f"after block {layer}" + (" (the model's prediction)" if layer == last else "")
            )
            print(f"| {checkpoint} | {name} | {lens:.3f} | {probed:.3f} |", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
