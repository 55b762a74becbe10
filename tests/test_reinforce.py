import itertools
import os

import pytest
import safetensors.torch
import torch
import tyro
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2ForSequenceClassification

import common
import reinforce
import sft

BASELINES = ["leave-one-out", "mean", "none"]
rewards_strategy = st.floats(-3.0, 3.0, allow_nan=False, width=32)
groups = st.integers(2, 6).flatmap(
    lambda k: st.tuples(
        st.just(k), st.lists(st.lists(rewards_strategy, min_size=k, max_size=k), min_size=1, max_size=4)
    )
)


# ----------------------------------------------------------------------------- advantages
@settings(max_examples=200, deadline=None)
@given(groups)
def test_leave_one_out_advantages_have_zero_mean_per_group_and_are_r_minus_the_mean_of_the_others(case):
    group_size, grouped = case
    rewards = torch.tensor(grouped, dtype=torch.float64).view(-1)
    advantages = reinforce.leave_one_out_advantages(rewards, group_size).view(-1, group_size)
    torch.testing.assert_close(advantages.sum(1), torch.zeros(len(grouped), dtype=torch.float64), atol=1e-9, rtol=0)
    for group, row in zip(grouped, advantages.tolist()):
        for i, advantage in enumerate(row):
            others = group[:i] + group[i + 1 :]
            assert advantage == pytest.approx(group[i] - sum(others) / len(others), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(groups)
def test_mean_baseline_is_k_minus_1_over_k_of_leave_one_out_and_none_is_the_reward(case):
    group_size, grouped = case
    rewards = torch.tensor(grouped, dtype=torch.float64).view(-1)
    leave_one_out = reinforce.baseline_advantages(rewards, group_size, "leave-one-out")
    mean = reinforce.baseline_advantages(rewards, group_size, "mean")
    expected_mean = (rewards.view(-1, group_size) - rewards.view(-1, group_size).mean(1, keepdim=True)).view(-1)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(mean, leave_one_out * (group_size - 1) / group_size)
    torch.testing.assert_close(reinforce.baseline_advantages(rewards, group_size, "none"), rewards)
    with pytest.raises(ValueError, match="--baseline"):
        reinforce.baseline_advantages(rewards, group_size, "median")


def expected_group_gradient(logits, group_size, estimator):
    """E over every group of k i.i.d. draws of a tabular softmax policy of estimator(group), weighted exactly."""
    probabilities = logits.softmax(0)
    total = torch.zeros_like(logits)
    for group in itertools.product(range(len(logits)), repeat=group_size):
        total += torch.prod(probabilities[list(group)]) * estimator(list(group))
    return total


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=2, max_size=4),
    st.lists(rewards_strategy, min_size=4, max_size=4),
    st.integers(2, 4),
)
def test_the_baseline_adds_no_bias_and_mean_scales_the_gradient_by_k_minus_1_over_k(logits, rewards, group_size):
    """pi = softmax(theta) over a few outcomes y with rewards r(y): grad E[r] = pi * (r - E[r]); the estimator
    (1/k) sum_i A_i grad log pi(y_i), with grad log pi(y) = onehot(y) - pi, averaged over every group exactly."""
    logits = torch.tensor(logits, dtype=torch.float64)
    reward_of = torch.tensor(rewards[: len(logits)], dtype=torch.float64)
    probabilities = logits.softmax(0)
    true_gradient = probabilities * (reward_of - (probabilities * reward_of).sum())
    score = torch.eye(len(logits), dtype=torch.float64) - probabilities  # row y: grad_theta log pi(y)
    for baseline, scale in [("leave-one-out", 1.0), ("none", 1.0), ("mean", (group_size - 1) / group_size)]:

        def estimator(group, baseline=baseline):
            advantages = reinforce.baseline_advantages(reward_of[group], group_size, baseline)
            return (advantages.unsqueeze(1) * score[group]).mean(0)

        expected = expected_group_gradient(logits, group_size, estimator)
        torch.testing.assert_close(expected, scale * true_gradient, atol=1e-10, rtol=1e-8, msg=baseline)


