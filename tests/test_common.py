import copy
import json
import random
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

import common


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
    tokenizer = common.build_tiny_tokenizer()
    common.save_checkpoint(common.build_tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2), tokenizer, str(tmp_path / "tiny"))
    plain = common.load_model(str(tmp_path / "tiny"))
    mixed = common.load_model(str(tmp_path / "tiny"), autocast_dtype=torch.bfloat16)
    ids = torch.tensor([tokenizer("12+34=46")["input_ids"]] * 2)
    matmul_dtypes = []
    mixed.base_model.h[0].mlp.c_fc.register_forward_hook(lambda module, inputs, output: matmul_dtypes.append(output.dtype))
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
    "architecture, dropout", [("gpt2", dict(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)), ("llama", dict(attention_dropout=0.5))]
)
def test_load_model_disables_dropout(architecture, dropout, tiny_model, tmp_path):
    """GPT-2 drops out through nn.Dropout modules; Llama passes a float rate to its attention: both must be off."""
    tokenizer = common.build_tiny_tokenizer()
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


# ----------------------------------------------------------------------------- tiny model
def test_tiny_tokenizer_round_trip(tmp_path):
    tokenizer = common.build_tiny_tokenizer()
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
        torch.testing.assert_close(common.token_logprobs(logits, tokens, temperature), logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
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
@given(rows=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=4), eos=st.integers(0, 3))
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
    tokenizer = common.build_tiny_tokenizer()
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


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 4), length=st.integers(2, 8), scale=st.floats(0.1, 100.0))
@example(seed=10000, rows=1, length=2, scale=0.25)  # a variance of 1e-4, where eps = 1e-8 shows
def test_masked_whiten(seed, rows, length, scale):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, length, generator=generator, dtype=torch.float64) * scale + 3.0
    mask = (torch.rand(rows, length, generator=generator) < 0.7).double()
    mask[0, :2] = 1.0  # at least two entries, so the variance is defined
    whitened = common.masked_whiten(values, mask)
    assert common.masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-6)
    variance = common.masked_var(values, mask).item()  # whitening divides by sqrt(var + eps): variance var / (var + eps)
    assert common.masked_var(whitened, mask).item() == pytest.approx(variance / (variance + 1e-8), rel=1e-9)
    assert torch.all(whitened[mask == 0] == 0)
    unshifted = common.masked_whiten(values, mask, shift_mean=False)
    assert common.masked_mean(unshifted, mask).item() == pytest.approx(common.masked_mean(values, mask).item(), rel=1e-6)


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


# ----------------------------------------------------------------------------- data
def test_read_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "answer": 3}\n\n{"prompt": "b", "answer": "4", "extra": 1}\n')
    assert common.read_jsonl(str(path), ("prompt", "answer")) == [
        {"prompt": "a", "answer": "3"},
        {"prompt": "b", "answer": "4", "extra": 1},
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "b"}', "missing field 'answer'"),
        ('{"prompt": "b", "answer": null}', "field 'answer' must be a string"),
        ('{"prompt": "b", "answer": ', "not valid JSON"),
        ('["b", "4"]', "expected a JSON object"),
        ('{"prompt": "b", "answer": NaN}', "field 'answer' must be a string or a finite number, got nan"),
    ],
)
def test_read_jsonl_bad_line_names_file_line_and_field(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=f"data.jsonl:2: {message}"):
        common.read_jsonl(str(path), ("prompt", "answer"))


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        common.read_jsonl(str(tmp_path / "nope.jsonl"), ("prompt",))


# ----------------------------------------------------------------------------- arithmetic task
def test_arithmetic_problems_split_is_disjoint_and_fixed():
    train = common.arithmetic_problems(2000, digits=2, split="train", seed=0)
    test = common.arithmetic_eval_set(300, digits=2)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert test == common.arithmetic_eval_set(300, digits=2)
    for problem in train[:50] + test[:50]:
        a, b = (int(x) for x in problem["prompt"].removesuffix("=").split("+"))
        assert 0 <= a < 100 and 0 <= b < 100 and problem["answer"] == str(a + b)


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 10**6), b=st.integers(0, 10**6), noise=st.text(max_size=30))
def test_exact_match_reward(a, b, noise):
    answer = str(a + b)
    assert common.exact_match(answer, answer) == 1.0
    assert common.exact_match(f" {answer}\n", answer) == 1.0
    assert common.exact_match(str(a + b + 1), answer) == 0.0
    assert common.exact_match(answer + "0", answer) == 0.0
    assert common.exact_match(noise, answer) in (0.0, 1.0)  # any text: a score, never an exception
    if noise.strip() != answer:
        assert common.exact_match(noise, answer) == 0.0


@pytest.mark.parametrize("completion", ["", " ", "abc", "__import__('os')", "8" * 10_000, "82 82", "8 2", "+82", "82.0"])
def test_exact_match_rejects_garbage(completion):
    assert common.exact_match(completion, "82") == 0.0


def test_arithmetic_reward_takes_dataset_fields():
    rewards = common.arithmetic_reward(["1+1=", "2+2="], ["2", "5"], answer=["2", "4"], other_field=[0, 0])
    assert rewards == [1.0, 0.0]


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 999), b=st.integers(0, 999), seed=st.integers(0, 100))
def test_near_miss_is_plausible_and_wrong(a, b, seed):
    wrong = int(common.near_miss(a, b, random.Random(seed)))
    assert wrong != a + b and wrong >= 0
    assert abs(len(str(wrong)) - len(str(a + b))) <= 1


def test_preference_pairs():
    pairs = common.arithmetic_preference_pairs(100, digits=2, seed=0)
    assert len(pairs) == 100
    for pair in pairs:
        assert pair["chosen"] != pair["rejected"] and int(pair["rejected"]) >= 0
        a, b = (int(x) for x in pair["prompt"][:-1].split("+"))
        assert pair["chosen"] == str(a + b)


# ----------------------------------------------------------------------------- saving
def test_save_checkpoint_is_atomic(tiny_checkpoint, tmp_path, monkeypatch):
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    model = common.load_model(tiny_checkpoint)
    target = tmp_path / "out"
    common.save_checkpoint(model, tokenizer, str(target))
    before = sorted(p.name for p in target.iterdir())
    assert "config.json" in before and "tokenizer.json" in before

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        common.save_checkpoint(model, tokenizer, str(target))
    assert sorted(p.name for p in target.iterdir()) == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and no half-written folder is left
    assert AutoModelForCausalLM.from_pretrained(target) is not None


def test_evaluate_accuracy_scores_greedy_completions(tiny_checkpoint):
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    model = common.load_model(tiny_checkpoint)
    problems = common.arithmetic_eval_set(8)
    accuracy, completions = common.evaluate_accuracy(model, tokenizer, problems, max_new_tokens=4)
    assert len(completions) == 8 and 0.0 <= accuracy <= 1.0
    perfect, _ = common.evaluate_accuracy(model, tokenizer, problems, 4, reward_fn=lambda prompts, completions, **kw: [1.0] * len(prompts))
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
    tokenizer = common.build_tiny_tokenizer()
    base = common.build_tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2)
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
    common.save_checkpoint(model, tokenizer, str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "adapter" / "adapter_config.json").is_file(), "the exact adapters are kept too"
    merged = common.load_model(str(tmp_path / "merged"))
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    tokenizer = common.build_tiny_tokenizer()
    model = common.build_tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2).train()
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
