import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification

import common
import reward_model
import sft
import tasks


def tiny_reward_model(tokenizer, seed: int = 0, n_positions: int = 64):
    """A randomly initialised 1-layer GPT2ForSequenceClassification with its head set up as reward_model.py does."""
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    config = sft.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=n_positions).config
    config.num_labels = 1
    model = GPT2ForSequenceClassification(config).eval()
    reward_model.init_reward_head(model)
    return model


def run_args(tmp_path, model: str, **overrides) -> reward_model.Args:
    """Arguments for a tiny end-to-end run (a few steps, small eval set)."""
    defaults = dict(
        model=model, total_steps=3, batch_size=8, eval_every=2, eval_size=16, output_dir=str(tmp_path / "rm")
    )
    return reward_model.Args(**{**defaults, **overrides})


# ----------------------------------------------------------------------------- the loss
@settings(deadline=None)
@given(st.floats(-20, 20), st.floats(-20, 20))
def test_loss_is_log_2_at_equal_rewards_and_margin_shifts_it_exactly(reward, margin):
    equal = torch.tensor([reward])
    assert reward_model.bradley_terry_loss(equal, equal).item() == pytest.approx(math.log(2), abs=1e-6)
    chosen, rejected = torch.tensor([reward, 0.5]), torch.tensor([0.3, -1.0])
    margins = torch.tensor([margin, margin])
    with_margin = reward_model.bradley_terry_loss(chosen, rejected, margins)
    torch.testing.assert_close(with_margin, reward_model.bradley_terry_loss(chosen - margins, rejected))
    torch.testing.assert_close(
        with_margin, -torch.log(torch.sigmoid(chosen - rejected - margins).double()).mean().float()
    )


@settings(deadline=None)
@given(st.lists(st.integers(-1500, 1500), min_size=2, max_size=20, unique=True))
def test_loss_strictly_decreases_in_the_reward_difference(hundredths):
    differences = [h / 100 for h in sorted(hundredths)]
    losses = [reward_model.bradley_terry_loss(torch.tensor([d]), torch.tensor([0.0])).item() for d in differences]
    assert all(a > b for a, b in zip(losses, losses[1:]))


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)
    rejected = torch.tensor([1.0, -2.0, -3.0], requires_grad=True)
    reward_model.bradley_terry_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # gradient descent moves r_c up and r_r down
    torch.testing.assert_close(chosen.grad, -rejected.grad)


def test_center_rewards_loss_is_zero_only_for_symmetric_pairs():
    assert reward_model.center_rewards_loss(torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 2.0])).item() == 0.0
    assert reward_model.center_rewards_loss(torch.tensor([3.0]), torch.tensor([1.0])).item() == 16.0


def test_swapping_chosen_and_rejected_flips_the_margin():
    chosen, rejected = torch.tensor([1.0, 0.2, -0.5, 2.0]), torch.tensor([0.0, 0.4, -1.5, 1.0])
    metrics = reward_model.preference_metrics(chosen, rejected)
    swapped = reward_model.preference_metrics(rejected, chosen)
    assert metrics["accuracy"] == 0.75 and swapped["accuracy"] == 0.25
    assert metrics["margin"] == pytest.approx(0.7) and swapped["margin"] == pytest.approx(-metrics["margin"])
    assert metrics["reward_mean"] == pytest.approx(swapped["reward_mean"]) and metrics["reward_std"] == pytest.approx(
        swapped["reward_std"]
    )


# ----------------------------------------------------------------------------- the last token and the score
@st.composite
def padded_masks(draw):
    """(attention_mask, expected last index): rows left-padded, right-padded or unpadded at random."""
    width = draw(st.integers(1, 12))
    rows, expected = [], []
    for _ in range(draw(st.integers(1, 6))):
        real = draw(st.integers(1, width))
        side = draw(st.sampled_from(["left", "right"]))
        rows.append([0] * (width - real) + [1] * real if side == "left" else [1] * real + [0] * (width - real))
        expected.append(width - 1 if side == "left" else real - 1)
    return torch.tensor(rows), torch.tensor(expected)


@settings(deadline=None)
@given(padded_masks())
def test_last_token_index_follows_the_mask(mask_and_expected):
    mask, expected = mask_and_expected
    assert torch.equal(common.last_token_index(mask), expected)
    assert torch.equal(common.last_token_index(mask.bool()), expected)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(3, 97), min_size=1, max_size=8), st.integers(1, 5), st.sampled_from(["left", "right"]))