# ----------------------------------------------------------------------------- the loss, on an enumerable policy
# A tabular autoregressive policy over completions of at most 2 tokens from {EOS=0, 1, 2}: the first token from
# softmax(theta[0]), the second from softmax(theta[y_1]) after y_1 != EOS. Seven completions; the mask stops at EOS.
COMPLETIONS = [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
MASKS = torch.tensor([[1, 0]] + [[1, 1]] * 6)


def tabular_logprobs(theta, completions):
    """(len(completions), 2) per-token log-probs; the masked token after an EOS gets any value (theta's row 0)."""
    table = theta.log_softmax(-1)
    return torch.stack([torch.stack([table[0, first], table[first, second]]) for first, second in completions])


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=9, max_size=9),
    st.lists(rewards_strategy, min_size=7, max_size=7),
    st.sampled_from(BASELINES),
)
def test_reinforce_loss_gradient_is_the_reinforce_estimator_and_its_mean_over_groups_the_true_gradient(
    theta, rewards, baseline
):
    theta = torch.tensor(theta, dtype=torch.float64).view(3, 3).requires_grad_()
    reward_of = torch.tensor(rewards, dtype=torch.float64)
    group_size = 3
    # the objective J = E[r] = sum_y pi(y) r(y), and its exact gradient
    sequence_logprobs = (tabular_logprobs(theta, COMPLETIONS) * MASKS).sum(1)
    (true_gradient,) = torch.autograd.grad((sequence_logprobs.exp() * reward_of).sum(), theta)

    def loss_of(group):
        advantages = reinforce.baseline_advantages(reward_of[group], group_size, baseline)
        logprobs = tabular_logprobs(theta, [COMPLETIONS[y] for y in group])
        return reinforce.reinforce_loss(
            logprobs=logprobs, advantages=advantages, mask=MASKS[group], num_completions=group_size
        ), advantages

    # one group: the gradient of the loss is minus the estimator (1/k) sum_i A_i grad log pi(y_i), by hand
    group = [1, 3, 0]
    loss, advantages = loss_of(group)
    (gradient,) = torch.autograd.grad(loss, theta)
    by_hand = torch.zeros(3, 3, dtype=torch.float64)
    probabilities = theta.detach().softmax(-1)
    for advantage, y in zip(advantages, group):
        for position, (row, token) in enumerate([(0, COMPLETIONS[y][0]), (COMPLETIONS[y][0], COMPLETIONS[y][1])]):
            if MASKS[y, position]:
                by_hand[row] += advantage * (torch.eye(3, dtype=torch.float64)[token] - probabilities[row])
    torch.testing.assert_close(gradient, -by_hand / group_size)

    # every group of k: the probability-weighted mean of the loss gradients is minus grad J (scaled for `mean`)
    group_probabilities = sequence_logprobs.detach().exp()
    expected_loss = sum(
        torch.prod(group_probabilities[list(group)]) * loss_of(list(group))[0]
        for group in itertools.product(range(len(COMPLETIONS)), repeat=group_size)
    )
    (expected_gradient,) = torch.autograd.grad(expected_loss, theta)
    scale = (group_size - 1) / group_size if baseline == "mean" else 1.0
    torch.testing.assert_close(expected_gradient, -scale * true_gradient, atol=1e-10, rtol=1e-8)


