import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import common
import dpo
import sft

LOSS_TYPES = ["sigmoid", "ipo", "hinge"]


def equality_value(loss_type: str, beta: float) -> float:
    """The loss of every pair when policy == reference (h = 0)."""
    return {"sigmoid": math.log(2), "ipo": 1 / (4 * beta**2), "hinge": 1.0}[loss_type]


def losses_for(h_chosen, h_rejected, beta, loss_type="sigmoid", label_smoothing=0.0, lengths=(1, 1)):
    """dpo_loss with log-ratios h_chosen and h_rejected (reference log-probs 0) and given completion lengths."""
    chosen, rejected = torch.as_tensor(h_chosen, dtype=torch.float64), torch.as_tensor(h_rejected, dtype=torch.float64)
    chosen_lengths, rejected_lengths = (torch.full_like(chosen, n) for n in lengths)
    zero = torch.zeros_like(chosen)
    return dpo.dpo_loss(
        chosen, rejected, zero, zero, beta, loss_type, label_smoothing, chosen_lengths, rejected_lengths
    )


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = sft.build_tiny_tokenizer()
    return tokenizer, sft.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2).eval()


def tokenized_pairs(tokenizer, rows):
    return [dpo.tokenize_pair(tokenizer, row, 64, False)[:3] for row in rows]


PAIRS = [
    {"prompt": "12+3=", "chosen": "15", "rejected": "16"},
    {"prompt": "1+2=", "chosen": "3", "rejected": "13"},
    {"prompt": "99+99=", "chosen": "198", "rejected": "188"},
    {"prompt": "7+70=", "chosen": "77", "rejected": "87"},
    {"prompt": "5+5=", "chosen": "10", "rejected": "0"},
]


# ----------------------------------------------------------------------------- dpo_loss
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@given(
    logps=st.lists(st.floats(-50, 0), min_size=2, max_size=2),
    beta=st.floats(0.01, 5.0),
    lengths=st.tuples(st.integers(1, 9), st.integers(1, 9)),
)
@settings(max_examples=30, deadline=None)
def test_loss_at_policy_equal_reference_is_the_equality_value(loss_type, logps, beta, lengths):
    chosen, rejected = torch.tensor([logps[0]], dtype=torch.float64), torch.tensor([logps[1]], dtype=torch.float64)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        chosen,
        rejected,
        chosen.clone(),
        rejected.clone(),
        beta,
        loss_type,
        0.0,
        torch.tensor([lengths[0]]),
        torch.tensor([lengths[1]]),
    )
    torch.testing.assert_close(losses, torch.tensor([equality_value(loss_type, beta)], dtype=torch.float64))
    assert chosen_rewards.item() == rejected_rewards.item() == 0.0


def test_label_smoothed_loss_at_policy_equal_reference_is_still_log_2():
    losses, *_ = losses_for([0.0], [0.0], beta=0.3, label_smoothing=0.2)
    torch.testing.assert_close(losses, torch.tensor([math.log(2)], dtype=torch.float64))


@given(margins=st.lists(st.integers(-400, 400), min_size=2, max_size=20, unique=True), beta=st.floats(0.05, 2.0))
@settings(max_examples=50, deadline=None)
def test_sigmoid_loss_strictly_decreases_in_the_margin(margins, beta):
    margins = [margin / 20 for margin in sorted(margins)]  # distinct margins at least 0.05 apart, in [-20, 20]
    losses, *_ = losses_for(margins, [0.0] * len(margins), beta)
    assert (losses[1:] < losses[:-1]).all()


def test_hinge_loss_decreases_until_margin_one_over_beta_then_is_zero():
    beta = 0.5
    margins = torch.linspace(-4, 4, 33, dtype=torch.float64)
    losses, *_ = losses_for(margins, torch.zeros_like(margins), beta, "hinge")
    below = margins < 1 / beta
    assert (losses[below][1:] < losses[below][:-1]).all()
    assert (losses[~below] == 0).all()


