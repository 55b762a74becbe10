import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import sft


def test_tokenize_example_masks_prompt_and_appends_eos():
    tokenizer = common.build_tiny_tokenizer()
    input_ids, labels, truncated = sft.tokenize_example(tokenizer, {"prompt": "1+2=", "completion": "3"}, 64, False)
    assert tokenizer.decode(input_ids, skip_special_tokens=True) == "1+2=3" and input_ids[-1] == tokenizer.eos_token_id
    assert labels == [-100] * 4 + input_ids[4:] and not truncated
    _, labels, truncated = sft.tokenize_example(tokenizer, {"prompt": "1+2=", "completion": "3456"}, 6, False)
    assert truncated and len(labels) == 6


def test_sft_loss_ignores_prompt_and_padding_tokens():
    torch.manual_seed(0)
    tokenizer = common.build_tiny_tokenizer()
    model = common.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=16, n_head=2)
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
        total_steps=3, batch_size=8, eval_every=2, eval_size=8, tiny_n_layer=1, tiny_n_embd=32, output_dir=str(tmp_path / "ckpt")
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
    """Each micro-batch's loss is normalised by the whole batch's token count, so the parts add up (not a mean of means);
    so is the held-out loss (its answers have 2 or 3 digits: a mean of per-row means would differ)."""
    monkeypatch.chdir(tmp_path)
    runs = []
    for micro_batch_size in (None, 1):
        sft.main(tiny_run_args(tmp_path, total_steps=1, eval_every=100, micro_batch_size=micro_batch_size))
        runs.append({tag: logged_scalars[(tag, 1)] for tag in ("losses/sft_loss", "losses/grad_norm", "charts/eval_loss")})
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


def test_logged_learning_rate_is_the_rate_each_step_used(tmp_path, monkeypatch, logged_scalars):
    """Linear warm-up to the peak over 2 steps, then linear decay to 0 at step 4: factors 1/2, 1, 1, 1/2."""
    monkeypatch.chdir(tmp_path)
    sft.main(tiny_run_args(tmp_path, total_steps=4, warmup_steps=2, learning_rate=1e-3, eval_every=100))
    assert [logged_scalars[("charts/learning_rate", step)] for step in range(1, 5)] == pytest.approx([0.5e-3, 1e-3, 1e-3, 0.5e-3])