def test_reinforce_loss_sums_over_tokens_divides_by_the_batch_and_ignores_masked_tokens():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 5, generator=generator, dtype=torch.float64)
    advantages = torch.randn(4, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    loss = reinforce.reinforce_loss(logprobs=logprobs, advantages=advantages, mask=mask, num_completions=4)
    direct = -sum(advantages[i] * logprobs[i, : mask[i].sum()].sum() for i in range(4)) / 4
    torch.testing.assert_close(loss, direct)
    scrambled = torch.where(mask.bool(), logprobs, torch.randn(4, 5, dtype=torch.float64) * 9)
    torch.testing.assert_close(reinforce.reinforce_loss(scrambled, advantages, mask, 4), loss)
    halves = [reinforce.reinforce_loss(logprobs[s], advantages[s], mask[s], 4) for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(sum(halves), loss)  # the parts of a batch (processes) add up to its loss


def test_completion_logprobs_are_the_sampling_logprobs_under_left_padding_and_temperature():
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    model = sft.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2).eval()
    prompts = tokenizer.pad({"input_ids": [tokenizer(p)["input_ids"] for p in ("12+3=", "1+2=")]}, return_tensors="pt")
    sampling = dict(do_sample=True, top_k=0, temperature=0.7, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    output = model.generate(**prompts, **sampling, output_scores=True, return_dict_in_generate=True)
    prompt_length = prompts["input_ids"].size(1)
    completion_ids = output.sequences[:, prompt_length:]
    mask, _ = common.completion_mask(completion_ids, tokenizer.eos_token_id)
    batch = dict(
        input_ids=output.sequences,
        attention_mask=torch.cat([prompts["attention_mask"], mask], 1),
        prompt_length=prompt_length,
    )
    logprobs = reinforce.completion_logprobs(model, batch, temperature=0.7)
    sampled = torch.stack(output.scores, 1).log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs[mask.bool()], sampled[mask.bool()], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- end to end, on the tiny model
def build_reward_model(path, tokenizer, num_labels: int = 1) -> None:
    """A tiny randomly initialised AutoModelForSequenceClassification checkpoint, as reward_model.py writes."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=num_labels
    )
    config.pad_token_id = tokenizer.pad_token_id
    common.save_model(GPT2ForSequenceClassification(config), tokenizer, str(path))


@pytest.fixture
def reward_model_path(tiny_checkpoint, tmp_path) -> str:
    """Graded rewards, so that advantages are not all 0 (the tiny random policy never solves a sum)."""
    build_reward_model(tmp_path / "rm", common.load_tokenizer(tiny_checkpoint))
    return str(tmp_path / "rm")


def small_args(checkpoint, tmp_path, **overrides) -> reinforce.Args:
    defaults = dict(output_dir=str(tmp_path / "out"), total_steps=2, batch_size=8, group_size=4, eval_size=8)
    return reinforce.Args(model=checkpoint, **{**defaults, "eval_every": 1, "save_every": 0, **overrides})


def saved_weights(folder) -> dict:
    return safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))


def test_a_run_changes_the_weights_logs_every_metric_and_saves(
    tiny_checkpoint, reward_model_path, tmp_path, monkeypatch, logged_scalars
):
    monkeypatch.chdir(tmp_path)
    loads, load_model = [], common.load_model
    monkeypatch.setattr(common, "load_model", lambda name, *a, **k: loads.append(name) or load_model(name, *a, **k))
    reinforce.main(small_args(tiny_checkpoint, tmp_path, total_steps=3, beta=0.1, reward_model=reward_model_path))
    assert loads == [tiny_checkpoint, tiny_checkpoint, reward_model_path]  # policy, reference, reward model
    before, after = saved_weights(tiny_checkpoint), saved_weights(tmp_path / "out")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    names = {tag for tag, _ in logged_scalars}
    assert names == {
        "charts/reward",
        "charts/reward_std",
        "charts/completion_length",
        "charts/eval_accuracy",
        "charts/learning_rate",
        "charts/SPS",
        "losses/policy_loss",
        "losses/kl",
        "losses/grad_norm",
    }
    assert logged_scalars[("losses/kl", 1)] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at first
    assert logged_scalars[("losses/kl", 3)] != pytest.approx(0.0, abs=1e-6)
    assert [step for tag, step in logged_scalars if tag == "charts/eval_accuracy"] == [0, 1, 2, 3]
    assert (
        common.load_tokenizer(str(tmp_path / "out")).eos_token_id == common.load_tokenizer(tiny_checkpoint).eos_token_id
    )


def test_beta_0_loads_no_reference_and_logs_no_kl(tiny_checkpoint, tmp_path, monkeypatch, logged_scalars):
    monkeypatch.chdir(tmp_path)
    loads, load_model = [], common.load_model
    monkeypatch.setattr(common, "load_model", lambda name, *a, **k: loads.append(name) or load_model(name, *a, **k))
    args = tyro.cli(reinforce.Args, args=["--model", tiny_checkpoint, "--output-dir", str(tmp_path / "out")])
    assert (args.beta, args.baseline, args.group_size, args.batch_size) == (0.0, "leave-one-out", 8, 128)
    reinforce.main(small_args(tiny_checkpoint, tmp_path, baseline="none"))
    assert loads == [tiny_checkpoint]
    assert not any(tag == "losses/kl" for tag, _ in logged_scalars) and ("losses/policy_loss", 2) in logged_scalars
    assert (tmp_path / "out" / "config.json").is_file()


def test_the_cli_refuses_an_unknown_baseline(capsys):
    with pytest.raises(SystemExit):
        tyro.cli(reinforce.Args, args=["--baseline", "median"])


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(total_steps=0), "--total-steps"),
        (dict(batch_size=0), "--batch-size"),
        (dict(group_size=1), "--group-size"),
        (dict(batch_size=10, group_size=4), "--group-size"),
        (dict(max_completion_length=0), "--max-completion-length"),
        (dict(eval_every=0), "--eval-every"),
        (dict(save_every=-1), "--save-every"),
        (dict(keep_checkpoints=0), "--keep-checkpoints"),
        (dict(temperature=0.0), "--temperature"),
        (dict(beta=-0.1), "--beta"),
        (dict(reward_funcs=("exact",)), "--reward-funcs"),
        (dict(reward_funcs=()), "no reward"),
        (dict(reward_weights=(1.0, 2.0)), "--reward-weights"),
        (dict(digits=0), "--digits"),
    ],
)
def test_bad_flags_fail_before_anything_is_loaded(overrides, flag, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking the flags"))
    with pytest.raises(ValueError, match=flag):
        reinforce.main(small_args(tiny_checkpoint, tmp_path, **overrides))
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dtype, saved_dtype", [("bfloat16", torch.bfloat16), ("mixed", torch.float32)])
def test_bf16_weights_and_mixed_precision_train_on_the_cpu(
    dtype, saved_dtype, tiny_checkpoint, reward_model_path, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    options = dict(dtype=dtype, beta=0.1, reward_model=reward_model_path, learning_rate=1e-2)
    reinforce.main(small_args(tiny_checkpoint, tmp_path, **options))
    before, after = saved_weights(tiny_checkpoint), saved_weights(tmp_path / "out")
    assert all(tensor.dtype == saved_dtype and torch.isfinite(tensor).all() for tensor in after.values())
    assert any(not torch.equal(before[name], after[name].float()) for name in before)


def test_float16_on_the_cpu_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="float16"):
        reinforce.main(small_args(tiny_checkpoint, tmp_path, dtype="float16"))
    assert not (tmp_path / "runs").exists()


def test_the_output_folder_of_a_user_is_refused_or_written_into_and_the_user_files_are_kept(
    tiny_checkpoint, tmp_path, monkeypatch, users_file, refused_keeping
):
    monkeypatch.chdir(tmp_path)
    notes = users_file(tmp_path / "out" / "notes.txt")
    with refused_keeping(notes, "--output-dir .* holds files not written here"):
        reinforce.main(small_args(tiny_checkpoint, tmp_path))
    assert not (tmp_path / "runs").exists()
    a_file = users_file(tmp_path / "file", "mine too")
    with refused_keeping(a_file, "is a file"):
        reinforce.main(small_args(tiny_checkpoint, tmp_path, output_dir=str(a_file)))
    reinforce.main(small_args(tiny_checkpoint, tmp_path, total_steps=1, overwrite_output_dir=True))
    assert notes.read_text() == "mine" and (tmp_path / "out" / "config.json").is_file()


def test_a_reward_model_without_a_trained_head_or_with_two_labels_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no trained 'score' head"):
        reinforce.main(small_args(tiny_checkpoint, tmp_path, reward_model=tiny_checkpoint))  # a causal LM
    build_reward_model(tmp_path / "rm2", common.load_tokenizer(tiny_checkpoint), num_labels=2)
    with pytest.raises(ValueError, match="2 labels"):
        reinforce.main(small_args(tiny_checkpoint, tmp_path, reward_model=str(tmp_path / "rm2")))
    assert not (tmp_path / "runs").exists()


def write_jsonl(path, prompts) -> str:
    path.write_text("\n".join(f'{{"prompt": "{prompt}", "answer": "{len(prompt)}"}}' for prompt in prompts))
    return str(path)


def test_too_few_prompts_for_one_step_is_an_error_with_the_counts(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", [f"{i}+1=" for i in range(3)])
    with pytest.raises(ValueError, match=r"data.jsonl has 3 training prompts, one step needs 4 \(--batch-size 16 / "):
        reinforce.main(small_args(tiny_checkpoint, tmp_path, dataset=data, batch_size=16))


def test_prompts_that_do_not_fit_are_dropped_and_counted_and_none_left_is_an_error(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    prompts = [f"{i}+1=" for i in range(20)] + ["9" * 40 + "+1="] * 5  # 43 tokens > 64 positions - 32 generated
    reinforce.main(small_args(tiny_checkpoint, tmp_path, dataset=write_jsonl(tmp_path / "data.jsonl", prompts)))
    assert "training prompts: dropped 5 of 23 prompts" in capsys.readouterr().out  # 2 of the 25 are held out
    only_long = write_jsonl(tmp_path / "long.jsonl", ["9" * 40 + "+1="] * 20)
    with pytest.raises(ValueError, match="no prompt fits in 32 tokens"):
        reinforce.main(small_args(tiny_checkpoint, tmp_path, dataset=only_long, output_dir=str(tmp_path / "o2")))


def test_jsonl_data_default_length_fields_of_some_rows_and_the_eval_dataset(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    rows = [f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}' for i in range(19)] + [
        '{"prompt": "1+1=", "answer": "2", "x": "1"}'
    ]
    data.write_text("\n".join(rows))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", ["5+5=", "6+6=", "7+7="])
    evaluated, evaluate_accuracy = [], common.evaluate_accuracy
    monkeypatch.setattr(
        common,
        "evaluate_accuracy",
        lambda m, t, rows, *a, **k: evaluated.append(rows) or evaluate_accuracy(m, t, rows, *a, **k),
    )
    args = small_args(tiny_checkpoint, tmp_path, dataset=str(data), reward_funcs=("math", "format"))
    reinforce.main(args)
    assert args.max_completion_length == 32  # min(256, half of the tiny model's 64 positions)
    assert [row["prompt"] for row in evaluated[0]] == ["0+1=", "1+1="]  # no --eval-dataset: the held-out rows
    reinforce.main(
        small_args(
            tiny_checkpoint, tmp_path, dataset=str(data), eval_dataset=eval_data, output_dir=str(tmp_path / "o2")
        )
    )
    assert [row["prompt"] for row in evaluated[-1]] == ["5+5=", "6+6=", "7+7="]


def test_a_run_stopped_by_sigint_and_resumed_ends_as_the_uninterrupted_run(
    tiny_checkpoint, reward_model_path, tmp_path, monkeypatch, record_run
):
    monkeypatch.chdir(tmp_path)
    # 5 prompts, 2 a step: the data order is drawn again at step 3, right after the resume
    data, held_out = (
        write_jsonl(tmp_path / "data.jsonl", [f"{i}+1=" for i in range(5)]),
        write_jsonl(tmp_path / "eval.jsonl", ["2+2="]),
    )
    options = dict(dataset=data, eval_dataset=held_out, reward_model=reward_model_path, beta=0.05, learning_rate=1e-3)
    options |= dict(total_steps=4, reward_funcs=())
    full = record_run()
    reinforce.main(small_args(tiny_checkpoint, tmp_path, output_dir=str(tmp_path / "full"), **options))
    cut_args = small_args(tiny_checkpoint, tmp_path, output_dir=str(tmp_path / "cut"), **options)
    record_run(interrupt_at=("losses/policy_loss", 2))
    with pytest.raises(SystemExit, match="stopped by SIGINT after step 2; continue with --resume auto"):
        reinforce.main(cut_args)
    assert (tmp_path / "cut" / "checkpoint-2" / "training_state.pt").is_file()
    assert not (tmp_path / "cut" / "config.json").exists()
    cut_args.resume = "auto"
    resumed = record_run()
    reinforce.main(cut_args)
    assert min(step for _, step in resumed) == 3  # no step-0 evaluation on a resumed run
    full_weights, resumed_weights = saved_weights(tmp_path / "full"), saved_weights(tmp_path / "cut")
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)
    expected = {key: value for key, value in full.items() if key[1] >= 3 and key[0] != "charts/SPS"}
    assert {key: value for key, value in resumed.items() if key[0] != "charts/SPS"} == expected
    assert any(not torch.equal(full_weights[name], saved_weights(tiny_checkpoint)[name]) for name in full_weights)