@given(h_chosen=st.floats(-10, 10), h_rejected=st.floats(-10, 10), beta=st.floats(0.05, 2.0))
@settings(max_examples=50, deadline=None)
def test_sigmoid_gradient_raises_chosen_and_lowers_rejected_logprob(h_chosen, h_rejected, beta):
    chosen = torch.tensor([h_chosen], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([h_rejected], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    losses, *_ = dpo.dpo_loss(chosen, rejected, zero, zero, beta)
    losses.sum().backward()
    # dL/dlogp_w = -beta * sigma(-beta h) = -dL/dlogp_l: a gradient step moves log pi(y_w|x) up and log pi(y_l|x) down
    expected = -beta * torch.sigmoid(torch.tensor(-beta * (h_chosen - h_rejected), dtype=torch.float64))
    torch.testing.assert_close(chosen.grad, expected.reshape(1))
    torch.testing.assert_close(rejected.grad, -expected.reshape(1))
    assert chosen.grad.item() < 0 < rejected.grad.item()


@given(h=st.floats(-20, 20), beta=st.floats(0.05, 2.0), eps=st.floats(0.0, 0.49))
@settings(max_examples=50, deadline=None)
def test_label_smoothing_is_conservative_dpo_exactly(h, beta, eps):
    losses, *_ = losses_for([h], [0.0], beta, label_smoothing=eps)
    z = torch.tensor(beta * h, dtype=torch.float64)
    expected = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    torch.testing.assert_close(losses, expected.reshape(1))


def test_ipo_uses_length_normalised_log_ratios():
    beta = 0.25
    # log-ratio 4 over 4 chosen tokens and 1 over 1 rejected token: 1 per token each,
    # so h_bar = 0 and L = 1 / (4 beta^2)
    losses, *_ = losses_for([4.0], [1.0], beta, "ipo", lengths=(4, 1))
    torch.testing.assert_close(losses, torch.tensor([1 / (4 * beta**2)], dtype=torch.float64))
    # the same h = 3 with one token each is L = (3 - 1 / (2 beta))^2 = 1
    losses, *_ = losses_for([4.0], [1.0], beta, "ipo", lengths=(1, 1))
    torch.testing.assert_close(losses, torch.tensor([(3 - 1 / (2 * beta)) ** 2], dtype=torch.float64))


def test_implicit_rewards_are_beta_times_log_ratios():
    policy = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -0.5])
    reference = torch.tensor([-1.5, -1.0]), torch.tensor([-2.0, -0.5])
    _, chosen_rewards, rejected_rewards = dpo.dpo_loss(*policy, *reference, beta=0.2)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, -0.2]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.2, 0.0]))


def test_chosen_nll_is_the_per_token_negative_log_likelihood_of_the_chosen_completions():
    nll = dpo.chosen_nll(torch.tensor([-2.0, -4.0]), torch.tensor([1, 3]))
    torch.testing.assert_close(nll, torch.tensor(1.5))


# ----------------------------------------------------------------------------- sequence_logprobs and batching
@given(
    rows=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 5), st.integers(0, 4)), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_sequence_logprobs_counts_completion_tokens_only(rows, seed):
    """rows: (prompt length, completion length, padding) per row; prompt and padding positions must not count."""
    generator = torch.Generator().manual_seed(seed)
    length = max(p + c + pad for p, c, pad in rows) + 1
    vocab = 7
    input_ids = torch.randint(vocab, (len(rows), length), generator=generator)
    logits = torch.randn(len(rows), length, vocab, generator=generator)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    expected = []
    for row, (prompt_length, completion_length, _) in enumerate(rows):
        mask[row, prompt_length : prompt_length + completion_length] = 1
        logprobs = torch.log_softmax(logits[row], -1)
        # token t is predicted by the logits at t - 1; a completion starting at position 0 has no prediction
        # for its first token
        expected.append(
            sum(
                logprobs[t - 1, input_ids[row, t]]
                for t in range(max(1, prompt_length), prompt_length + completion_length)
            )
        )
    result = dpo.sequence_logprobs(logits, input_ids, mask)
    torch.testing.assert_close(result, torch.tensor([float(e) for e in expected]))
    # any change to the logits or tokens outside the completion leaves the result unchanged, even -inf logits
    predicts_completion = torch.zeros_like(mask, dtype=torch.bool)
    predicts_completion[:, :-1] = mask[:, 1:].bool()
    noisy_logits = torch.where(predicts_completion.unsqueeze(-1), logits, torch.full_like(logits, -math.inf))
    noisy_ids = torch.where(mask.bool(), input_ids, torch.randint(vocab, input_ids.shape, generator=generator))
    torch.testing.assert_close(dpo.sequence_logprobs(noisy_logits, noisy_ids, mask), result)


