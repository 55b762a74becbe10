import copy
import random
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import common
import sft
import tasks


# ----------------------------------------------------------------------------- setup
def test_seed_everything_repeats_draws():
    common.seed_everything(3)
    first = (random.random(), torch.rand(3))
    common.seed_everything(3)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0] and torch.equal(first[1], second[1])


def test_choose_device_and_dtype():
    assert common.choose_device("cpu").type == "cpu"
    assert common.choose_device("auto").type in ("cpu", "cuda", "mps")
    cpu = torch.device("cpu")
    assert common.choose_precision("auto", cpu) == (torch.float32, None)
    assert common.choose_precision("mixed", cpu) == (torch.float32, torch.bfloat16)
    assert common.choose_precision("bfloat16", cpu) == (torch.bfloat16, None)
    with pytest.raises(ValueError, match="--dtype"):
        common.choose_precision("fp8", cpu)


def test_mixed_precision_runs_the_body_in_bf16_and_keeps_weights_heads_and_gradients_fp32(tmp_path):
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    common.save_model(sft.build_tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2), tokenizer, str(tmp_path / "tiny"))
    plain = common.load_model(str(tmp_path / "tiny"))
    mixed = common.load_model(str(tmp_path / "tiny"), autocast_dtype=torch.bfloat16)
    ids = torch.tensor([tokenizer("12+34=46")["input_ids"]] * 2)
    matmul_dtypes = []
    mixed.base_model.h[0].mlp.c_fc.register_forward_hook(
        lambda module, inputs, output: matmul_dtypes.append(output.dtype)
    )
    logits = mixed(ids).logits
    assert matmul_dtypes == [torch.bfloat16] and logits.dtype == torch.float32
    assert all(parameter.dtype == torch.float32 for parameter in mixed.parameters())
    torch.testing.assert_close(logits, plain(ids).logits, atol=0.1, rtol=0.05)  # bf16 matmuls: close, not equal
    mixed(ids, labels=ids).loss.backward()
    assert all(parameter.grad.dtype == torch.float32 for parameter in mixed.parameters() if parameter.grad is not None)
    output = mixed.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape == (1, ids.size(1) + 3)
    copy_of_mixed = copy.deepcopy(mixed)  # a reference copy runs its own weights, still under autocast
    with torch.no_grad():
        copy_of_mixed.base_model.h[0].mlp.c_fc.weight.zero_()
    assert not torch.allclose(copy_of_mixed(ids).logits, logits) and torch.equal(mixed(ids).logits, logits)
    assert matmul_dtypes[-2:] == [torch.bfloat16] * 2


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common.load_model(str(tmp_path / "nowhere"))
    with pytest.raises(OSError, match="could not load tokenizer 'no-such-org/no-such-model-xyz'"):
        common.load_tokenizer("no-such-org/no-such-model-xyz")
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')  # there, but unloadable
    with pytest.raises(OSError, match="could not load model from .*no-such-architecture") as error:
        common.load_model(str(tmp_path))
    assert "there is no folder" not in str(error.value)


def test_load_tokenizer_sets_pad_and_side(tiny_checkpoint):
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    tokenizer.pad_token = None  # a gpt2-like tokenizer without pad: unk is preferred over EOS
    tokenizer.save_pretrained(tiny_checkpoint + "_nopad")
    reloaded = common.load_tokenizer(tiny_checkpoint + "_nopad", padding_side="right")
    assert reloaded.pad_token == "<unk>" and reloaded.padding_side == "right"


@pytest.mark.parametrize(
    "architecture, dropout",
    [("gpt2", dict(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)), ("llama", dict(attention_dropout=0.5))],
)
def test_load_model_disables_dropout(architecture, dropout, tiny_model, tmp_path):
    """GPT-2 drops out through nn.Dropout modules; Llama passes a float rate to its attention: both must be off."""
    tokenizer = sft.build_tiny_tokenizer()
    tiny_model(architecture, tokenizer).save_pretrained(tmp_path)
    model = common.load_model(str(tmp_path), **dropout)
    assert all(getattr(model.config, name) == 0.5 for name in dropout)  # the checkpoint asks for dropout ...
    input_ids = torch.randint(3, len(tokenizer), (2, 12))
    with torch.no_grad():
        train_logits, eval_logits = model.train()(input_ids).logits, model.eval()(input_ids).logits
    torch.testing.assert_close(train_logits, eval_logits, rtol=0, atol=0)  # ... and none happens in train mode


