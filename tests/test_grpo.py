import copy
import json

import pytest
import torch
import tyro
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, GPT2Config, GPT2ForSequenceClassification

import common
import grpo
import sft
import tasks

LOSS_TYPES = ["grpo", "dr_grpo", "dapo"]


def random_batch(seed: int, rows: int = 4, length: int = 6):
    """logprobs (leaf), old_logprobs, ref_logprobs, advantages and a ragged completion mask (every row >= 1 token)."""
    generator = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(rows, length, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    old = logprobs.detach() + 0.3 * torch.randn(rows, length, generator=generator, dtype=torch.float64)
    ref = logprobs.detach() + 0.3 * torch.randn(rows, length, generator=generator, dtype=torch.float64)
    advantages = torch.randn(rows, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return logprobs, old, ref, advantages, mask


# ----------------------------------------------------------------------------- group advantages
groups = st.integers(2, 6).flatmap(
    lambda size: st.tuples(
        st.just(size),
        st.lists(
            st.lists(st.sampled_from([0.0, 0.1, 0.7, 1.0, -2.0, 3.25]), min_size=size, max_size=size),
            min_size=1,
            max_size=5,
        ),
    )
)


@settings(max_examples=60, deadline=None)
@given(groups)
def test_group_advantages_invariants(case):
    group_size, rows = case
    rewards = torch.tensor(rows, dtype=torch.float64).view(-1)
    grouped = rewards.view(-1, group_size)
    for scale in ("group", "batch", "none"):
        advantages = grpo.group_advantages(rewards, group_size, scale).view(-1, group_size)
        constant = (grouped == grouped[:, :1]).all(1)
        assert torch.all(advantages[constant] == 0.0)  # exactly zero, never NaN
        torch.testing.assert_close(advantages.mean(1), torch.zeros(len(rows), dtype=torch.float64), atol=1e-9, rtol=0)
        centred = grouped - grouped.mean(1, keepdim=True)
        if scale == "none":
            torch.testing.assert_close(advantages[~constant], centred[~constant])
        elif scale == "batch":
            torch.testing.assert_close(advantages[~constant], (centred / (rewards.std() + 1e-4))[~constant])
        elif (~constant).any():
            std = grouped.std(1)
            torch.testing.assert_close(advantages[~constant].std(1), (std / (std + 1e-4))[~constant])
            assert torch.all(
                (advantages[~constant].std(1) - 1).abs() < 1e-2
            )  # unit std up to the 1e-4 in the denominator


# ----------------------------------------------------------------------------- clipping and KL
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-1.0, 1.0), st.floats(1e-3, 3.0), st.booleans()), min_size=1, max_size=12),
    st.floats(0.05, 0.4),
    st.floats(0.05, 0.4),
)
def test_clip_gradient_is_zero_exactly_where_seed_002_mask_is_zero(tokens, epsilon_low, epsilon_high):
    log_ratio = torch.tensor([t[0] for t in tokens], dtype=torch.float64)
    advantages = torch.tensor([t[1] if t[2] else -t[1] for t in tokens], dtype=torch.float64)  # nonzero, either sign
    ratio = log_ratio.exp()
    assume(bool(((ratio - (1 + epsilon_high)).abs() > 1e-6).all() and ((ratio - (1 - epsilon_low)).abs() > 1e-6).all()))
    # one completion per token, so each token's loss depends on its own advantage
    logprobs = (log_ratio - 2.0).unsqueeze(1).requires_grad_()
    old = torch.full_like(logprobs, -2.0)
    loss, metrics = grpo.grpo_loss(
        logprobs, old, advantages, torch.ones_like(logprobs), epsilon_low=epsilon_low, epsilon_high=epsilon_high
    )
    loss.backward()
    stopped = ((advantages > 0) & (ratio > 1 + epsilon_high)) | ((advantages < 0) & (ratio < 1 - epsilon_low))
    gradient = logprobs.grad.squeeze(1)
    assert torch.all(gradient[stopped] == 0.0)
    assert torch.all(gradient[~stopped] != 0.0)
    torch.testing.assert_close(gradient[~stopped], -(ratio * advantages)[~stopped] / len(tokens))
    assert metrics["clip/high"].item() == pytest.approx(
        ((advantages > 0) & (ratio > 1 + epsilon_high)).double().mean().item()
    )
    assert metrics["clip/low"].item() == pytest.approx(
        ((advantages < 0) & (ratio < 1 - epsilon_low)).double().mean().item()
    )