def test_a_row_without_completion_tokens_gives_zero_not_nan():
    logits = torch.full((2, 5, 4), -math.inf)
    logits[1] = 0.0
    mask = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 1, 1, 0]])
    result = dpo.sequence_logprobs(logits, torch.zeros(2, 5, dtype=torch.long), mask)
    assert result[0].item() == 0.0 and torch.isfinite(result).all()
    torch.testing.assert_close(result[1], torch.tensor(2 * math.log(1 / 4)))


def test_tokenize_pair_shares_the_prompt_appends_eos_and_counts_truncation():
    tokenizer = sft.build_tiny_tokenizer()
    prompt, chosen, rejected, truncated = dpo.tokenize_pair(
        tokenizer, {"prompt": "12+3=", "chosen": "15", "rejected": "105"}, 64, False
    )
    assert tokenizer.decode(prompt) == "12+3=" and not truncated
    assert chosen == tokenizer("15", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rejected == tokenizer("105", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt, chosen, rejected, truncated = dpo.tokenize_pair(
        tokenizer, {"prompt": "12+3=", "chosen": "15", "rejected": "105"}, 8, False
    )
    assert truncated and len(prompt) + len(rejected) == 8 and len(chosen) == 3
    *_, truncated = dpo.tokenize_pair(tokenizer, {"prompt": "12+3=", "chosen": "15", "rejected": "10"}, 8, False)
    assert not truncated


def test_collate_puts_chosen_then_rejected_with_identical_prompts_and_completion_masks():
    tokenizer = sft.build_tiny_tokenizer()
    pairs = tokenized_pairs(tokenizer, PAIRS[:3])
    batch = dpo.collate(pairs, tokenizer.pad_token_id, "cpu")
    assert batch["input_ids"].shape[0] == 6
    for row, (prompt, chosen, rejected) in enumerate(pairs):
        for offset, completion in ((0, chosen), (3, rejected)):
            ids, mask = batch["input_ids"][row + offset], batch["completion_mask"][row + offset]
            assert ids[: len(prompt)].tolist() == prompt
            assert ids[mask.bool()].tolist() == completion
            assert batch["attention_mask"][row + offset].sum() == len(prompt) + len(completion)


def test_concatenated_forward_gives_each_pair_the_logprobs_it_has_alone():
    tokenizer, model = tiny_model()
    pairs = tokenized_pairs(tokenizer, PAIRS)
    with torch.no_grad():
        chosen, rejected = dpo.concatenated_forward(model, dpo.collate(pairs, tokenizer.pad_token_id, "cpu"))
        for index, (prompt, chosen_ids, rejected_ids) in enumerate(pairs):
            for completion, batched in ((chosen_ids, chosen[index]), (rejected_ids, rejected[index])):
                logprobs = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0], -1)
                alone = sum(logprobs[len(prompt) + i - 1, token] for i, token in enumerate(completion))
                torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_concatenated_forward_gives_zero_to_a_row_without_completion_tokens():
    """Logits are kept only from the first completion position; a row with no completion must not shift that."""
    tokenizer, model = tiny_model()
    pairs = tokenized_pairs(tokenizer, PAIRS)
    with torch.no_grad():
        whole = dpo.concatenated_forward(model, dpo.collate(pairs, tokenizer.pad_token_id, "cpu"))
        emptied = [(pairs[0][0], [], pairs[0][2])] + pairs[1:]
        chosen, rejected = dpo.concatenated_forward(model, dpo.collate(emptied, tokenizer.pad_token_id, "cpu"))
    assert chosen[0] == 0
    torch.testing.assert_close(chosen[1:], whole[0][1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, whole[1], atol=1e-5, rtol=1e-5)


def test_concatenated_forward_is_the_same_on_a_left_padded_batch():
    """position_ids come from the mask, so moving the padding to the left changes nothing."""
    tokenizer, model = tiny_model()
    batch = dpo.collate(tokenized_pairs(tokenizer, PAIRS), tokenizer.pad_token_id, "cpu")
    shifts = batch["attention_mask"].size(1) - batch["attention_mask"].sum(-1)
    left_padded = {
        key: torch.stack([row.roll(int(shift)) for row, shift in zip(value, shifts)]) for key, value in batch.items()
    }
    assert (left_padded["attention_mask"][:, 0] == 0).any()
    with torch.no_grad():
        for right, left in zip(dpo.concatenated_forward(model, batch), dpo.concatenated_forward(model, left_padded)):
            torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


def test_precomputed_reference_logprobs_equal_a_live_reference_model():
    tokenizer, model = tiny_model()
    pairs = tokenized_pairs(tokenizer, PAIRS)
    every_pair = list(range(len(pairs)))
    precomputed_chosen, precomputed_rejected = dpo.reference_logprobs(
        model, pairs, every_pair, 3, tokenizer.pad_token_id, "cpu"
    )
    live_model = copy.deepcopy(model)
    with torch.no_grad():
        for indices in ([4, 0], [2], [1, 3]):  # other batches, other padding
            live_chosen, live_rejected = dpo.concatenated_forward(
                live_model, dpo.collate([pairs[i] for i in indices], 0, "cpu")
            )
            torch.testing.assert_close(live_chosen, precomputed_chosen[indices], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(live_rejected, precomputed_rejected[indices], atol=1e-5, rtol=1e-5)


def test_reference_logprobs_of_the_visited_pairs_only_and_nan_for_the_others():
    tokenizer, model = tiny_model()
    pairs = tokenized_pairs(tokenizer, PAIRS)
    every_chosen, every_rejected = dpo.reference_logprobs(model, pairs, list(range(len(pairs))), 2, 0, "cpu")
    chosen, rejected = dpo.reference_logprobs(model, pairs, [1, 3], 2, 0, "cpu")
    for some, every in ((chosen, every_chosen), (rejected, every_rejected)):
        torch.testing.assert_close(some[[1, 3]], every[[1, 3]], atol=1e-5, rtol=1e-5)
        assert some[[0, 2, 4]].isnan().all()  # never trained on: a NaN would show in the loss


def test_one_sigmoid_step_raises_chosen_and_lowers_rejected_logprobs_of_the_model():
    tokenizer, model = tiny_model(seed=1)
    batch = dpo.collate(tokenized_pairs(tokenizer, PAIRS), tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        ref_chosen, ref_rejected = dpo.concatenated_forward(model, batch)
    chosen, rejected = dpo.concatenated_forward(model, batch)
    losses, *_ = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    losses.mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    with torch.no_grad():
        new_chosen, new_rejected = dpo.concatenated_forward(model, batch)
    assert new_chosen.sum() > ref_chosen.sum() and new_rejected.sum() < ref_rejected.sum()


def test_rejected_from_model_rejects_the_models_own_wrong_answers_only():
    tokenizer, model = tiny_model()
    prompts = [{"prompt": pair["prompt"], "answer": pair["chosen"]} for pair in PAIRS]
    _, greedy = common.evaluate_accuracy(model, tokenizer, prompts, 4)
    pairs = [dict(PAIRS[0], chosen=greedy[0]), *PAIRS[1:]]  # the model is "right" on the first pair
    result = dpo.rejected_from_model(model, tokenizer, pairs, 4, False)
    assert result[0] == pairs[0]
    assert [pair["rejected"] for pair in result[1:]] == greedy[1:] != [pair["rejected"] for pair in PAIRS[1:]]
    assert [(pair["prompt"], pair["chosen"]) for pair in result] == [(pair["prompt"], pair["chosen"]) for pair in pairs]


# ----------------------------------------------------------------------------- end to end
def run_dpo(tmp_path, model_path, **overrides) -> str:
    output_dir = str(tmp_path / overrides.pop("name", "ckpt"))
    arguments = dict(
        model=model_path,
        num_pairs=32,
        total_steps=3,
        batch_size=4,
        eval_every=2,
        eval_size=8,
        learning_rate=1e-2,
        output_dir=output_dir,
    )
    dpo.main(dpo.Args(**{**arguments, **overrides}))
    return output_dir


def test_dpo_end_to_end_changes_the_model_and_writes_a_checkpoint_that_loads(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output_dir = run_dpo(tmp_path, tiny_checkpoint)
    assert (tmp_path / "runs").is_dir()
    before = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    after = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    tokenizer = common.load_tokenizer(output_dir)
    inputs = tokenizer(["1+2="], return_tensors="pt")
    output = AutoModelForCausalLM.from_pretrained(output_dir).generate(
        **inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert output.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_keeping_the_reference_model_trains_the_same_as_precomputing_it(
    tiny_checkpoint, tmp_path, monkeypatch, loss_type
):
    monkeypatch.chdir(tmp_path)
    extra = {"loss_type": loss_type, "sft_coef": 0.5, "label_smoothing": 0.1 if loss_type == "sigmoid" else 0.0}
    precomputed = run_dpo(tmp_path, tiny_checkpoint, name="precomputed", **extra)
    live = run_dpo(tmp_path, tiny_checkpoint, name="live", keep_reference_model=True, **extra)
    precomputed_state = AutoModelForCausalLM.from_pretrained(precomputed).state_dict()
    live_state = AutoModelForCausalLM.from_pretrained(live).state_dict()
    for name, tensor in precomputed_state.items():
        torch.testing.assert_close(live_state[name], tensor, atol=1e-5, rtol=1e-4)


def test_micro_batches_lora_and_checkpointing(tiny_checkpoint, tmp_path, monkeypatch):
    """Gradient accumulation over micro-batches trains exactly like whole batches; LoRA with a live reference runs."""
    monkeypatch.chdir(tmp_path)
    whole = AutoModelForCausalLM.from_pretrained(run_dpo(tmp_path, tiny_checkpoint, name="whole")).state_dict()
    micro = run_dpo(tmp_path, tiny_checkpoint, name="micro", micro_batch_size=1, gradient_checkpointing=True)
    for name, tensor in AutoModelForCausalLM.from_pretrained(micro).state_dict().items():
        torch.testing.assert_close(tensor, whole[name], atol=1e-5, rtol=1e-4)
    lora = run_dpo(tmp_path, tiny_checkpoint, name="lora", lora_r=4, keep_reference_model=True, dtype="bfloat16")
    lora_state = AutoModelForCausalLM.from_pretrained(lora, dtype="auto").state_dict()
    assert lora_state.keys() == whole.keys() and lora_state["transformer.wte.weight"].dtype == torch.bfloat16


def test_dpo_on_jsonl(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "pairs.jsonl"
    rows = ['{"prompt": "say hi: ", "chosen": "hi", "rejected": "go away"}'] * 5
    rows.append(
        f'{{"prompt": "say hi: ", "chosen": "{"hi " * 40}", "rejected": "no"}}'
    )  # beyond the model's 64 positions: cut
    data.write_text("\n".join(rows))
    assert (tmp_path / run_dpo(tmp_path, tiny_checkpoint, dataset=str(data)) / "config.json").is_file()


def test_bad_jsonl_names_the_line(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:2: missing field 'rejected'"):
        run_dpo(tmp_path, tiny_checkpoint, dataset=str(data))
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl: pair 2 .* has an empty prompt"):
        run_dpo(tmp_path, tiny_checkpoint, dataset=str(data))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "--label-smoothing applies to --loss-type sigmoid only"),
        ({"label_smoothing": 0.5}, r"--label-smoothing must be in \[0, 0.5\)"),
        ({"beta": 0.0}, "--beta must be > 0"),
        ({"loss_type": "kto"}, "--loss-type must be sigmoid, ipo or hinge"),
        ({"rejected_from_model": True, "dataset": "pairs.jsonl"}, "--rejected-from-model needs --dataset arithmetic"),
    ],
)
def test_bad_flags_are_rejected_before_loading(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_dpo(tmp_path, str(tmp_path / "missing"), **overrides)
    assert not (tmp_path / "runs").exists()


def test_a_missing_model_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_dpo(tmp_path, str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- reliability: bad input, output, resume
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eval_every": 0}, "--eval-every 0 must be >= 1"),
        ({"eval_size": 0}, "--eval-size 0 must be >= 1"),
        ({"batch_size": 0}, "--batch-size 0 must be >= 1"),
        ({"micro_batch_size": 0}, "--micro-batch-size 0 must be >= 1"),
        ({"total_steps": 0}, "--total-steps 0 must be >= 1"),
        ({"num_pairs": 0}, "--num-pairs 0 must be >= 1"),
        ({"max_length": 0}, "--max-length 0 must be >= 1"),
        ({"max_new_tokens": 0}, "--max-new-tokens 0 must be >= 1"),
        ({"save_every": -1}, "--save-every -1 must be >= 0"),
        ({"keep_checkpoints": 0}, "--keep-checkpoints 0 must be >= 1"),
        ({"warmup_steps": -1}, "--warmup-steps -1 must be >= 0"),
        ({"lora_r": -1}, "--lora-r -1 must be >= 0"),
        ({"sft_coef": -1.0}, "--sft-coef -1.0 must be >= 0"),
    ],
)
def test_each_missing_check_is_an_error_naming_the_flag_before_loading(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_dpo(tmp_path, str(tmp_path / "missing"), **overrides)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists()


def test_a_bad_flag_reaches_the_user_as_one_line(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = Path(dpo.__file__).resolve()
    result = subprocess.run(
        [sys.executable, str(script), "--eval-every", "0"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --eval-every 0 must be >= 1"


def test_digits_0_and_float16_on_the_cpu_are_refused(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--digits 0 must be >= 1"):
        run_dpo(tmp_path, tiny_checkpoint, digits=0)
    with pytest.raises(ValueError, match="--dtype float16 does not train correctly on the CPU"):
        run_dpo(tmp_path, tiny_checkpoint, dtype="float16", device="cpu")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists()


def test_an_output_dir_holding_a_users_files_is_refused_and_kept_unless_overwrite(
    tiny_checkpoint, tmp_path, monkeypatch, users_file
):
    monkeypatch.chdir(tmp_path)
    notes = users_file(tmp_path / "ckpt" / "notes.txt")
    with pytest.raises(ValueError, match="holds files not written here .*--overwrite-output-dir"):
        run_dpo(tmp_path, tiny_checkpoint)
    a_file = users_file(tmp_path / "a_file", "mine too")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run_dpo(tmp_path, tiny_checkpoint, name="a_file")
    assert notes.read_text() == "mine" and a_file.read_text() == "mine too"
    assert not (tmp_path / "runs").exists()
    run_dpo(tmp_path, tiny_checkpoint, overwrite_output_dir=True)
    assert notes.read_text() == "mine" and (tmp_path / "ckpt" / "config.json").is_file()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(path)


def test_pairs_whose_prompt_leaves_no_room_are_dropped_and_none_left_is_an_error(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    short = {"prompt": "say hi: ", "chosen": "hi", "rejected": "go away"}
    long = {"prompt": "x" * 70, "chosen": "hi", "rejected": "no"}  # beyond the model's 64 positions
    data = write_jsonl(tmp_path / "pairs.jsonl", [short] * 5 + [long])
    run_dpo(tmp_path, tiny_checkpoint, dataset=data)
    assert "dropped 1 of 6 pairs" in capsys.readouterr().out
    # every prompt fills --max-length: the run would train on nothing (loss log 2 throughout), so it is refused
    with pytest.raises(ValueError, match="no pair left, every prompt fills --max-length 8"):
        run_dpo(tmp_path, tiny_checkpoint, dataset=data, max_length=8, name="nothing")
    assert not (tmp_path / "nothing").exists()


def test_eval_dataset_gives_held_out_accuracy_on_jsonl_pairs(tiny_checkpoint, tmp_path, monkeypatch, logged_scalars):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "say hi: ", "chosen": "hi", "rejected": "no"}] * 8)
    problems = [{"prompt": "say hi: ", "answer": "hi"}] * 3 + [{"prompt": "y" * 40, "answer": "no"}]
    eval_data = write_jsonl(tmp_path / "eval.jsonl", problems)
    calls, evaluate_accuracy = [], common.evaluate_accuracy

    def spy(model, tokenizer, rows, max_new_tokens, **kwargs):
        calls.append((len(rows), max_new_tokens))
        return evaluate_accuracy(model, tokenizer, rows, max_new_tokens, **kwargs)

    monkeypatch.setattr(common, "evaluate_accuracy", spy)
    run_dpo(tmp_path, tiny_checkpoint, dataset=data, eval_dataset=eval_data)
    # default generation length min(64, 64 // 2) = 32: the 40-token prompt does not fit and is dropped
    assert calls == [(3, 32)] * 3
    assert sorted(step for tag, step in logged_scalars if tag == "charts/eval_accuracy") == [0, 2, 3]
    calls.clear()
    run_dpo(tmp_path, tiny_checkpoint, dataset=data, eval_dataset=eval_data, max_new_tokens=5, name="short")
    assert calls == [(4, 5)] * 3
    calls.clear()
    run_dpo(tmp_path, tiny_checkpoint, name="arithmetic")
    assert calls == [(8, 4)] * 3  # digits + 2 on arithmetic


def test_rejected_from_model_runs_end_to_end(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    output_dir = run_dpo(tmp_path, tiny_checkpoint, rejected_from_model=True)
    assert "of 32 rejected answers are the model's own" in capsys.readouterr().out
    assert (Path(output_dir) / "config.json").is_file()


@pytest.mark.parametrize("overrides", [{}, {"keep_reference_model": True}, {"lora_r": 4, "keep_reference_model": True}])
def test_a_run_interrupted_by_sigint_and_resumed_ends_like_one_uninterrupted_run(
    tiny_checkpoint, tmp_path, monkeypatch, overrides, record_run
):
    """6 pairs in batches of 4: the data order and its generator carry over a pass boundary. The reference log-probs
    must come from the starting model, not the resumed one, or the resumed steps would differ."""
    monkeypatch.chdir(tmp_path)
    arguments = dict(num_pairs=6, total_steps=5, eval_every=2, **overrides)
    whole = record_run()
    whole_dir = run_dpo(tmp_path, tiny_checkpoint, name="whole", **arguments)
    record_run(interrupt_at=("losses/dpo_loss", 2))
    with pytest.raises(SystemExit, match="stopped by SIGINT after step 2; continue with --resume auto"):
        run_dpo(tmp_path, tiny_checkpoint, name="resumed", **arguments)
    assert sorted(path.name for path in (tmp_path / "resumed").iterdir()) == ["checkpoint-2"]
    resumed = record_run()
    resumed_dir = run_dpo(tmp_path, tiny_checkpoint, name="resumed", resume="auto", **arguments)

    whole_state = AutoModelForCausalLM.from_pretrained(whole_dir).state_dict()
    resumed_state = AutoModelForCausalLM.from_pretrained(resumed_dir).state_dict()
    assert all(torch.equal(resumed_state[name], tensor) for name, tensor in whole_state.items())
    later = {key: value for key, value in whole.items() if key[1] >= 3 and key[0] != "charts/SPS"}
    assert later and {key: resumed[key] for key in later} == later
    assert ("charts/eval_accuracy", 0) not in resumed  # no evaluation at step 0 on a resume