def test_load_model_drops_the_checkpoints_sampling_defaults(tiny_checkpoint, tmp_path):
    """Samples must come from softmax(logits / T) alone, whatever generation_config.json the checkpoint ships."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    model.generation_config.update(do_sample=True, repetition_penalty=1.5, top_k=2, no_repeat_ngram_size=1)
    model.save_pretrained(tmp_path)
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    prompts = tokenizer(["12+34=", "5+6="], return_tensors="pt", padding=True)
    samples = []
    for path in (tiny_checkpoint, str(tmp_path)):
        torch.manual_seed(0)
        samples.append(
            common.load_model(path).generate(
                **prompts, do_sample=True, temperature=1.0, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id
            )
        )
    assert torch.equal(samples[0], samples[1])


# ----------------------------------------------------------------------------- tensors
@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    vocab=st.integers(2, 50),
    temperature=st.floats(0.1, 3.0),
    seed=st.integers(0, 10_000),
    chunk_elements=st.sampled_from([1, 40, 2**24]),
)
def test_token_logprobs_and_entropy_match_log_softmax(batch, length, vocab, temperature, seed, chunk_elements):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=generator) * 5
    tokens = torch.randint(0, vocab, (batch, length), generator=generator)
    logp = F.log_softmax(logits / temperature, dim=-1)
    with mock.patch.object(common, "LOGITS_CHUNK_ELEMENTS", chunk_elements):  # one row, a few rows, or all at once
        torch.testing.assert_close(
            common.token_logprobs(logits, tokens, temperature), logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        )
        torch.testing.assert_close(common.entropy_from_logits(logits, temperature), -(logp.exp() * logp).sum(-1))


def test_token_logprobs_is_float32_for_bf16_logits():
    logits = torch.randn(2, 3, 7).bfloat16()
    assert common.token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long)).dtype == torch.float32


def test_entropy_from_logits():
    assert torch.allclose(common.entropy_from_logits(torch.zeros(1, 2, 8)), torch.log(torch.tensor(8.0)))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert common.entropy_from_logits(peaked).item() < 1e-6


@pytest.mark.parametrize("eos, pad", [(1, 0), (1, 1)])  # pad distinct from EOS, and pad == EOS (gpt2)
def test_completion_mask(eos, pad):
    ids = torch.tensor(
        [
            [5, 6, eos, pad, pad],  # EOS in the middle: kept, padding after it masked
            [eos, pad, pad, pad, pad],  # EOS first
            [5, 6, 7, 8, 9],  # no EOS: truncated, kept whole
            [5, eos, 7, eos, pad],  # only the first EOS counts
        ]
    )
    mask, has_eos = common.completion_mask(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert has_eos.tolist() == [True, True, False, True]


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=4), eos=st.integers(0, 3)
)
def test_completion_mask_property(rows, eos):
    length = max(len(row) for row in rows)
    ids = torch.tensor([row + [eos] * (length - len(row)) for row in rows])  # padded with EOS, the worst case
    mask, has_eos = common.completion_mask(ids, eos)
    for row, row_mask, row_has_eos in zip(ids.tolist(), mask.tolist(), has_eos.tolist()):
        end = row.index(eos) + 1 if eos in row else len(row)
        assert row_mask == [1] * end + [0] * (len(row) - end)
        assert row_has_eos == (eos in row)


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert common.position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 2, 2]]


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_left_padding_matches_unpadded_rows(architecture, tiny_model):
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    model = tiny_model(architecture, tokenizer)
    model.eval()
    prompts = ["1+2=", "10+20=", "123+456="]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" and batch["attention_mask"][0, 0] == 0
    mask = batch["attention_mask"]
    with torch.no_grad():
        padded = model(batch["input_ids"], attention_mask=mask, position_ids=common.position_ids_from_mask(mask)).logits
        for row, prompt in enumerate(prompts):
            alone = model(tokenizer(prompt, return_tensors="pt")["input_ids"]).logits[0]
            torch.testing.assert_close(padded[row][mask[row].bool()], alone, rtol=1e-4, atol=1e-4)


def test_masked_mean_ignores_masked_entries():
    values = torch.tensor([[1.0, 2.0, 1000.0], [3.0, -1000.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert common.masked_mean(values, mask).item() == pytest.approx(11 / 4)
    assert common.masked_mean(values, mask, dim=1).tolist() == [1.5, 4.0]
    assert common.masked_mean(values, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize("warmup_steps, factors", [(2, [0.5, 1.0, 1.0, 0.5]), (0, [1.0, 0.75, 0.5, 0.25])])
def test_linear_schedule_warms_up_to_the_peak_then_decays_to_zero(warmup_steps, factors):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = common.linear_schedule(optimizer, warmup_steps, total_steps=4)
    rates = []
    for _ in range(5):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2.0 * factor for factor in factors] + [0.0])


# ----------------------------------------------------------------------------- saving
def test_save_model_is_atomic(tiny_checkpoint, tmp_path, monkeypatch):
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    model = common.load_model(tiny_checkpoint)
    target = tmp_path / "out"
    common.save_model(model, tokenizer, str(target))
    before = sorted(p.name for p in target.iterdir())
    assert "config.json" in before and "tokenizer.json" in before

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        common.save_model(model, tokenizer, str(target))
    assert sorted(p.name for p in target.iterdir()) == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and no half-written folder is left
    assert AutoModelForCausalLM.from_pretrained(target) is not None


def test_save_model_replaces_only_our_own_files(tiny_checkpoint, tmp_path):
    tokenizer, model = common.load_tokenizer(tiny_checkpoint), common.load_model(tiny_checkpoint)
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")  # a user's file in a folder written into with --overwrite-output-dir
    (target / "adapter").mkdir()  # and a folder of the user's that has the name of one of ours, but is not in our list
    common.save_model(model, tokenizer, str(target))
    (target / "model.safetensors").write_bytes(b"stale")  # replaced by the next save
    common.save_model(model, tokenizer, str(target))
    assert (target / "notes.txt").read_text() == "mine" and (target / "adapter").is_dir()
    assert AutoModelForCausalLM.from_pretrained(target) is not None
    assert not [p.name for p in target.iterdir() if p.name.startswith(".tmp-")]


def test_check_output_dir_refuses_a_file_a_foreign_folder_and_an_unwritable_path_and_keeps_everything(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}")
    with pytest.raises(ValueError, match="holds files not written here .'train.jsonl'.*--overwrite-output-dir"):
        common.check_output_dir(str(data))
    common.check_output_dir(str(data), overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        common.check_output_dir(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="cannot be written"):
        common.check_output_dir("/proc/no/such/folder")
    assert (data / "train.jsonl").read_text() == "{}" and (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in data.iterdir()) == ["train.jsonl"]
    common.check_output_dir(str(tmp_path / "new" / "run"))  # checked, and no empty folder is left behind
    assert not (tmp_path / "new").exists()


def test_check_output_dir_accepts_our_folders_and_removes_our_stale_temporaries(tiny_checkpoint, tmp_path):
    tokenizer, model = common.load_tokenizer(tiny_checkpoint), common.load_model(tiny_checkpoint)
    common.save_model(model, tokenizer, str(tmp_path / "final"))
    (tmp_path / "final" / ".tmp-model-999").mkdir()  # what a kill during a save leaves
    common.check_output_dir(str(tmp_path / "final"))
    assert not (tmp_path / "final" / ".tmp-model-999").exists() and (tmp_path / "final" / "config.json").is_file()


def tiny_training_state(seed: int):
    torch.manual_seed(seed)
    model = sft.build_tiny_gpt2(sft.build_tiny_tokenizer(), n_layer=1, n_embd=16, n_head=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, common.linear_schedule(optimizer, 1, 10)


def test_a_checkpoint_restores_weights_optimizer_scheduler_rng_and_data_and_refuses_other_flags(tmp_path):
    args = types.SimpleNamespace(
        learning_rate=1e-2, resume="auto", save_every=1, output_dir=str(tmp_path), keep_checkpoints=2
    )
    model, optimizer, scheduler = tiny_training_state(0)
    ids = torch.randint(3, 90, (2, 6))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    generator = torch.Generator().manual_seed(5)
    data = {"generator": generator.get_state(), "order": [3, 1]}
    common.save_checkpoint(args, 2, {"policy": model}, optimizer, scheduler, data)
    random.random(), torch.rand(1)  # the draws a fresh start would not see again
    expected = (random.random(), torch.rand(3), generator.get_state())
    restored, restored_optimizer, restored_scheduler = tiny_training_state(1)
    step, data = common.load_checkpoint(
        common.find_checkpoint("auto", str(tmp_path)),
        {"policy": restored},
        restored_optimizer,
        restored_scheduler,
        args,
    )
    assert step == 2 and data["order"] == [3, 1] and torch.equal(data["generator"], expected[2])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))
    assert restored_scheduler.get_last_lr() == scheduler.get_last_lr()
    for run_model, run_optimizer in (
        (model, optimizer),
        (restored, restored_optimizer),
    ):  # the next step is the same step
        run_model(ids, labels=ids).loss.backward()
        run_optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))
    common.save_checkpoint(args, 2, {"policy": model}, optimizer, scheduler, {})
    random.random(), torch.rand(1)
    first = (random.random(), torch.rand(3))
    common.load_checkpoint(
        tmp_path / "checkpoint-2", {"policy": restored}, restored_optimizer, restored_scheduler, args
    )
    random.random(), torch.rand(1)
    assert (random.random(), torch.rand(3))[0] == first[0]
    args.learning_rate = 1e-3
    with pytest.raises(ValueError, match="was made with --learning-rate 0.01, not 0.001"):
        common.load_checkpoint(
            tmp_path / "checkpoint-2", {"policy": restored}, restored_optimizer, restored_scheduler, args
        )


def test_only_the_newest_checkpoints_are_kept_and_resume_finds_the_newest(tmp_path):
    args = types.SimpleNamespace(seed=1, output_dir=str(tmp_path), keep_checkpoints=2)
    model, optimizer, scheduler = tiny_training_state(0)
    assert common.find_checkpoint(None, str(tmp_path)) is None and common.find_checkpoint("auto", str(tmp_path)) is None
    for step in (5, 10, 15):
        common.save_checkpoint(args, step, {"policy": model}, optimizer, scheduler, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-15"]
    assert common.find_checkpoint("auto", str(tmp_path)) == tmp_path / "checkpoint-15"
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):
        common.find_checkpoint(str(tmp_path), str(tmp_path))


def test_a_signal_inside_stop_on_signal_only_asks_to_stop_and_the_handlers_come_back():
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with common.stop_on_signal() as stop:
        assert not common.checkpoint_due(stop, 3, save_every=2) and common.checkpoint_due(stop, 4, save_every=2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM" and common.checkpoint_due(stop, 3, save_every=0)
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_prints_our_errors_as_one_line_and_keeps_other_tracebacks(capsys):
    import dataclasses

    @dataclasses.dataclass
    class Args:
        dataset: str = "nowhere.jsonl"

    with mock.patch("sys.argv", ["script.py"]), pytest.raises(SystemExit) as stop:
        common.run(lambda args: tasks.read_jsonl(args.dataset, ("prompt",)), Args)
    assert stop.value.code == "error: dataset file 'nowhere.jsonl' does not exist"
    with mock.patch("sys.argv", ["script.py"]), pytest.raises(ZeroDivisionError):
        common.run(lambda args: 1 / 0, Args)
    with mock.patch("sys.argv", ["script.py"]), pytest.raises(ValueError, match="invalid literal"):
        common.run(lambda args: int("raised outside the project's files"), Args)  # a traceback, not one line


def test_float16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="--dtype float16 does not train correctly on the CPU"):
        common.choose_precision("float16", torch.device("cpu"))


def test_a_causal_lm_without_a_trained_score_head_is_not_a_reward_model(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(ValueError, match="has no trained 'score' head"):
        common.load_model(tiny_checkpoint, AutoModelForSequenceClassification, num_labels=1, trained_head="score")
    AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1).save_pretrained(tmp_path)
    common.load_model(str(tmp_path), AutoModelForSequenceClassification, trained_head="score")


def test_fit_prompts_drops_empty_and_too_long_prompts_and_counts_them(tiny_checkpoint, capsys):
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    rows = [{"prompt": "1+2="}, {"prompt": ""}, {"prompt": "1" * 40}, {"prompt": "12+34="}]
    kept = common.fit_prompts(tokenizer, rows, chat_template=False, room=10, what="data.jsonl")
    assert [row["prompt"] for row in kept] == ["1+2=", "12+34="] and kept[0]["prompt_ids"] == tokenizer("1+2=")[
        "input_ids"
    ]
    assert "data.jsonl: dropped 2 of 4 prompts" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no prompt fits in 3 tokens"):
        common.fit_prompts(tokenizer, rows, chat_template=False, room=3, what="data.jsonl")


def test_score_completions_scores_prompt_plus_completion_plus_eos_only_when_it_ended(tiny_checkpoint):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1).eval()
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    scores = common.score_completions(model, tokenizer, ["1+2=", "12+30="], ["3", "42"], [True, False], False, 1)
    with torch.no_grad():
        alone = [
            model(torch.tensor([ids])).logits.item()
            for ids in (tokenizer("1+2=3")["input_ids"] + [tokenizer.eos_token_id], tokenizer("12+30=42")["input_ids"])
        ]
    torch.testing.assert_close(scores, torch.tensor(alone), rtol=1e-4, atol=1e-4)


def test_evaluate_accuracy_scores_greedy_completions(tiny_checkpoint):
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    model = common.load_model(tiny_checkpoint)
    problems = tasks.arithmetic_eval_set(8)
    accuracy, completions = common.evaluate_accuracy(model, tokenizer, problems, max_new_tokens=4)
    assert len(completions) == 8 and 0.0 <= accuracy <= 1.0
    perfect, _ = common.evaluate_accuracy(
        model, tokenizer, problems, 4, reward_fn=lambda prompts, completions, **kw: [1.0] * len(prompts)
    )
    assert perfect == 1.0


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert common.last_token_index(mask).tolist() == [2, 4, 4, 2]


def test_reward_model_scores_read_the_last_real_token(tiny_checkpoint):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1).eval()
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    texts = ["1+2=3", "10+20=30"]
    with torch.no_grad():
        for side in ("left", "right"):
            batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side=side)
            scores = common.reward_model_scores(model, batch["input_ids"], batch["attention_mask"])
            alone = [model(**tokenizer(text, return_tensors="pt")).logits.item() for text in texts]
            torch.testing.assert_close(scores, torch.tensor(alone), rtol=1e-4, atol=1e-4)


def test_lora_starts_as_the_base_model_and_disabling_it_gives_the_base_back(tmp_path):
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    base = sft.build_tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2)
    ids = torch.tensor([tokenizer("12+34=46")["input_ids"]])
    expected = base(ids).logits.detach()
    model = common.apply_lora(copy.deepcopy(base), r=4, alpha=8)
    torch.testing.assert_close(model(ids).logits, expected)
    assert {name for name, p in model.named_parameters() if p.requires_grad} and all(
        "lora_" in name for name, p in model.named_parameters() if p.requires_grad
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    adapted = model(ids).logits.detach()
    assert not torch.allclose(adapted, expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, expected)
    common.save_model(model, tokenizer, str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "adapter" / "adapter_config.json").is_file(), "the exact adapters are kept too"
    merged = common.load_model(str(tmp_path / "merged"))
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    model = sft.build_tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2).train()
    ids = torch.tensor([tokenizer("12+34=46")["input_ids"]] * 2)
    gradients = []
    for checkpointing in (False, True):
        if checkpointing:
            common.enable_gradient_checkpointing(model)
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
    assert model.is_activation_checkpointing
    for plain, recomputed in zip(*gradients):
        torch.testing.assert_close(recomputed, plain)


def test_without_torchrun_the_distributed_helpers_are_the_identity():
    assert common.setup_distributed("cpu") == (0, 1, torch.device("cpu")) and common.world() == (0, 1)
    values = torch.arange(6.0)
    assert common.all_reduce_sum(values) is values and common.all_gather(values) is values
    assert common.shard(list(range(6)), 1, 3) == [2, 3]