@settings(max_examples=100, deadline=None)
@given(st.floats(-30.0, 0.0), st.floats(-30.0, 0.0))
def test_k3_is_nonnegative_and_zero_iff_equal(logprob, ref_logprob):
    for dtype in (torch.float32, torch.float64):
        kl = grpo.kl_k3(torch.tensor(logprob, dtype=dtype), torch.tensor(ref_logprob, dtype=dtype))
        assert kl >= 0
        if torch.tensor(logprob, dtype=dtype) == torch.tensor(ref_logprob, dtype=dtype):
            assert kl == 0
        elif abs(logprob - ref_logprob) > 1e-6:
            assert kl > 0


# ----------------------------------------------------------------------------- the loss
def direct_loss(logprobs, old, ref, advantages, mask, beta, loss_type, max_length):
    """The GRPO loss written out with Python loops over completions and tokens."""
    per_completion, total, num_tokens = [], 0.0, 0
    for i in range(logprobs.size(0)):
        terms = []
        for t in range(logprobs.size(1)):
            if mask[i, t]:
                ratio = torch.exp(logprobs[i, t] - old[i, t])
                surrogate = torch.min(ratio * advantages[i], torch.clamp(ratio, 0.8, 1.2) * advantages[i])
                diff = ref[i, t] - logprobs[i, t]
                terms.append(-(surrogate - beta * (torch.exp(diff) - diff - 1)))
        per_completion.append(sum(terms) / len(terms))
        total, num_tokens = total + sum(terms), num_tokens + len(terms)
    if loss_type == "grpo":
        return sum(per_completion) / len(per_completion)
    if loss_type == "dr_grpo":
        return total / (logprobs.size(0) * max_length)
    return total / num_tokens


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_normalisers_match_direct_computation_and_ignore_padding(loss_type):
    logprobs, old, ref, advantages, mask = random_batch(0)
    loss, metrics = grpo.grpo_loss(
        logprobs, old, advantages, mask, ref, 0.1, 0.2, 0.2, loss_type, max_completion_length=10
    )
    torch.testing.assert_close(loss, direct_loss(logprobs, old, ref, advantages, mask, 0.1, loss_type, 10))
    # the normalisers differ: a wrong one fails here
    others = [
        grpo.grpo_loss(logprobs, old, advantages, mask, ref, 0.1, 0.2, 0.2, t, 10)[0]
        for t in LOSS_TYPES
        if t != loss_type
    ]
    assert all(not torch.isclose(loss, other) for other in others)
    # padding: extra masked columns with arbitrary values change nothing
    garbage = torch.randn(4, 3, dtype=torch.float64) * 5
    padded = [torch.cat([x.detach(), garbage], 1) for x in (logprobs, old, ref)]
    padded_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.long)], 1)
    padded_loss, _ = grpo.grpo_loss(
        padded[0], padded[1], advantages, padded_mask, padded[2], 0.1, 0.2, 0.2, loss_type, 10
    )
    torch.testing.assert_close(padded_loss, loss.detach())
    # and garbage in already-masked positions of the original width changes nothing either
    scrambled = [torch.where(mask.bool(), x.detach(), torch.randn_like(x) * 5) for x in (logprobs, old, ref)]
    scrambled_loss, _ = grpo.grpo_loss(
        scrambled[0], scrambled[1], advantages, mask, scrambled[2], 0.1, 0.2, 0.2, loss_type, 10
    )
    torch.testing.assert_close(scrambled_loss, loss.detach())
    # micro-batches with the batch's normalisers add up to the batch loss
    halves = [
        grpo.grpo_loss(
            logprobs[s], old[s], advantages[s], mask[s], ref[s], 0.1, 0.2, 0.2, loss_type, 10, 4, mask.sum()
        )[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(sum(halves), loss)
    assert metrics["losses/kl"] > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_leaving_out_zero_advantage_rows_changes_nothing_when_beta_is_0(loss_type):
    """grpo.py skips completions with A_i = 0 when beta = 0; with the whole batch's normalisers that is exact."""
    logprobs, old, _, advantages, mask = random_batch(2)
    advantages = advantages.clone()
    advantages[[1, 3]] = 0.0  # two completions from constant groups
    loss, _ = grpo.grpo_loss(logprobs, old, advantages, mask, loss_type=loss_type, max_completion_length=10)
    (full_gradient,) = torch.autograd.grad(loss, logprobs)
    kept = advantages.nonzero().squeeze(1)
    kept_logprobs = logprobs.detach()[kept].requires_grad_()
    kept_loss, _ = grpo.grpo_loss(
        kept_logprobs, old[kept], advantages[kept], mask[kept], None, 0.0, 0.2, 0.2, loss_type, 10, 4, mask.sum()
    )
    (kept_gradient,) = torch.autograd.grad(kept_loss, kept_logprobs)
    torch.testing.assert_close(kept_loss, loss.detach())
    torch.testing.assert_close(kept_gradient, full_gradient[kept])
    assert torch.all(full_gradient[[1, 3]] == 0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_mu_1_gradient_is_reinforce_with_baseline(loss_type):
    """With old = logp.detach() (rho = 1) the gradient is -sum_{i,t} A_i grad logp_it / normaliser."""
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    model = sft.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2)
    input_ids = torch.randint(3, len(tokenizer), (4, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # a left-padded prompt
    _, _, _, advantages, mask = random_batch(1, rows=4, length=5)
    advantages = advantages.float()

    logprobs, _ = grpo.completion_logprobs(model, input_ids, attention_mask, 4, temperature=0.7)
    loss, _ = grpo.grpo_loss(
        logprobs, logprobs.detach(), advantages, mask, loss_type=loss_type, max_completion_length=8
    )
    gradient = torch.autograd.grad(loss, list(model.parameters()))

    logprobs, _ = grpo.completion_logprobs(model, input_ids, attention_mask, 4, temperature=0.7)
    weights = {"grpo": mask / mask.sum(1, keepdim=True) / 4, "dr_grpo": mask / (4 * 8), "dapo": mask / mask.sum()}[
        loss_type
    ]
    reinforce = -(advantages.unsqueeze(1) * logprobs * weights).sum()
    expected = torch.autograd.grad(reinforce, list(model.parameters()))
    for ours, theirs in zip(gradient, expected):
        torch.testing.assert_close(ours, theirs)
    assert any(g.abs().sum() > 0 for g in gradient)


def tiny_policy_update_inputs(beta: float, num_iterations: int, advantages: torch.Tensor):
    """A 1-layer policy, a reference a little away from it, and a rollout of 8 completions (2 groups of 4)."""
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    model = sft.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2)
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    input_ids = torch.randint(3, len(tokenizer), (8, 7))
    rollout = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mask=torch.ones(8, 3),
        advantages=advantages,
        prompt_length=4,
    )
    args = grpo.Args(
        beta=beta,
        num_iterations=num_iterations,
        group_size=4,
        batch_size=8,
        micro_batch_size=8,
        max_completion_length=3,
    )
    args.epsilon_high = args.epsilon
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), reference, rollout, args


def test_with_beta_the_kl_term_trains_groups_whose_rewards_are_all_equal():
    model, *rest = tiny_policy_update_inputs(beta=0.1, num_iterations=1, advantages=torch.zeros(8))
    before = copy.deepcopy(model.state_dict())
    metrics = grpo.policy_update(model, *rest)
    assert metrics["losses/kl"] > 0
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_with_mu_2_the_old_policy_is_the_rollouts_in_both_steps(monkeypatch):
    inputs = tiny_policy_update_inputs(
        beta=0.0, num_iterations=2, advantages=torch.tensor([1.0, -1, 2, -2, 0.5, -0.5, 1, -1])
    )
    calls, grpo_loss = [], grpo.grpo_loss
    monkeypatch.setattr(
        grpo,
        "grpo_loss",
        lambda **kwargs: calls.append((kwargs["logprobs"].detach(), kwargs["old_logprobs"])) or grpo_loss(**kwargs),
    )
    grpo.policy_update(*inputs)
    (first_logprobs, first_old), (second_logprobs, second_old) = calls
    torch.testing.assert_close(first_old, first_logprobs)  # rho = 1 at the first step
    torch.testing.assert_close(second_old, first_logprobs)  # pi_old stays the rollout's policy ...
    assert not torch.allclose(second_logprobs, second_old)  # ... while pi_theta has moved: rho != 1


def test_completion_logprobs_match_generation_under_left_padding():
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    model = sft.build_tiny_gpt2(tokenizer, n_layer=1, n_embd=32, n_head=2).eval()
    prompts = tokenizer.pad(
        {"input_ids": [tokenizer("12+3=")["input_ids"], tokenizer("1+2=")["input_ids"]]}, return_tensors="pt"
    )
    output = model.generate(
        **prompts, do_sample=True, top_k=0, max_new_tokens=4, output_scores=True, return_dict_in_generate=True
    )
    prompt_length = prompts["input_ids"].size(1)
    completion_ids = output.sequences[:, prompt_length:]
    mask, _ = common.completion_mask(completion_ids, tokenizer.eos_token_id)
    attention_mask = torch.cat([prompts["attention_mask"], mask], 1)
    logprobs, _ = grpo.completion_logprobs(model, output.sequences, attention_mask, prompt_length, 1.0)
    sampled = torch.stack(output.scores, 1).log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs[mask.bool()], sampled[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_generate_groups_samples_what_generate_samples_on_repeated_prompts(architecture, tiny_model):
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    model = tiny_model(architecture, tokenizer).eval()
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in ("12+3=", "1+2=", "123+45=")]
    prompts = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt", padding_side="left")
    sampling = dict(
        do_sample=True, top_k=0, top_p=1.0, max_new_tokens=6, return_dict_in_generate=True, output_logits=True
    )
    sampling |= dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    expected = model.generate(**{key: value.repeat_interleave(4, dim=0) for key, value in prompts.items()}, **sampling)
    torch.manual_seed(1)
    shared = grpo.generate_groups(model, prompts, 4, **sampling)
    assert torch.equal(shared.sequences, expected.sequences)
    # the logits too: a tiny random model samples the same tokens from slightly wrong logits
    torch.testing.assert_close(torch.stack(shared.logits), torch.stack(expected.logits), rtol=1e-5, atol=1e-5)
    assert (
        len({tuple(row) for row in shared.sequences[:4, prompts["input_ids"].size(1) :].tolist()}) > 1
    )  # the copies sample apart


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_one_prompt_pass_per_group_gives_the_same_logprobs_and_gradients(architecture, tiny_model):
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    model = tiny_model(architecture, tokenizer)
    prompts = tokenizer.pad(
        {"input_ids": [tokenizer(p)["input_ids"] for p in ("12+3=", "1+2=")]}, return_tensors="pt", padding_side="left"
    )
    sequences = grpo.generate_groups(
        model.eval(), prompts, 3, do_sample=True, top_k=0, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id
    )
    prompt_length = prompts["input_ids"].size(1)
    mask, _ = common.completion_mask(sequences[:, prompt_length:], tokenizer.eos_token_id)
    attention_mask = torch.cat([prompts["attention_mask"].repeat_interleave(3, dim=0), mask], dim=1)
    weights = torch.randn(mask.shape)
    results = []
    for group_size in (1, 3):
        model.train().zero_grad()
        logprobs, _ = grpo.completion_logprobs(model, sequences, attention_mask, prompt_length, 0.7, group_size)
        (logprobs * weights * mask).sum().backward()
        results.append((logprobs[mask.bool()], [p.grad.clone() for p in model.parameters()]))
    (every_row, every_row_gradient), (shared, shared_gradient) = results
    torch.testing.assert_close(shared, every_row, rtol=1e-5, atol=1e-5)
    for ours, expected in zip(shared_gradient, every_row_gradient):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- rewards
def build_reward_model(path, tokenizer) -> None:
    """A tiny randomly initialised AutoModelForSequenceClassification checkpoint, as reward_model.py writes."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        num_labels=1,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.pad_token_id = tokenizer.pad_token_id
    common.save_model(GPT2ForSequenceClassification(config), tokenizer, str(path))


def test_reward_model_reward_scores_prompt_plus_completion(tmp_path):
    torch.manual_seed(0)
    tokenizer = sft.build_tiny_tokenizer()
    build_reward_model(tmp_path / "rm", tokenizer)
    reward_model = common.load_model(str(tmp_path / "rm"), grpo.AutoModelForSequenceClassification)
    score = grpo.reward_model_reward(reward_model, tokenizer, False, batch_size=2)
    rewards = score(["1+2=", "12+30=", "1+2="], ["3", "42", "4"])
    ids = tokenizer("12+30=42")["input_ids"] + [tokenizer.eos_token_id]
    alone = reward_model(torch.tensor([ids])).logits.item()
    assert rewards[1] == pytest.approx(alone, abs=1e-5) and rewards[0] != rewards[2]
    # a completion cut at the length limit is scored without the EOS it never produced
    cut = score(["12+30="], ["42"], completion_has_eos=[False])[0]
    assert cut == pytest.approx(
        reward_model(torch.tensor([ids[:-1]])).logits.item(), abs=1e-5
    ) and cut != pytest.approx(alone)


# ----------------------------------------------------------------------------- end to end
def small_args(checkpoint, tmp_path, **overrides):
    defaults = dict(total_steps=2, batch_size=8, group_size=4, micro_batch_size=4, eval_size=8, eval_every=1)
    return grpo.Args(model=checkpoint, **{"output_dir": str(tmp_path / "out"), **defaults, **overrides})


def test_end_to_end_changes_parameters_and_saves_a_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_reward_model(tmp_path / "rm", common.load_tokenizer(tiny_checkpoint))
    loaded = []
    load_reference_model = grpo.load_reference_model
    monkeypatch.setattr(grpo, "load_reference_model", lambda *a: loaded.append(1) or load_reference_model(*a))
    args = small_args(
        tiny_checkpoint,
        tmp_path,
        beta=0.1,
        num_iterations=2,
        reward_model=str(tmp_path / "rm"),
        reward_weights=(1.0, 1.0),
    )
    grpo.main(args)
    assert loaded == [1]
    before = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert (
        common.load_tokenizer(str(tmp_path / "out")).eos_token_id == common.load_tokenizer(tiny_checkpoint).eos_token_id
    )


def test_cli_with_beta_0_builds_no_reference_model(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def refuse(*unused):
        raise AssertionError("beta = 0 must not load a reference model")

    monkeypatch.setattr(grpo, "load_reference_model", refuse)
    flags = ["--model", tiny_checkpoint, "--group-size", "8", "--batch-size", "16", "--micro-batch-size", "8"]
    args = tyro.cli(
        grpo.Args, args=flags + ["--total-steps", "1", "--eval-size", "4", "--output-dir", str(tmp_path / "out")]
    )
    assert args.beta == 0.0 and args.group_size == 8
    grpo.main(args)
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "runs").is_dir()


def test_lora_with_kl_uses_the_model_with_adapters_off_as_reference_and_saves_a_merged_model(
    tiny_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        grpo, "load_reference_model", lambda *unused: pytest.fail("LoRA needs no second copy of the model")
    )
    build_reward_model(tmp_path / "rm", common.load_tokenizer(tiny_checkpoint))  # graded rewards: nonzero advantages
    lora = dict(lora_r=4, learning_rate=1e-2, gradient_checkpointing=True, reward_model=str(tmp_path / "rm"))
    grpo.main(small_args(tiny_checkpoint, tmp_path, beta=0.1, **lora))
    before = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert after.keys() == before.keys(), "the adapters are merged: a plain checkpoint"
    assert not torch.equal(after["transformer.h.0.attn.c_attn.weight"], before["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(after["transformer.wte.weight"], before["transformer.wte.weight"]), "only adapted weights change"


@pytest.mark.parametrize("dtype, saved_dtype", [("bfloat16", torch.bfloat16), ("mixed", torch.float32)])
def test_bf16_weights_and_mixed_precision_train_on_cpu(tiny_checkpoint, tmp_path, monkeypatch, dtype, saved_dtype):
    monkeypatch.chdir(tmp_path)
    build_reward_model(tmp_path / "rm", common.load_tokenizer(tiny_checkpoint))  # graded rewards: nonzero advantages
    grpo.main(
        small_args(
            tiny_checkpoint, tmp_path, dtype=dtype, beta=0.1, reward_model=str(tmp_path / "rm"), learning_rate=1e-2
        )
    )
    before = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert after.dtype == saved_dtype and all(torch.isfinite(p).all() for p in after.parameters())
    assert not torch.equal(
        after.state_dict()["transformer.h.0.mlp.c_fc.weight"].float(), before["transformer.h.0.mlp.c_fc.weight"]
    )


def test_jsonl_data_with_math_and_format_rewards(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}' for i in range(20)))
    args = small_args(
        tiny_checkpoint, tmp_path, dataset=str(data), reward_funcs=("math", "format"), max_completion_length=4
    )
    grpo.main(args)
    assert (tmp_path / "out" / "config.json").is_file()


def test_truncated_completions_leave_the_loss_not_the_logged_length_and_an_update_without_signal_logs_no_entropy(
    tiny_checkpoint, tmp_path, monkeypatch, logged_scalars
):
    """One-token completions of two-digit answers: mostly cut (no EOS), all wrong, so every group is constant."""
    monkeypatch.chdir(tmp_path)
    rollouts, policy_update = [], grpo.policy_update
    monkeypatch.setattr(grpo, "policy_update", lambda *args: rollouts.append(args[4]) or policy_update(*args))
    ended, math_reward = [], tasks.REWARD_FUNCTIONS["math"]
    monkeypatch.setitem(
        tasks.REWARD_FUNCTIONS,
        "math",
        lambda *args, **fields: ended.append(fields["completion_has_eos"]) or math_reward(*args, **fields),
    )
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(f'{{"prompt": "{i}+10=", "answer": "{i + 10}"}}' for i in range(20)))
    grpo.main(
        small_args(
            tiny_checkpoint,
            tmp_path,
            total_steps=1,
            dataset=str(data),
            max_completion_length=1,
            mask_truncated_completions=True,
        )
    )
    rollout = rollouts[0]
    _, has_eos = common.completion_mask(
        rollout["input_ids"][:, rollout["prompt_length"] :], common.load_tokenizer(tiny_checkpoint).eos_token_id
    )
    assert (~has_eos).any() and torch.all(rollout["mask"][~has_eos] == 0)  # cut completions are out of the loss ...
    assert ended == [has_eos.tolist()]  # reward functions are told which completions were cut
    assert logged_scalars[("charts/completion_length", 1)] == 1.0  # ... not out of the logged length
    assert logged_scalars[("charts/frac_reward_zero_std", 1)] == 1.0
    assert ("losses/entropy", 1) not in logged_scalars and ("clip/low", 1) not in logged_scalars  # not reported as 0


def test_every_log_prob_and_the_logged_entropy_are_taken_at_the_sampling_temperature(
    tiny_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    temperatures = []
    for name in ("token_logprobs", "entropy_from_logits"):
        function = getattr(common, name)
        monkeypatch.setattr(
            common, name, lambda logits, *args, f=function: temperatures.append(args[-1]) or f(logits, *args)
        )
    grpo.main(small_args(tiny_checkpoint, tmp_path, temperature=2.0, beta=0.1, num_iterations=2))
    assert len(temperatures) > 4 and set(temperatures) == {2.0}  # reference, old and new log-probs, entropy


def test_logged_learning_rate_warms_up_to_the_peak_then_decays(tiny_checkpoint, tmp_path, monkeypatch, logged_scalars):
    """Factor min((u + 1) / w, (T - u) / (T - w)) for update u, logged at the step that used it: w = 2, T = 4."""
    monkeypatch.chdir(tmp_path)
    grpo.main(small_args(tiny_checkpoint, tmp_path, total_steps=4, warmup_steps=2, learning_rate=1e-3, eval_every=10))
    logged = [logged_scalars[("charts/learning_rate", step)] for step in range(1, 5)]
    assert logged == pytest.approx([0.5e-3, 1e-3, 1e-3, 0.5e-3])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"group_size": 3}, "--group-size 3 must be >= 2 and divide --batch-size 8"),
        ({"micro_batch_size": 3}, "--micro-batch-size 3 must divide"),
        ({"micro_batch_size": 0}, "--micro-batch-size 0 must be >= 1"),
        ({"reward_funcs": ("nope",)}, "unknown"),
        ({"reward_weights": (1.0, 2.0)}, "--reward-weights"),
    ],
)
def test_bad_flags_fail_early(tiny_checkpoint, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        grpo.main(small_args(tiny_checkpoint, tmp_path, **overrides))


# ----------------------------------------------------------------------------- reliability: bad input, the clear error
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eval_every": 0}, "--eval-every 0 must be >= 1"),
        ({"batch_size": 0}, "--batch-size 0 must be >= 1"),
        ({"total_steps": 0}, "--total-steps 0 must be >= 1"),
        ({"num_iterations": 0}, "--num-iterations 0 must be >= 1"),
        ({"max_completion_length": 0}, "--max-completion-length 0 must be >= 1"),
        ({"save_every": -1}, "--save-every -1 must be >= 0"),
        ({"keep_checkpoints": 0}, "--keep-checkpoints 0 must be >= 1"),
        ({"temperature": 0.0}, "--temperature 0.0 must be > 0"),
    ],
)
def test_missing_checks_fail_before_anything_is_written(tiny_checkpoint, tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        grpo.main(small_args(tiny_checkpoint, tmp_path, **overrides))
    assert sorted(path.name for path in tmp_path.iterdir()) == [], "no output folder, no empty run folder"


def test_digits_0_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--digits 0 must be >= 1"):
        grpo.main(small_args(tiny_checkpoint, tmp_path, digits=0))


def test_float16_on_the_cpu_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--dtype float16 does not train correctly on the CPU"):
        grpo.main(small_args(tiny_checkpoint, tmp_path, device="cpu", dtype="float16"))
    assert not (tmp_path / "runs").exists()


def test_an_output_folder_of_a_users_files_is_refused_and_kept_unless_overwrite_is_asked(
    tiny_checkpoint, tmp_path, monkeypatch, users_file, refused_keeping
):
    monkeypatch.chdir(tmp_path)
    notes = users_file(tmp_path / "out" / "notes.txt")
    with refused_keeping(notes, "holds files not written here .*'notes.txt'.*--overwrite-output-dir"):
        grpo.main(small_args(tiny_checkpoint, tmp_path, total_steps=1))
    assert not (tmp_path / "runs").exists()
    grpo.main(small_args(tiny_checkpoint, tmp_path, total_steps=1, overwrite_output_dir=True))
    assert (tmp_path / "out" / "config.json").is_file() and notes.read_text() == "mine"
    a_file = users_file(tmp_path / "a_file")
    with refused_keeping(a_file, "is a file, not a folder"):
        grpo.main(small_args(tiny_checkpoint, tmp_path, output_dir=str(a_file)))


def test_a_reward_model_without_a_trained_score_head_or_with_two_labels_is_an_error(
    tiny_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="has no trained 'score' head: it is not a reward model"):
        grpo.main(small_args(tiny_checkpoint, tmp_path, reward_model=tiny_checkpoint))
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=2)
    config.pad_token_id = tokenizer.pad_token_id
    common.save_model(GPT2ForSequenceClassification(config), tokenizer, str(tmp_path / "two_labels"))
    with pytest.raises(ValueError, match="has 2 labels, not 1"):
        grpo.main(small_args(tiny_checkpoint, tmp_path, reward_model=str(tmp_path / "two_labels")))


def write_prompts(path, prompts) -> str:
    path.write_text("\n".join(json.dumps({"prompt": prompt, "answer": "1"}) for prompt in prompts))
    return str(path)


def test_too_few_prompts_for_one_batch_is_an_error_with_the_counts(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_prompts(tmp_path / "data.jsonl", [f"{i}+1=" for i in range(10)])  # one held out, 9 to train on
    with pytest.raises(
        ValueError, match=r"has 9 training prompts, one step needs 16 \(--batch-size 64 / --group-size 4"
    ):
        grpo.main(small_args(tiny_checkpoint, tmp_path, dataset=data, batch_size=64))


def test_prompts_too_long_for_the_positions_or_empty_are_dropped_and_counted(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    """The tiny model has 64 positions: the default completion length on a file is 32, so longer prompts go."""
    monkeypatch.chdir(tmp_path)
    prompts = [f"{i}+1=" for i in range(20)] + ["9" * 40 + "+1="] * 5 + [""] * 5
    args = small_args(tiny_checkpoint, tmp_path, dataset=write_prompts(tmp_path / "data.jsonl", prompts))
    rollouts, policy_update = [], grpo.policy_update
    monkeypatch.setattr(grpo, "policy_update", lambda *args: rollouts.append(args[4]) or policy_update(*args))
    grpo.main(args)
    assert args.max_completion_length == 32
    assert "training prompts: dropped 10 of 27 prompts, empty or longer than 32 tokens" in capsys.readouterr().out
    assert all(rollout["input_ids"].size(1) <= 64 for rollout in rollouts)
    with pytest.raises(ValueError, match="--max-completion-length 64 fills the model's 64 positions"):
        grpo.main(small_args(tiny_checkpoint, tmp_path, max_completion_length=64))
    with pytest.raises(ValueError, match="no prompt fits"):  # a batch of only empty prompts cannot happen
        grpo.main(small_args(tiny_checkpoint, tmp_path, dataset=write_prompts(tmp_path / "empty.jsonl", [""] * 20)))


def test_reward_functions_get_a_field_only_some_rows_have_as_none_where_missing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} | ({"hint": "odd"} if i % 2 else {}) for i in range(20)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    hints = []
    monkeypatch.setitem(
        tasks.REWARD_FUNCTIONS,
        "hinted",
        lambda prompts, completions, hint, **fields: hints.extend(hint) or [0.0] * len(completions),
    )
    # 18 training rows (2 held out), every one of them in the one batch of 72 completions
    overrides = dict(dataset=str(tmp_path / "data.jsonl"), reward_funcs=("hinted",), batch_size=72, total_steps=1)
    grpo.main(small_args(tiny_checkpoint, tmp_path, **overrides, max_completion_length=2))
    assert len(hints) == 72 and set(hints) == {None, "odd"}


def test_eval_dataset_is_what_held_out_accuracy_is_measured_on(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluated, evaluate_accuracy = [], common.evaluate_accuracy
    monkeypatch.setattr(
        common,
        "evaluate_accuracy",
        lambda model, tokenizer, rows, *a, **k: (
            evaluated.append(rows) or evaluate_accuracy(model, tokenizer, rows, *a, **k)
        ),
    )
    held_out = write_prompts(tmp_path / "held_out.jsonl", ["1+1=", "2+2=", "3+3="])
    grpo.main(small_args(tiny_checkpoint, tmp_path, total_steps=1, eval_dataset=held_out))
    assert [[row["prompt"] for row in rows] for rows in evaluated] == [["1+1=", "2+2=", "3+3="]] * 2


# ----------------------------------------------------------------------------- reliability: stop and resume
def test_a_run_stopped_by_sigint_and_resumed_is_the_same_run_as_one_uninterrupted(
    tiny_checkpoint, tmp_path, monkeypatch, record_run
):
    """A real SIGINT during step 2 saves checkpoint-2 and stops; --resume auto ends with the same weights and logs
    the same metrics of steps 3-4 as a run that was never stopped."""
    monkeypatch.chdir(tmp_path)
    build_reward_model(tmp_path / "rm", common.load_tokenizer(tiny_checkpoint))  # graded rewards: nonzero advantages
    options = dict(total_steps=4, beta=0.1, num_iterations=2, reward_model=str(tmp_path / "rm"), learning_rate=1e-2)
    # 6 prompts, 2 a step: step 4 draws a new order of them from the data generator, after the resume
    options |= dict(
        dataset=write_prompts(tmp_path / "data.jsonl", [f"{i}+1=" for i in range(6)]), max_completion_length=4
    )
    options |= dict(eval_dataset=write_prompts(tmp_path / "held_out.jsonl", ["1+1=", "2+2="]))
    whole = record_run()
    grpo.main(small_args(tiny_checkpoint, tmp_path, output_dir=str(tmp_path / "whole"), **options))
    record_run(interrupt_at=("charts/reward", 2))
    with pytest.raises(SystemExit, match="stopped by SIGINT after step 2; continue with --resume auto"):
        grpo.main(small_args(tiny_checkpoint, tmp_path, output_dir=str(tmp_path / "stopped"), **options))
    assert [path.name for path in (tmp_path / "stopped").iterdir()] == ["checkpoint-2"]
    resumed = record_run()
    grpo.main(small_args(tiny_checkpoint, tmp_path, output_dir=str(tmp_path / "stopped"), resume="auto", **options))
    later = {key: value for key, value in whole.items() if key[1] > 2 and key[0] != "charts/SPS"}
    assert {key: resumed[key] for key in later} == later and ("losses/kl", 3) in later
    assert ("charts/eval_accuracy", 0) not in resumed  # no evaluation before the first step of a resumed run
    before = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "stopped").state_dict()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert any(not torch.equal(before[name], expected[name]) for name in expected)