def test_score_ignores_padding_even_when_pad_is_eos(body, padding, side):
    """pad == EOS: a row ending in EOS and padded with more EOS scores as the same row alone (the mask decides)."""
    tokenizer = sft.build_tiny_tokenizer()
    model = tiny_reward_model(tokenizer)
    eos = tokenizer.eos_token_id
    ids = body + [eos]
    padded = [eos] * padding + ids if side == "left" else ids + [eos] * padding
    mask = [0] * padding + [1] * len(ids) if side == "left" else [1] * len(ids) + [0] * padding
    with torch.no_grad():
        # unpadded, r(x, y) is the head applied to the hidden state of the final token (here the EOS)
        alone = common.reward_model_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        by_hand = model.score(model.base_model(torch.tensor([ids])).last_hidden_state[:, -1]).squeeze(-1)
        padded_score = common.reward_model_scores(model, torch.tensor([padded]), torch.tensor([mask]))
    torch.testing.assert_close(alone, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_score, alone, atol=1e-5, rtol=1e-5)


def test_head_init_has_std_one_over_sqrt_d_plus_one():
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    config = sft.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=256, n_head=2).config
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    reward_model.init_reward_head(model)
    std = model.score.weight.std().item()
    assert 0.8 / math.sqrt(257) < std < 1.2 / math.sqrt(257)


def test_tokenize_pair_appends_eos_and_counts_truncation():
    tokenizer = sft.build_tiny_tokenizer()
    chosen, rejected, truncated = reward_model.tokenize_pair(
        tokenizer, {"prompt": "9+3=", "chosen": "12", "rejected": "2"}, 64, False
    )
    assert tokenizer.decode(chosen[:-1]) == "9+3=12" and tokenizer.decode(rejected[:-1]) == "9+3=2" and not truncated
    assert chosen[-1] == rejected[-1] == tokenizer.eos_token_id
    chosen, rejected, truncated = reward_model.tokenize_pair(
        tokenizer, {"prompt": "9+3=", "chosen": "12", "rejected": "2"}, 6, False
    )
    assert truncated and len(chosen) == 6 and len(rejected) == 6


