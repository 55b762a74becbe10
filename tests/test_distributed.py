"""Data parallelism under torchrun (gloo, 2 CPU processes, the tiny model): the all-reduced update must equal the
single-process update on the concatenated batch, and a 2-process run must log and save once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

import common
import sft

ROOT = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, script: Path, *arguments: str, cwd: Path) -> str:
    """Run `torchrun --standalone --nproc_per_node nproc script arguments` and return its stdout."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *arguments,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def assert_same_weights(state: dict, expected: dict) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(
            state[name], tensor, atol=1e-6, rtol=1e-5, msg=lambda message, name=name: f"{name}: {message}"
        )


def test_grpo_update_on_two_processes_equals_one_process_on_the_whole_batch(tiny_checkpoint, tmp_path):
    worker = ROOT / "tests" / "distributed_grpo_update.py"
    torchrun(1, worker, tiny_checkpoint, str(tmp_path / "one.pt"), cwd=tmp_path)
    torchrun(2, worker, tiny_checkpoint, str(tmp_path / "two.pt"), cwd=tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    before = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    for name in one:
        assert any(not torch.equal(one[name]["state"][key], before[key]) for key in before), (
            f"{name}: the update changed nothing"
        )
        assert_same_weights(two[name]["state"], one[name]["state"])
        assert two[name]["metrics"]["losses/policy_loss"] == pytest.approx(
            one[name]["metrics"]["losses/policy_loss"], rel=1e-4, abs=1e-6
        )
        assert two[name]["metrics"]["losses/grad_norm"] == pytest.approx(
            one[name]["metrics"]["losses/grad_norm"], rel=1e-4
        )
    kl_one, kl_two = one["grpo_kl_mu2"]["metrics"], two["grpo_kl_mu2"]["metrics"]  # no skipped rows: same micro-batches
    for key in ("losses/kl", "losses/entropy", "clip/low", "clip/high"):
        assert kl_two[key] == pytest.approx(kl_one[key], rel=1e-4, abs=1e-7), key


def flags(**arguments) -> list[str]:
    """--key=value for each argument, and a bare --key for True (tyro's boolean flags)."""
    return [f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}") for key, value in arguments.items()]


def saved_weights(folder: Path) -> dict:
    return safetensors.torch.load_file(folder / "model.safetensors")


@pytest.mark.parametrize("script", ["dpo.py", "sft.py", "reward_model.py"])
def test_two_processes_train_like_one_process_on_the_whole_batch(script, tiny_checkpoint, tmp_path):
    arguments = dict(model=tiny_checkpoint, total_steps=3, batch_size=8, eval_every=2, eval_size=8, learning_rate=0.5)
    # dpo: 35 pairs, so the reference pass gives the processes 18 and 17 pairs, in micro-batches of 3 (the last short)
    arguments |= {
        "dpo.py": dict(num_pairs=35, sft_coef=0.5, batch_size=12),
        "sft.py": dict(warmup_steps=1),
        "reward_model.py": dict(warmup_steps=1),
    }[script]
    micro_batch_size = 3 if script == "dpo.py" else 2
    runner = (
        ROOT / "tests" / "sgd_runner.py"
    )  # the script as it is, with SGD for AdamW: equal weights = equal gradients
    torchrun(1, runner, str(ROOT / script), *flags(**arguments, output_dir=tmp_path / "one"), cwd=tmp_path)
    two = flags(**arguments, output_dir=tmp_path / "two", micro_batch_size=micro_batch_size)
    log = torchrun(2, runner, str(ROOT / script), *two, cwd=tmp_path)
    assert log.count("eval_accuracy") == (3 if script == "dpo.py" else 2), "only rank 0 prints"
    assert len(list((tmp_path / "runs").iterdir())) == 2, "one TensorBoard run per launch, written by rank 0"
    start, one, two = (
        saved_weights(Path(tiny_checkpoint)),
        saved_weights(tmp_path / "one"),
        saved_weights(tmp_path / "two"),
    )
    assert any(not torch.equal(start[name], one[name]) for name in start.keys() & one.keys()), (
        "training changed nothing"
    )
    assert_same_weights(two, one)


def test_grpo_runs_end_to_end_on_two_processes_and_saves_once(tiny_checkpoint, tmp_path):
    arguments = dict(
        model=tiny_checkpoint, total_steps=2, batch_size=16, group_size=4, micro_batch_size=2, eval_every=1, eval_size=8
    )
    log = torchrun(2, ROOT / "grpo.py", *flags(**arguments, output_dir=tmp_path / "grpo"), cwd=tmp_path)
    assert log.count("eval_accuracy") == 3 and "saved" in log
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "grpo").config.vocab_size > 0
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".grpo")] == [], "no temporary folder left"


def test_batch_that_does_not_split_over_the_processes_is_a_clear_error(tiny_checkpoint, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "grpo.py"),
    ]
    command += [
        f"--model={tiny_checkpoint}",
        "--batch-size=12",
        "--group-size=4",
        "--micro-batch-size=4",
        "--total-steps=1",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode != 0 and "3 prompts must divide by the number of processes, 2" in result.stderr


def test_collectives_whitening_and_sharded_evaluation_match_one_process(tmp_path):
    log = torchrun(2, ROOT / "tests" / "distributed_collectives.py", cwd=tmp_path)
    sys.path.insert(0, str(ROOT / "tests"))
    from distributed_collectives import PROBLEMS

    tokenizer = sft.build_tiny_tokenizer()
    torch.manual_seed(0)
    model = sft.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2)
    _, expected = common.evaluate_accuracy(model, tokenizer, PROBLEMS, max_new_tokens=3)
    assert json.loads(log.split("completions:")[1]) == expected


def test_ppo_runs_on_two_processes_with_gradient_checkpointing(tiny_checkpoint, tmp_path):
    arguments = dict(
        model=tiny_checkpoint, reward_fn="arithmetic", total_steps=2, batch_size=8, num_minibatches=2, eval_every=1
    )
    log = torchrun(
        2,
        ROOT / "ppo.py",
        *flags(**arguments, eval_size=8, output_dir=tmp_path / "ppo", gradient_checkpointing=True),
        cwd=tmp_path,
    )
    assert log.count("eval_accuracy") == 3 and "saved" in log
    assert (tmp_path / "ppo" / "model.safetensors").is_file()
