from collections import Counter
from unittest import mock

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import sft
import tasks


def test_tokenize_example_masks_prompt_and_appends_eos():
    tokenizer = sft.build_tiny_tokenizer()
    input_ids, labels, truncated = sft.tokenize_example(tokenizer, {"prompt": "1+2=", "completion": "3"}, 64, False)
    assert tokenizer.decode(input_ids, skip_special_tokens=True) == "1+2=3" and input_ids[-1] == tokenizer.eos_token_id
    assert labels == [-100] * 4 + input_ids[4:] and not truncated
    _, labels, truncated = sft.tokenize_example(tokenizer, {"prompt": "1+2=", "completion": "3456"}, 6, False)
    assert truncated and len(labels) == 6


def test_sft_loss_ignores_prompt_and_padding_tokens():
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    model = sft.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2)
    example = sft.tokenize_example(tokenizer, {"prompt": "12+3=", "completion": "15"}, 64, False)[:2]
    longer = sft.tokenize_example(tokenizer, {"prompt": "1+2=", "completion": "3333333"}, 64, False)[:2]
    alone = sft.sft_loss(model, sft.collate([example], tokenizer.pad_token_id, "cpu"))
    # the loss is the mean NLL of the completion tokens "1", "5", <eos> given everything before them
    logits = model(torch.tensor([example[0]])).logits[0]
    nll = -torch.log_softmax(logits, -1)[torch.arange(4, 7), torch.tensor(example[0][5:8])].mean()
    torch.testing.assert_close(alone, nll)
    # padding the row (the batch has a longer example) does not change its contribution
    batch = sft.collate([example, longer], tokenizer.pad_token_id, "cpu")
    assert batch["attention_mask"][0].sum() == len(example[0]) < batch["input_ids"].size(1)
    other = sft.sft_loss(model, sft.collate([longer], tokenizer.pad_token_id, "cpu"))
    torch.testing.assert_close(sft.sft_loss(model, batch), (alone * 3 + other * 8) / 11)


def tiny_run_args(tmp_path, **overrides) -> sft.Args:
    """A few steps of a 1-layer tiny model, checkpoint under tmp_path/ckpt."""
    defaults = dict(
        total_steps=3,
        batch_size=8,
        eval_every=2,
        eval_size=8,
        tiny_n_layer=1,
        tiny_n_embd=32,
        output_dir=str(tmp_path / "ckpt"),
    )
    return sft.Args(**{**defaults, **overrides})