def test_score_pairs_splits_one_forward_into_chosen_and_rejected():
    tokenizer = sft.build_tiny_tokenizer()
    model = tiny_reward_model(tokenizer)
    pairs = [reward_model.tokenize_pair(tokenizer, row, 64, False)[:2] for row in tasks.arithmetic_preference_pairs(5)]
    batch = reward_model.collate_pairs(pairs, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        chosen, rejected = reward_model.score_pairs(model, batch)
        for index, (chosen_ids, rejected_ids) in enumerate(pairs):
            one = reward_model.score_pairs(
                model, reward_model.collate_pairs([(chosen_ids, rejected_ids)], tokenizer.pad_token_id, "cpu")
            )
            torch.testing.assert_close((chosen[index], rejected[index]), (one[0][0], one[1][0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_head_bias", [False, True])
def test_shift_reward_adds_the_same_constant_to_every_reward(with_head_bias):
    tokenizer = sft.build_tiny_tokenizer()
    model = tiny_reward_model(tokenizer)
    if with_head_bias:
        model.score = torch.nn.Linear(model.score.in_features, 1, bias=True)
    pairs = [reward_model.tokenize_pair(tokenizer, row, 64, False)[:2] for row in tasks.arithmetic_preference_pairs(6)]
    before = torch.cat(reward_model.score_dataset(model, pairs, tokenizer.pad_token_id, "cpu"))
    reward_model.shift_reward(model, 1.75)
    after = torch.cat(reward_model.score_dataset(model, pairs, tokenizer.pad_token_id, "cpu"))
    torch.testing.assert_close(after, before + 1.75, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- end to end
def test_end_to_end_checkpoint_loads_and_matches_the_training_time_scorer(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    reward_model.main(run_args(tmp_path, tiny_checkpoint, shift_bias_to_zero_mean=True))
    assert (tmp_path / "runs").is_dir()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    tokenizer = common.load_tokenizer(str(tmp_path / "rm"))
    assert (
        loaded.config.num_labels == 1 and loaded.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    )
    # a right-padded batch (pad != EOS): HF's own forward (last non-pad token by id, default positions) agrees with
    # r(x, y)
    rows = tasks.arithmetic_preference_pairs(16, split="test")
    pairs = [reward_model.tokenize_pair(tokenizer, row, 64, False)[:2] for row in rows]
    batch = reward_model.collate_pairs(pairs, tokenizer.pad_token_id, "cpu")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        hf_scores = loaded(**batch).logits.squeeze(-1)
    ours = torch.cat(reward_model.score_pairs(loaded, batch))
    assert torch.isfinite(ours).all() and ours.std() > 0
    torch.testing.assert_close(hf_scores, ours, atol=1e-5, rtol=1e-5)
    # the bias shift made the mean reward over the training completions 0
    train_rows = tasks.arithmetic_preference_pairs(3 * 8, split="train", seed=1)
    train_pairs = [reward_model.tokenize_pair(tokenizer, row, 64, False)[:2] for row in train_rows]
    assert torch.cat(
        reward_model.score_dataset(loaded, train_pairs, tokenizer.pad_token_id, "cpu")
    ).mean().item() == pytest.approx(0, abs=1e-4)


def test_lora_trains_adapters_and_the_whole_head_and_saves_a_plain_reward_model(tmp_path, monkeypatch, tiny_checkpoint):
    """--lora-r: the backbone's own weights stay frozen, the adapters and the new score head train; the checkpoint
    is a merged AutoModelForSequenceClassification, and the adapters saved beside it (head included) rebuild it."""
    from peft import PeftModel

    monkeypatch.chdir(tmp_path)
    reward_model.main(run_args(tmp_path, tiny_checkpoint, lora_r=4, learning_rate=1e-2, gradient_checkpointing=True))
    start = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1).state_dict()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    state = merged.state_dict()
    assert torch.equal(state["transformer.wte.weight"], start["transformer.wte.weight"]), (
        "embeddings carry no adapter: frozen"
    )
    assert not torch.equal(state["transformer.h.0.attn.c_attn.weight"], start["transformer.h.0.attn.c_attn.weight"]), (
        "merged"
    )
    tokenizer = common.load_tokenizer(str(tmp_path / "rm"))
    pairs = [
        reward_model.tokenize_pair(tokenizer, row, 64, False)[:2]
        for row in tasks.arithmetic_preference_pairs(8, split="test")
    ]
    batch = reward_model.collate_pairs(pairs, tokenizer.pad_token_id, "cpu")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1)  # a new random head
    adapted = PeftModel.from_pretrained(base, tmp_path / "rm" / "adapter").eval()
    with torch.no_grad():
        merged_scores = torch.cat(reward_model.score_pairs(merged, batch))
        torch.testing.assert_close(
            torch.cat(reward_model.score_pairs(adapted.get_base_model(), batch)), merged_scores, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(merged(**batch).logits.squeeze(-1), merged_scores, atol=1e-5, rtol=1e-5)


def test_jsonl_with_margins_trains_and_a_bad_margin_names_the_line(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(
            ['{"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 1.5}'] * 10
            + ['{"prompt": "1+1=", "chosen": 2, "rejected": "3"}']
        )
    )
    reward_model.main(run_args(tmp_path, tiny_checkpoint, dataset=str(data), total_steps=2, batch_size=4))
    assert (tmp_path / "rm" / "config.json").is_file()
    data.write_text("\n".join(['{"prompt": "2+2=", "chosen": "4", "rejected": "5"}'] * 6))  # too few to hold any out
    reward_model.main(
        run_args(
            tmp_path,
            tiny_checkpoint,
            dataset=str(data),
            total_steps=2,
            batch_size=4,
            output_dir=str(tmp_path / "small"),
        )
    )
    assert (tmp_path / "small" / "config.json").is_file()
    data.write_text(
        '{"prompt": "2+2=", "chosen": "4", "rejected": "5"}\n\n'
        '{"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": "big"}\n'
    )
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: field 'margin' must be a finite number"):
        reward_model.main(run_args(tmp_path, tiny_checkpoint, dataset=str(data), output_dir=str(tmp_path / "bad")))
    data.write_text('{"prompt": "2+2=", "chosen": "4"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: missing field 'rejected'"):
        reward_model.main(run_args(tmp_path, tiny_checkpoint, dataset=str(data), output_dir=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_micro_batches_give_the_loss_and_gradient_of_the_whole_batch(
    tmp_path, monkeypatch, tiny_checkpoint, logged_scalars
):
    monkeypatch.chdir(tmp_path)
    runs = []
    for micro_batch_size in (None, 2):
        reward_model.main(run_args(tmp_path, tiny_checkpoint, total_steps=1, micro_batch_size=micro_batch_size))
        runs.append({tag: logged_scalars[(tag, 1)] for tag in ("losses/loss", "losses/grad_norm")})
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


def test_missing_model_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reward_model.main(run_args(tmp_path, str(tmp_path / "no_such_checkpoint")))


# ----------------------------------------------------------------------------- reliability
def test_pairs_cut_inside_the_prompt_are_dropped_and_counted_and_none_left_is_an_error(
    tmp_path, monkeypatch, tiny_checkpoint, logged_scalars, capsys
):
    """--max-length 6: `2+2=` + `4` + EOS fits; `1234+5678=` is cut inside the prompt, so chosen and rejected become the
    same sequence (a pair that trains on nothing): dropped and counted; when every pair is so, an error."""
    monkeypatch.chdir(tmp_path)
    short = '{"prompt": "2+2=", "chosen": "4", "rejected": "5"}'
    long = '{"prompt": "1234+5678=", "chosen": "6912", "rejected": "6812"}'
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join([short] * 2 + [short, long] * 9))  # the first 2 of 20 rows are held out
    reward_model.main(run_args(tmp_path, tiny_checkpoint, dataset=str(data), max_length=6, batch_size=4))
    assert "training: 9 of 18 pairs cut at 6 tokens" in capsys.readouterr().out
    assert logged_scalars[("charts/truncated_pairs", 0)] == 9
    assert (tmp_path / "rm" / "config.json").is_file()
    data.write_text("\n".join([long] * 20))
    with pytest.raises(ValueError, match="every pair's chosen and rejected are the same sequence once cut at 6 tokens"):
        reward_model.main(run_args(tmp_path, tiny_checkpoint, dataset=str(data), max_length=6, output_dir="none"))
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("eval_every", 0),
        ("total_steps", 0),
        ("batch_size", 0),
        ("micro_batch_size", 0),
        ("max_length", 0),
        ("eval_size", -1),
        ("lora_r", -1),
        ("save_every", -1),
        ("keep_checkpoints", 0),
    ],
)
def test_a_bad_flag_is_a_one_line_error_naming_it(tmp_path, tiny_checkpoint, field, value):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=rf"^{flag} {value} must be >= -?\d+$"):
        reward_model.main(run_args(tmp_path, tiny_checkpoint, **{field: value}))
    assert not (tmp_path / "rm").exists()


def test_an_error_reaches_the_command_line_as_one_line(tmp_path):
    script = Path(reward_model.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--eval-every", "0", "--output-dir", str(tmp_path / "rm")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0 and result.stderr.strip() == "error: --eval-every 0 must be >= 1"


def test_float16_on_the_cpu_is_refused(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--dtype float16 does not train correctly on the CPU"):
        reward_model.main(run_args(tmp_path, tiny_checkpoint, dtype="float16", device="cpu"))


def test_an_output_dir_holding_a_users_files_is_refused_unless_overwrite_and_they_survive(
    tmp_path, monkeypatch, tiny_checkpoint, users_file, refused_keeping
):
    monkeypatch.chdir(tmp_path)
    folder, notes = tmp_path / "mine", users_file(tmp_path / "mine" / "notes.txt", "keep me")
    with refused_keeping(notes, "holds files not written here") as error:
        reward_model.main(run_args(tmp_path, tiny_checkpoint, output_dir=str(folder)))
    assert "\n" not in str(error.value)
    a_file = users_file(tmp_path / "a_file", "mine too")
    with refused_keeping(a_file, "is a file, not a folder"):
        reward_model.main(run_args(tmp_path, tiny_checkpoint, output_dir=str(a_file)))
    reward_model.main(run_args(tmp_path, tiny_checkpoint, output_dir=str(folder), overwrite_output_dir=True))
    assert (folder / "config.json").is_file() and notes.read_text() == "keep me"


def test_a_run_stopped_by_sigint_and_resumed_ends_as_one_uninterrupted_run(
    tmp_path, monkeypatch, tiny_checkpoint, record_run
):
    """SIGINT during step 2 saves checkpoint-2 and exits; --resume auto then ends with the same weights and logs the
    same metrics at steps 3..5 as a run that was never stopped (11 training pairs, 8 a step: the data order, its
    reshuffles and the optimizer must all continue where they were)."""
    monkeypatch.chdir(tmp_path)
    rows = [{**row, "margin": index / 10} for index, row in enumerate(tasks.arithmetic_preference_pairs(12))]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))

    def after_step_2(scalars):
        return {key: value for key, value in scalars.items() if key[1] > 2 and key[0] != "charts/SPS"}

    flags = dict(dataset=str(data), total_steps=5, eval_every=2, micro_batch_size=4)
    whole = record_run()
    reward_model.main(run_args(tmp_path, tiny_checkpoint, output_dir=str(tmp_path / "whole"), **flags))
    logged = record_run(interrupt_at=("losses/loss", 2))  # the stopped run and its resumption log into one dict
    with pytest.raises(SystemExit, match="stopped by SIGINT after step 2; continue with --resume auto"):
        reward_model.main(run_args(tmp_path, tiny_checkpoint, output_dir=str(tmp_path / "parts"), **flags))
    assert (tmp_path / "parts" / "checkpoint-2" / "training_state.pt").is_file()
    assert not (tmp_path / "parts" / "config.json").exists()
    reward_model.main(run_args(tmp_path, tiny_checkpoint, output_dir=str(tmp_path / "parts"), resume="auto", **flags))
    assert after_step_2(logged) == after_step_2(whole) and len(after_step_2(whole)) > 20
    resumed = AutoModelForSequenceClassification.from_pretrained(tmp_path / "parts").state_dict()
    uninterrupted = AutoModelForSequenceClassification.from_pretrained(tmp_path / "whole").state_dict()
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