def test_sft_end_to_end_writes_a_checkpoint_that_generates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sft.main(tiny_run_args(tmp_path))
    assert (tmp_path / "runs").is_dir()
    tokenizer = common.load_tokenizer(str(tmp_path / "ckpt"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    inputs = tokenizer(["1+2="], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("rows", [20, 6])  # 6: too few to hold a tenth out, so training runs without evaluation
def test_sft_on_jsonl(rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join('{"prompt": "say hi: ", "completion": "hi"}' for _ in range(rows)))
    sft.main(tiny_run_args(tmp_path, dataset=str(data), total_steps=2, batch_size=4, warmup_steps=0))
    assert (tmp_path / "ckpt" / "config.json").is_file()


def test_sft_bad_jsonl_names_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="data.jsonl:2: missing field 'completion'"):
        sft.main(sft.Args(dataset=str(data), total_steps=1, output_dir=str(tmp_path / "ckpt")))
    assert not (tmp_path / "ckpt").exists()


def test_micro_batches_give_the_loss_and_gradient_of_the_whole_batch(tmp_path, monkeypatch, logged_scalars):
    """Each micro-batch's loss is normalised by the whole batch's token count, so the parts add up (not a mean of
    means); so is the held-out loss (its answers have 2 or 3 digits: a mean of per-row means would differ)."""
    monkeypatch.chdir(tmp_path)
    runs = []
    for micro_batch_size in (None, 1):
        sft.main(tiny_run_args(tmp_path, total_steps=1, eval_every=100, micro_batch_size=micro_batch_size))
        runs.append(
            {tag: logged_scalars[(tag, 1)] for tag in ("losses/sft_loss", "losses/grad_norm", "charts/eval_loss")}
        )
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


def test_logged_learning_rate_is_the_rate_each_step_used(tmp_path, monkeypatch, logged_scalars):
    """Linear warm-up to the peak over 2 steps, then linear decay to 0 at step 4: factors 1/2, 1, 1, 1/2."""
    monkeypatch.chdir(tmp_path)
    sft.main(tiny_run_args(tmp_path, total_steps=4, warmup_steps=2, learning_rate=1e-3, eval_every=100))
    assert [logged_scalars[("charts/learning_rate", step)] for step in range(1, 5)] == pytest.approx(
        [0.5e-3, 1e-3, 1e-3, 0.5e-3]
    )


# ----------------------------------------------------------------------------- tiny model
def test_tiny_tokenizer_round_trip(tmp_path):
    tokenizer = sft.build_tiny_tokenizer()
    text = "37+45=82\nWhat is 2 * (3 - 1)? {ok}"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, nothing added
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert reloaded.decode(ids) == text  # no spaces inserted between characters
    assert reloaded.decode(ids + [reloaded.eos_token_id], skip_special_tokens=True) == text
    assert (reloaded.pad_token, reloaded.eos_token) == ("<pad>", "<eos>")


def test_tiny_checkpoint_loads_and_generates(tiny_checkpoint):
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    inputs = tokenizer(["1+2=", "10+20="], return_tensors="pt", padding=True)
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape == (2, inputs["input_ids"].size(1) + 4)


# ----------------------------------------------------------------------------- demonstrations budget
def record_trained_texts(monkeypatch) -> list[str]:
    """The text of every example a training step (a forward with gradients) sees, in order."""
    tokenizer, seen, loss = sft.build_tiny_tokenizer(), [], sft.sft_loss

    def recording_loss(model, batch, num_tokens=None):
        if torch.is_grad_enabled():
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
                seen.append(tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True))
        return loss(model, batch, num_tokens)

    monkeypatch.setattr(sft, "sft_loss", recording_loss)
    return seen


def test_num_demonstrations_trains_on_that_many_distinct_problems_each_seen(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = record_trained_texts(monkeypatch)
    sft.main(tiny_run_args(tmp_path, num_demonstrations=6, batch_size=4, total_steps=3, eval_every=100))
    # one fixed set of demonstrations (the data), whatever --seed (the training's randomness)
    demonstrations = [row["prompt"] + row["completion"] for row in tasks.arithmetic_demonstrations(6, 2)]
    assert len(set(demonstrations)) == 6 and len(seen) == 12
    assert Counter(seen) == {text: 2 for text in demonstrations}  # two whole passes, reshuffled: each seen twice
    assert "6 distinct demonstrations" in capsys.readouterr().out


def test_num_demonstrations_on_a_file_takes_its_first_training_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(f'{{"prompt": "q{i}=", "completion": "a{i}"}}' for i in range(30)))
    seen = record_trained_texts(monkeypatch)
    sft.main(tiny_run_args(tmp_path, dataset=str(data), num_demonstrations=5, batch_size=5, total_steps=2))
    assert Counter(seen) == {f"q{i}=a{i}": 2 for i in range(3, 8)}  # rows 0-2 are the held-out tenth
    seen.clear()  # a budget larger than the file: every training row, once per pass
    sft.main(tiny_run_args(tmp_path, dataset=str(data), num_demonstrations=28, output_dir=str(tmp_path / "b")))
    assert set(seen) <= {f"q{i}=a{i}" for i in range(3, 30)} and len(set(seen)) == len(seen) == 3 * 8  # one pass


# ----------------------------------------------------------------------------- reliability
def test_examples_whose_completion_is_cut_away_are_dropped_and_counted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    rows = [("ab", "cd"), ("abcdefg", "xy"), ("abcdefgh", "z")]  # fits; cut inside the completion; cut before it
    data.write_text("\n".join(f'{{"prompt": "{p}", "completion": "{c}"}}' for p, c in rows * 4))
    seen = record_trained_texts(monkeypatch)
    sft.main(tiny_run_args(tmp_path, dataset=str(data), max_length=8, eval_size=0, batch_size=4, total_steps=3))
    assert "training: 8 of 12 examples cut at 8 tokens" in capsys.readouterr().out
    assert len(seen) == 12 and set(seen) == {"abcd", "abcdefgx"}
    data.write_text("\n".join('{"prompt": "a long prompt", "completion": "z"}' for _ in range(12)))
    with pytest.raises(ValueError, match="no example keeps a completion token within 8 tokens"):  # not a log 2 loss
        sft.main(tiny_run_args(tmp_path, dataset=str(data), max_length=8, output_dir=str(tmp_path / "b")))


@pytest.mark.parametrize(
    "flag, value",
    [
        ("eval_every", 0),
        ("batch_size", 0),
        ("total_steps", 0),
        ("micro_batch_size", 0),
        ("max_new_tokens", 0),
        ("num_demonstrations", 0),
        ("save_every", -1),
        ("keep_checkpoints", 0),
    ],
)
def test_a_bad_flag_is_a_one_line_error_before_anything_is_written(flag, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "--" + flag.replace("_", "-")
    with mock.patch("sys.argv", ["sft.py", name, str(value), "--output-dir", str(tmp_path / "ckpt")]):
        with pytest.raises(SystemExit) as stop:
            common.run(sft.main, sft.Args)
    assert stop.value.code == f"error: {name} {value} must be >= {1 if value == 0 else 0}"
    assert list(tmp_path.iterdir()) == [], "no output folder, no empty TensorBoard run"


def test_float16_on_the_cpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--dtype float16 does not train correctly on the CPU"):
        sft.main(tiny_run_args(tmp_path, dtype="float16", device="cpu"))
    assert list(tmp_path.iterdir()) == []


def test_the_output_folder_of_a_user_is_refused_unless_asked_and_its_files_survive(
    tmp_path, monkeypatch, users_file, refused_keeping
):
    monkeypatch.chdir(tmp_path)
    notes = users_file(tmp_path / "ckpt" / "notes.txt")
    with refused_keeping(notes, "holds files not written here .*'notes.txt'.*--overwrite-output-dir"):
        sft.main(tiny_run_args(tmp_path))
    assert not (tmp_path / "runs").exists()
    a_file = users_file(tmp_path / "a_file", "mine too")
    with refused_keeping(a_file, "is a file"):
        sft.main(tiny_run_args(tmp_path, output_dir=str(a_file)))
    sft.main(tiny_run_args(tmp_path, overwrite_output_dir=True))
    assert notes.read_text() == "mine" and (tmp_path / "ckpt" / "model.safetensors").is_file()


def test_eval_dataset_gives_the_greedy_accuracy_on_a_file(tmp_path, monkeypatch, logged_scalars):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("\n".join('{"prompt": "1+1=", "completion": "2"}' for _ in range(20)))
    (tmp_path / "eval.jsonl").write_text('{"prompt": "2+2=", "answer": "4"}\n{"prompt": "3+3=", "answer": "6"}\n')
    args = tiny_run_args(tmp_path, dataset=str(tmp_path / "train.jsonl"), eval_dataset=str(tmp_path / "eval.jsonl"))
    sft.main(args)
    assert 0.0 <= logged_scalars[("charts/eval_accuracy", 3)] <= 1.0 and ("charts/eval_loss", 3) in logged_scalars


def test_a_run_stopped_by_sigint_and_resumed_ends_like_an_uninterrupted_run(tmp_path, monkeypatch, record_run):
    monkeypatch.chdir(tmp_path)
    # 6 demonstrations in batches of 4: the interruption falls inside a pass, so the order and generator must resume
    flags = dict(num_demonstrations=6, batch_size=4, total_steps=5, eval_every=2, save_every=0, warmup_steps=1)
    whole = record_run()
    sft.main(tiny_run_args(tmp_path, output_dir=str(tmp_path / "whole"), **flags))
    interrupted = record_run(interrupt_at=("losses/sft_loss", 2))
    with pytest.raises(SystemExit, match="stopped by SIGINT after step 2; continue with --resume auto"):
        sft.main(tiny_run_args(tmp_path, output_dir=str(tmp_path / "run"), **flags))
    assert (tmp_path / "run" / "checkpoint-2" / "training_state.pt").is_file()
    assert not (tmp_path / "run" / "model.safetensors").exists() and ("losses/sft_loss", 3) not in interrupted
    resumed = record_run()
    sft.main(tiny_run_args(tmp_path, output_dir=str(tmp_path / "run"), resume="auto", **flags))
    expected, final = (safetensors.torch.load_file(tmp_path / f / "model.safetensors") for f in ("whole", "run"))
    assert expected.keys() == final.keys() and all(torch.equal(expected[name], final[name]) for name in expected)

    def after_step_2(logged: dict) -> dict:  # every metric but the timing
        return {key: value for key, value in logged.items() if key[1] >= 3 and key[0] != "charts/SPS"}

    assert after_step_2(resumed) == after_step_2(whole)
    assert {("losses/sft_loss", 5), ("losses/grad_norm", 3), ("charts/eval_loss", 4)} <= after_step_2(whole).keys()
