import inspect
import json
import sys

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import common
import ppo
import tasks

FAST = settings(max_examples=60, deadline=None)


def random_batch(seed: int, rows: int, length: int):
    """Random rewards and values and a completion-style mask (real tokens first, at least one per row)."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(rows, length, generator=generator)
    values = torch.randn(rows, length, generator=generator)
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return rewards, values, mask, lengths


batches = st.tuples(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 7))
discounts = st.floats(0.0, 1.0)


# ----------------------------------------------------------------------------- GAE
@FAST
@given(batches, discounts, discounts)
def test_gae_equals_the_direct_sum_of_discounted_td_errors(batch, gamma, lam):
    rewards, values, mask, lengths = random_batch(*batch)
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for row, n in enumerate(lengths.tolist()):
        next_values = [values[row, t + 1].item() if t + 1 < n else 0.0 for t in range(n)]
        deltas = [rewards[row, t].item() + gamma * next_values[t] - values[row, t].item() for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** step * deltas[t + step] for step in range(n - t))
            assert advantages[row, t].item() == pytest.approx(expected, abs=1e-4)
    torch.testing.assert_close(returns, (advantages + values) * mask)


@FAST
@given(batches)
def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value(batch):
    rewards, values, mask, _ = random_batch(*batch)
    advantages, returns = ppo.compute_gae(rewards, values, mask, 1.0, 1.0)
    reward_to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(advantages, (reward_to_go - values) * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns, reward_to_go * mask, atol=1e-5, rtol=1e-5)


@FAST
@given(batches, discounts, discounts, st.integers(0, 10_000))
def test_gae_ignores_everything_outside_the_mask(batch, gamma, lam, noise_seed):
    rewards, values, mask, _ = random_batch(*batch)
    generator = torch.Generator().manual_seed(noise_seed)
    padding = 1 - mask
    noisy_rewards = rewards + padding * torch.randn(rewards.shape, generator=generator) * 100
    noisy_values = values + padding * torch.randn(values.shape, generator=generator) * 100
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
    noisy_advantages, noisy_returns = ppo.compute_gae(noisy_rewards, noisy_values, mask, gamma, lam)
    torch.testing.assert_close(noisy_advantages, advantages)
    torch.testing.assert_close(noisy_returns, returns)
    assert torch.all(advantages[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)


@FAST
@given(batches, st.integers(0, 10_000))
def test_whitening_as_ppo_uses_it(batch, noise_seed):
    """Advantages: masked mean 0, variance 1, padding never moves the statistics. Rewards: unit variance, mean kept."""
    rewards, values, mask, _ = random_batch(*batch)
    assume(mask.sum() >= 2)
    advantages, _ = ppo.compute_gae(rewards, values, mask, 1.0, 0.95)
    whitened = ppo.masked_whiten(advantages, mask)
    assert common.masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-5)
    assume(ppo.masked_var(advantages, mask) > 1e-3)
    assert ppo.masked_var(whitened, mask).item() == pytest.approx(1.0, rel=1e-3)
    garbage = (
        advantages + (1 - mask) * torch.randn(mask.shape, generator=torch.Generator().manual_seed(noise_seed)) * 100
    )
    torch.testing.assert_close(ppo.masked_whiten(garbage, mask), whitened)
    assume(ppo.masked_var(rewards, mask) > 1e-3)
    scaled = ppo.masked_whiten(rewards, mask, shift_mean=False)
    assert common.masked_mean(scaled, mask).item() == pytest.approx(common.masked_mean(rewards, mask).item(), abs=1e-5)
    assert ppo.masked_var(scaled, mask).item() == pytest.approx(1.0, rel=1e-3)


# ----------------------------------------------------------------------------- KL-shaped reward
@FAST
@given(batches, st.floats(0.0, 1.0), st.sampled_from(["k1", "k3"]))
def test_kl_penalized_reward_puts_the_score_on_the_last_real_token(batch, kl_coef, kl_estimator):
    logprobs, ref_logprobs, mask, lengths = random_batch(*batch)
    scores = torch.randn(mask.size(0), generator=torch.Generator().manual_seed(batch[0] + 1))
    rewards, kl = ppo.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator)
    log_ratio = logprobs - ref_logprobs
    expected_kl = log_ratio if kl_estimator == "k1" else torch.exp(-log_ratio) + log_ratio - 1
    torch.testing.assert_close(kl, expected_kl * mask)
    expected = -kl_coef * expected_kl * mask
    expected[torch.arange(mask.size(0)), lengths - 1] += scores
    torch.testing.assert_close(rewards, expected)
    if kl_estimator == "k3":
        assert torch.all(kl >= 0)


def test_kl_penalized_reward_with_equal_policies_is_only_the_score():
    logprobs = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    rewards, kl = ppo.kl_penalized_rewards(torch.tensor([2.0, -3.0]), logprobs, logprobs, mask, 0.1)
    assert torch.equal(rewards, torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, -3.0]])) and torch.all(kl == 0)
    with pytest.raises(ValueError, match="k1 or k3"):
        ppo.kl_penalized_rewards(torch.zeros(2), logprobs, logprobs, mask, 0.1, "k2")


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    assert ppo.adaptive_kl_coef(0.1, kl=12.0, target_kl=6.0, horizon=10_000, num_samples=64) == pytest.approx(
        0.1 * (1 + 0.2 * 64 / 10_000)
    )
    assert ppo.adaptive_kl_coef(0.1, kl=5.0, target_kl=6.0, horizon=10_000, num_samples=64) == pytest.approx(
        0.1 * (1 - 64 / 6 / 10_000 * 1)
    )
    assert ppo.adaptive_kl_coef(0.1, kl=0.0, target_kl=6.0, horizon=100, num_samples=100) == pytest.approx(0.08)


# ----------------------------------------------------------------------------- losses
@FAST
@given(st.integers(0, 10_000), st.floats(0.05, 0.5))
def test_policy_loss_gradient_is_zero_exactly_on_the_clip_mask(seed, clip_range):
    generator = torch.Generator().manual_seed(seed)
    old_logprobs = torch.randn(3, 5, generator=generator)
    logprobs = (old_logprobs + 0.6 * torch.randn(3, 5, generator=generator)).requires_grad_()
    advantages = torch.randn(3, 5, generator=generator)
    mask = torch.ones(3, 5)
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    assume(torch.all((ratio - (1 + clip_range)).abs() > 1e-4) and torch.all((ratio - (1 - clip_range)).abs() > 1e-4))
    loss, metrics = ppo.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)
    loss.backward()
    clipped = ((advantages > 0) & (ratio > 1 + clip_range)) | ((advantages < 0) & (ratio < 1 - clip_range))
    assert torch.all(logprobs.grad[clipped] == 0) and torch.all(logprobs.grad[~clipped] != 0)
    # where it is not clipped the gradient is the policy gradient -A * rho * grad(logp), averaged over tokens
    torch.testing.assert_close(logprobs.grad[~clipped], (-advantages * ratio / mask.sum())[~clipped])
    assert metrics["clipfrac"].item() == pytest.approx(clipped.float().mean().item())
    expected = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_policy_loss_ignores_padding_and_is_the_negative_advantage_on_policy():
    advantages = torch.tensor([[1.0, -2.0, 5.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logprobs = torch.randn(2, 3)
    garbage = logprobs.clone()
    garbage[mask == 0] = 50.0
    loss, metrics = ppo.ppo_policy_loss(logprobs, logprobs, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0) and metrics["approx_kl"].item() == 0
    torch.testing.assert_close(ppo.ppo_policy_loss(garbage, logprobs, advantages, mask, 0.2)[0], loss)


@FAST
@given(st.integers(0, 10_000), st.floats(0.01, 1.0))
def test_value_loss_is_half_the_max_of_clipped_and_unclipped_squares(seed, clip_range_value):
    generator = torch.Generator().manual_seed(seed)
    old_values, returns = torch.randn(2, 6, generator=generator), torch.randn(2, 6, generator=generator)
    values = (old_values + torch.randn(2, 6, generator=generator)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    loss, clipfrac = ppo.ppo_value_loss(values, old_values, returns, mask, clip_range_value)
    v = values.detach()
    clipped_values = torch.minimum(torch.maximum(v, old_values - clip_range_value), old_values + clip_range_value)
    squares = torch.maximum((v - returns) ** 2, (clipped_values - returns) ** 2)
    assert loss.item() == pytest.approx(0.5 * squares[mask == 1].mean().item(), rel=1e-5)
    clipped_wins = ((clipped_values - returns) ** 2 > (v - returns) ** 2) & (mask == 1)
    assert clipfrac.item() == pytest.approx(clipped_wins.sum().item() / mask.sum().item())
    loss.backward()
    # the clipped square wins only when V is outside the clip range, where it has no gradient w.r.t. V
    assert torch.all(values.grad[clipped_wins] == 0) and torch.all(values.grad[mask == 0] == 0)


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny_reward_model(tiny_checkpoint, tmp_path_factory) -> str:
    """A reward_model.py-style checkpoint: GPT2ForSequenceClassification, num_labels=1, pad_token_id, random head."""
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    path = tmp_path_factory.mktemp("reward") / "reward_model"
    common.save_model(model, common.load_tokenizer(tiny_checkpoint), str(path))
    return str(path)


def left_padded_rollout(policy, tokenizer, prompts, max_new_tokens=4, temperature=0.7):
    """Sample completions for left-padded prompts; return what the training loop builds from them."""
    prompt_batch = tokenizer.pad(
        {"input_ids": [common.tokenize_prompt(tokenizer, p) for p in prompts]}, return_tensors="pt"
    )
    output = policy.generate(
        **prompt_batch,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    prompt_length = prompt_batch["input_ids"].size(1)
    completion_ids = output.sequences[:, prompt_length:]
    mask, has_eos = common.completion_mask(completion_ids, tokenizer.eos_token_id)
    attention_mask = torch.cat([prompt_batch["attention_mask"], mask], dim=1)
    return output, prompt_length, completion_ids, mask, has_eos, attention_mask


def test_training_logprobs_and_values_equal_those_at_sampling_time(tiny_checkpoint, tiny_reward_model):
    torch.manual_seed(0)
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    policy = common.load_model(tiny_checkpoint)
    prompts = ["1+2=", "37+45=", "9+99="]
    output, prompt_length, completion_ids, mask, _, attention_mask = left_padded_rollout(policy, tokenizer, prompts)
    with torch.no_grad():
        logits = ppo.completion_logits(policy, output.sequences, attention_mask, prompt_length)
        sampled = common.token_logprobs(torch.stack(output.logits, dim=1), completion_ids, 0.7)
        torch.testing.assert_close(
            common.token_logprobs(logits, completion_ids, 0.7) * mask, sampled * mask, atol=1e-5, rtol=1e-5
        )
        # a row's values in the padded batch equal its values alone, for every real completion token
        value_model = ppo.load_value_model(tiny_reward_model, False, torch.float32)
        torch.nn.init.normal_(value_model.score.weight)
        values = ppo.completion_values(value_model, output.sequences, attention_mask, prompt_length)
        for row in range(len(prompts)):
            real = attention_mask[row].bool()
            alone_ids = output.sequences[row][real].unsqueeze(0)
            alone_prompt = int(attention_mask[row, :prompt_length].sum())
            alone = ppo.completion_values(value_model, alone_ids, torch.ones_like(alone_ids), alone_prompt)
            n = int(mask[row].sum())
            torch.testing.assert_close(values[row, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_completion_values_are_read_at_the_state_before_each_token(tiny_reward_model):
    value_model = ppo.load_value_model(tiny_reward_model, False, torch.float32)
    torch.nn.init.normal_(value_model.score.weight)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 20, 9, 10]])  # prompt of 3 tokens, completions differ at token 0
    with torch.no_grad():
        values = ppo.completion_values(value_model, ids, torch.ones_like(ids), 3)
    assert values.shape == (2, 3)
    # V(s_0) sees only the prompt, so it is the same for both rows; later states see the differing token
    torch.testing.assert_close(values[0, 0], values[1, 0])
    assert torch.all(values[0, 1:] != values[1, 1:])


def test_value_model_starts_at_zero_from_the_reward_model_backbone(tiny_reward_model):
    value_model = ppo.load_value_model(tiny_reward_model, False, torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model)
    ids = torch.tensor([[5, 6, 7, 1]])
    assert torch.all(ppo.completion_values(value_model, ids, torch.ones_like(ids), 1) == 0)
    for (name, value_param), reward_param in zip(
        value_model.base_model.named_parameters(), reward_model.base_model.parameters()
    ):
        assert torch.equal(value_param, reward_param), name
    assert all(module.p == 0 for module in value_model.modules() if isinstance(module, torch.nn.Dropout))


def test_retokenised_reward_model_inputs_score_like_the_policy_ids(tiny_checkpoint, tiny_reward_model):
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    reward_model = common.load_model(tiny_reward_model, AutoModelForSequenceClassification)
    prompts, completion_texts = ["1+2=", "37+45=", "9+99="], ["3", "82x", "108"]
    prompt_batch = tokenizer.pad(
        {"input_ids": [common.tokenize_prompt(tokenizer, p) for p in prompts]}, return_tensors="pt"
    )
    # completions as the policy would sample them: EOS then padding, an EOS-less (truncated) one, then padding after EOS
    completion_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in completion_texts]
    completion_ids = torch.tensor([completion_ids[0] + [1, 0, 0], completion_ids[1] + [5], completion_ids[2] + [1]])
    mask, has_eos = common.completion_mask(completion_ids, tokenizer.eos_token_id)
    assert has_eos.tolist() == [True, False, True]
    sequences = torch.cat([prompt_batch["input_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([prompt_batch["attention_mask"], mask], dim=1)
    completions = common.decode_completions(tokenizer, completion_ids, mask)
    with torch.no_grad():
        same_ids = common.reward_model_scores(reward_model, sequences, attention_mask)
        retokenised = common.score_completions(
            reward_model, tokenizer, prompts, completions, has_eos.tolist(), False, 2
        )
    torch.testing.assert_close(retokenised, same_ids, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- end to end
def tiny_args(tmp_path, policy: str, **overrides) -> ppo.Args:
    defaults = dict(
        model=policy,
        output_dir=str(tmp_path / "ppo"),
        total_steps=2,
        batch_size=8,
        num_minibatches=2,
        num_ppo_epochs=2,
        learning_rate=1e-3,
        eval_every=1,
        eval_size=8,
        device="cpu",
    )
    return ppo.Args(**{**defaults, **overrides})


def changed(model, reference) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def test_end_to_end_with_a_reward_model_updates_policy_and_value(
    tiny_checkpoint, tiny_reward_model, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    policy, value_model = ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_model=tiny_reward_model))
    assert changed(policy, AutoModelForCausalLM.from_pretrained(tiny_checkpoint))
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model)
    assert changed(value_model.base_model, reward_model.base_model) and torch.any(value_model.score.weight != 0)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    assert not changed(saved, policy) and (tmp_path / "runs").is_dir()


def test_lora_uses_the_policy_with_adapters_off_as_reference_and_freezes_both_backbones(
    tiny_checkpoint, tiny_reward_model, tmp_path, monkeypatch, logged_scalars
):
    monkeypatch.chdir(tmp_path)
    loaded = []
    load_model = common.load_model
    monkeypatch.setattr(
        common,
        "load_model",
        lambda path, model_class=None, *a, **k: loaded.append(model_class) or load_model(path, model_class, *a, **k),
    )
    policy, value_model = ppo.main(
        tiny_args(tmp_path, tiny_checkpoint, reward_model=tiny_reward_model, lora_r=4, gradient_checkpointing=True)
    )
    assert loaded.count(AutoModelForCausalLM) == 1, (
        "no reference copy: the reference is the policy with its adapters off"
    )
    # the reference is the starting policy: the KL is exactly 0 before the first update and not after it
    assert logged_scalars[("objective/kl", 1)] == 0 and logged_scalars[("objective/kl", 2)] != 0
    value_trained = {name for name, p in value_model.named_parameters() if p.requires_grad}
    assert value_trained and all("lora_" in name or "score" in name for name in value_trained)
    assert torch.any(value_model.score.weight != 0), "the value head, zero at the start, is trained"
    # the policy is saved with its adapters merged (a plain causal LM): its weights moved, the embeddings (no adapter)
    # did not
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    start = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert changed(saved, start) and torch.equal(saved.transformer.wte.weight, start.transformer.wte.weight)


def test_micro_batches_give_the_updates_and_metrics_of_whole_minibatches(
    tiny_checkpoint, tiny_reward_model, tmp_path, monkeypatch, record_run
):
    """--micro-batch-size 1: every forward pass of the rollout and the update runs row by row; the gradients add up to
    the minibatch's (each micro-batch weighted by its share of the tokens), so training and metrics are unchanged."""
    monkeypatch.chdir(tmp_path)
    runs = []
    for micro_batch_size in (None, 1):
        torch.manual_seed(0)
        logged = record_run()
        policy, value_model = ppo.main(
            tiny_args(tmp_path, tiny_checkpoint, reward_model=tiny_reward_model, micro_batch_size=micro_batch_size)
        )
        runs.append((logged, policy, value_model))
    (whole, whole_policy, whole_value), (micro, micro_policy, micro_value) = runs
    tags = {tag for tag, step in whole if not tag.startswith("charts/")}
    assert {"losses/policy_loss", "losses/value_loss", "policy/ratio_var", "objective/scores"} <= tags
    assert {key: micro[key] for key in whole if key[0] in tags} == pytest.approx(
        {key: whole[key] for key in whole if key[0] in tags}, rel=1e-3, abs=1e-6
    )
    for model, reference in ((micro_policy, whole_policy), (micro_value, whole_value)):
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_a_reward_model_with_another_tokenizer_is_scored_on_its_tokens_and_the_critic_starts_from_the_policy(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    tokenizer = common.load_tokenizer(tiny_checkpoint)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<sep>"]})  # another vocabulary
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1)
    reward_model.resize_token_embeddings(len(tokenizer))
    common.save_model(reward_model, tokenizer, str(tmp_path / "other_reward_model"))
    policy, value_model = ppo.main(
        tiny_args(tmp_path, tiny_checkpoint, reward_model=str(tmp_path / "other_reward_model"))
    )
    # the critic reads the policy's token ids, so it must start from the policy, not from the reward model
    assert f"value model from {tiny_checkpoint}" in capsys.readouterr().out
    assert value_model.get_input_embeddings().weight.size(0) == policy.get_input_embeddings().weight.size(0)


def test_end_to_end_with_the_arithmetic_reward_k3_and_adaptive_kl(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = tiny_args(
        tmp_path, tiny_checkpoint, reward_fn="arithmetic", kl_estimator="k3", target_kl=1.0, whiten_rewards=True
    )
    policy, value_model = ppo.main(args)
    assert changed(policy, AutoModelForCausalLM.from_pretrained(tiny_checkpoint))
    assert torch.any(value_model.score.weight != 0)
    assert (tmp_path / "ppo" / "config.json").is_file()


def test_main_wires_the_rollout_into_the_losses(tiny_checkpoint, tmp_path, monkeypatch, logged_scalars):
    """What main() hands from the rollout to the pure functions: the KL at the sampling temperature, the missing-EOS
    penalty, reward whitening without a mean shift, whitened advantages and the returns of the unwhitened ones."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(
        tasks.REWARD_FUNCTIONS, "arithmetic", lambda prompts, completions, *rest, **fields: [0.0] * len(completions)
    )
    calls = {name: [] for name in ("kl_penalized_rewards", "compute_gae", "ppo_policy_loss", "ppo_value_loss")}

    def recording(function, record):
        def spy(*args, **kwargs):  # the arguments in the order of the signature, however they were passed
            arguments = tuple(inspect.signature(function).bind(*args, **kwargs).arguments.values())
            record.append((arguments, function(*args, **kwargs)))
            return record[-1][1]

        return spy

    for name, record in calls.items():
        monkeypatch.setattr(ppo, name, recording(getattr(ppo, name), record))
    args = tiny_args(
        tmp_path, tiny_checkpoint, reward_fn="arithmetic", whiten_rewards=True, total_steps=1, temperature=0.7
    )
    ppo.main(args)
    # the first rollout's policy is the reference: KL 0 (both at T = 0.7); every score is 0 less the missing-EOS penalty
    assert logged_scalars[("objective/kl", 1)] == pytest.approx(0.0, abs=1e-6)
    eos_fraction = logged_scalars[("charts/eos_fraction", 1)]
    assert logged_scalars[("objective/scores", 1)] == pytest.approx(-args.missing_eos_penalty * (1 - eos_fraction))
    (_, (raw_rewards, _)), ((rewards, _, mask, *_), (_, returns)) = (
        calls["kl_penalized_rewards"][0],
        calls["compute_gae"][0],
    )
    torch.testing.assert_close(
        common.masked_mean(rewards, mask), common.masked_mean(raw_rewards, mask)
    )  # whitened, mean kept
    first_epoch = (
        calls["ppo_policy_loss"][: args.num_minibatches],
        calls["ppo_value_loss"][: args.num_minibatches],
    )  # each row once
    advantages, policy_mask = (torch.cat([arguments[i] for arguments, _ in first_epoch[0]]) for i in (2, 3))
    assert (
        common.masked_mean(advantages, policy_mask).abs() < 1e-5
        and (ppo.masked_var(advantages, policy_mask) - 1).abs() < 1e-3
    )
    value_returns, value_mask = (torch.cat([arguments[i] for arguments, _ in first_epoch[1]]) for i in (2, 3))
    torch.testing.assert_close((value_returns * value_mask).sum(), (returns * mask).sum(), atol=1e-4, rtol=1e-5)


def test_bad_flags_and_paths_are_clear_errors(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--num-minibatches 3 must divide --batch-size 8"):
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, num_minibatches=3))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_model=str(tmp_path / "no_reward_model")))
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1="}\n')
    with pytest.raises(ValueError, match="data.jsonl:1: missing field 'answer'"):
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_fn="arithmetic", dataset=str(data)))
    assert not (tmp_path / "ppo").exists()


# ----------------------------------------------------------------------------- reliability: bad input, the clear error
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, "--batch-size 0 must be >= 1"),
        ({"num_minibatches": 0}, "--num-minibatches 0 must be >= 1"),
        ({"num_ppo_epochs": 0}, "--num-ppo-epochs 0 must be >= 1"),
        ({"eval_every": 0}, "--eval-every 0 must be >= 1"),
        ({"total_steps": 0}, "--total-steps 0 must be >= 1"),
        ({"max_new_tokens": 0}, "--max-new-tokens 0 must be >= 1"),
        ({"micro_batch_size": 0}, "--micro-batch-size 0 must be >= 1"),
        ({"save_every": -1}, "--save-every -1 must be >= 0"),
        ({"keep_checkpoints": 0}, "--keep-checkpoints 0 must be >= 1"),
        ({"temperature": 0.0}, "--temperature 0.0 must be > 0"),
        ({"target_kl": 0.0}, "--target-kl 0.0 must be > 0"),
        ({"reward_fn": "nope"}, "--reward-fn 'nope' is not reward_model or in"),
        ({"digits": 0}, "--digits 0 must be >= 1"),
    ],
)
def test_bad_flags_are_one_line_errors_before_anything_is_loaded_or_written(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no_model")  # loading it would be another error: the flag is checked first
    with pytest.raises(ValueError, match=message) as error:
        ppo.main(tiny_args(tmp_path, missing, reward_model=missing, **overrides))
    assert "\n" not in str(error.value) and list(tmp_path.iterdir()) == []


def test_the_command_line_prints_a_bad_flag_as_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ppo.py", "--batch-size", "0"])
    with pytest.raises(SystemExit, match=r"^error: --batch-size 0 must be >= 1$"):
        common.run(ppo.main, ppo.Args)


def test_float16_on_the_cpu_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--dtype float16 does not train correctly on the CPU"):
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_fn="arithmetic", dtype="float16"))
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_of_a_users_files_is_refused_and_kept_unless_overwrite_is_asked(
    tiny_checkpoint, tmp_path, monkeypatch, users_file, refused_keeping
):
    monkeypatch.chdir(tmp_path)
    notes = users_file(tmp_path / "ppo" / "notes.txt")
    args = dict(reward_fn="arithmetic", total_steps=1)
    with refused_keeping(notes, "holds files not written here .*'notes.txt'.*--overwrite-output-dir"):
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, **args))
    assert not (tmp_path / "runs").exists()
    ppo.main(tiny_args(tmp_path, tiny_checkpoint, **args, overwrite_output_dir=True))
    assert (tmp_path / "ppo" / "config.json").is_file() and notes.read_text() == "mine"
    a_file = users_file(tmp_path / "a_file")
    with refused_keeping(a_file, "is a file, not a folder"):
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, **args, output_dir=str(a_file)))


def test_a_reward_model_without_a_trained_score_head_or_with_two_labels_is_an_error(
    tiny_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="has no trained 'score' head: it is not a reward model"):
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_model=tiny_checkpoint))
    two_labels = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=2)
    common.save_model(two_labels, common.load_tokenizer(tiny_checkpoint), str(tmp_path / "two_labels"))
    with pytest.raises(ValueError, match="has 2 labels, not 1"):
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_model=str(tmp_path / "two_labels")))
    assert not (tmp_path / "ppo").exists() and not (tmp_path / "runs").exists()


def write_rows(path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(path)


def recording_evaluations(monkeypatch) -> list:
    """Replace common.evaluate_accuracy by a wrapper that keeps (rows, max_new_tokens, reward_fn) of each call."""
    calls, evaluate_accuracy = [], common.evaluate_accuracy

    def evaluate(model, tokenizer, rows, max_new_tokens, **kwargs):
        calls.append((rows, max_new_tokens, kwargs.get("reward_fn")))
        return evaluate_accuracy(model, tokenizer, rows, max_new_tokens, **kwargs)

    monkeypatch.setattr(common, "evaluate_accuracy", evaluate)
    return calls


def test_the_math_reward_on_a_prompt_answer_file_evaluates_on_its_held_out_rows(
    tiny_checkpoint, tmp_path, monkeypatch, logged_scalars
):
    """--reward-fn math on a JSONL task: 40 rows, the first 4 held out; the default completion length on a file is
    min(64, positions // 2) = 32 for the tiny model's 64 positions."""
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"What is {i} + 1? ", "answer": str(i + 1)} for i in range(40)]
    evaluations = recording_evaluations(monkeypatch)
    args = dict(reward_fn="math", dataset=write_rows(tmp_path / "qa.jsonl", rows), chat_template=True)
    policy, _ = ppo.main(tiny_args(tmp_path, tiny_checkpoint, **args))
    assert changed(policy, AutoModelForCausalLM.from_pretrained(tiny_checkpoint))
    assert [[row["prompt"] for row in rows] for rows, _, _ in evaluations] == [[row["prompt"] for row in rows[:4]]] * 3
    assert {(length, reward_fn) for _, length, reward_fn in evaluations} == {(32, tasks.math_answer_reward)}
    assert ("charts/eval_accuracy", 2) in logged_scalars and logged_scalars[("charts/completion_length", 1)] <= 32


def test_eval_dataset_is_what_held_out_accuracy_is_measured_on(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluations = recording_evaluations(monkeypatch)
    held_out = write_rows(tmp_path / "held_out.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(3)])
    ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_fn="arithmetic", total_steps=1, eval_dataset=held_out))
    assert [[row["prompt"] for row in rows] for rows, _, _ in evaluations] == [["0+1=", "1+1=", "2+1="]] * 2
    assert {reward_fn for _, _, reward_fn in evaluations} == {tasks.arithmetic_reward}


def test_a_prompt_only_file_with_a_reward_model_trains_on_every_row_without_held_out_accuracy(
    tiny_checkpoint, tiny_reward_model, tmp_path, monkeypatch, logged_scalars
):
    monkeypatch.chdir(tmp_path)
    data = write_rows(tmp_path / "prompts.jsonl", [{"prompt": f"{i}+1="} for i in range(8)])  # exactly one batch
    evaluations = recording_evaluations(monkeypatch)
    ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_model=tiny_reward_model, dataset=data, max_new_tokens=4))
    assert evaluations == [] and ("objective/scores", 2) in logged_scalars
    with pytest.raises(ValueError, match="missing field 'answer'"):  # a rule-based reward needs the answers
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_fn="math", dataset=data))


def test_too_few_prompts_for_one_batch_is_an_error_with_the_counts(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_rows(tmp_path / "data.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(12)])
    with pytest.raises(ValueError, match="data.jsonl has 11 training prompts, one step needs 16"):  # one held out
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_fn="arithmetic", dataset=data, batch_size=16))
    assert not (tmp_path / "ppo").exists() and not (tmp_path / "runs").exists()


def test_prompts_too_long_for_the_positions_or_empty_are_dropped_and_counted(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    """The tiny model has 64 positions and the default completion length on a file is 32: longer prompts go."""
    monkeypatch.chdir(tmp_path)
    prompts = [f"{i}+1=" for i in range(20)] + ["9" * 40 + "+1="] * 5 + [""] * 5  # the first 3 are held out
    data = write_rows(tmp_path / "data.jsonl", [{"prompt": prompt, "answer": "1"} for prompt in prompts])
    rollouts, sample_rollout = [], ppo.sample_rollout
    monkeypatch.setattr(ppo, "sample_rollout", lambda *a: rollouts.append(sample_rollout(*a)) or rollouts[-1])
    ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_fn="arithmetic", dataset=data))
    assert "training prompts: dropped 10 of 27 prompts, empty or longer than 32 tokens" in capsys.readouterr().out
    assert rollouts and all(rollout["sequences"].size(1) <= 64 for rollout in rollouts)
    empty = write_rows(tmp_path / "empty.jsonl", [{"prompt": "", "answer": "1"}] * 20)
    with pytest.raises(ValueError, match="no prompt fits"):  # a batch of only empty prompts cannot happen
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_fn="arithmetic", dataset=empty))
    with pytest.raises(ValueError, match="no prompt fits in 0 tokens"):
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, reward_fn="arithmetic", max_new_tokens=64))


def test_reward_functions_get_a_field_only_some_rows_have_as_none_where_missing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} | ({"hint": "even"} if i % 2 else {}) for i in range(20)]
    hints = []
    monkeypatch.setitem(
        tasks.REWARD_FUNCTIONS,
        "hinted",
        lambda prompts, completions, answer, hint, **fields: hints.extend(hint) or [0.0] * len(completions),
    )
    # 18 training rows (2 held out), all of them in the one batch
    args = dict(reward_fn="hinted", dataset=write_rows(tmp_path / "data.jsonl", rows), batch_size=18, total_steps=1)
    ppo.main(tiny_args(tmp_path, tiny_checkpoint, **args, num_minibatches=1, max_new_tokens=2))
    assert len(hints) == 18 and set(hints) == {None, "even"}


# ----------------------------------------------------------------------------- reliability: stop and resume
def test_a_run_stopped_by_sigint_and_resumed_is_the_same_run_as_one_uninterrupted(
    tiny_checkpoint, tiny_reward_model, tmp_path, monkeypatch, record_run
):
    """A real SIGINT during step 2 saves checkpoint-2 (policy and value model) and stops; --resume auto ends with the
    same weights of both and logs the same metrics of steps 3-4 (the adaptive KL coefficient too) as a run that was
    never stopped."""
    monkeypatch.chdir(tmp_path)
    # 12 prompts, 8 a step: the second batch takes the rest of the first order and the start of a new one
    data = write_rows(tmp_path / "prompts.jsonl", [{"prompt": f"{i}+{i}="} for i in range(12)])
    options = dict(reward_model=tiny_reward_model, dataset=data, total_steps=4, target_kl=0.01, max_new_tokens=4)
    whole = record_run()
    whole_policy, whole_value = ppo.main(
        tiny_args(tmp_path, tiny_checkpoint, output_dir=str(tmp_path / "whole"), **options)
    )
    record_run(interrupt_at=("objective/scores", 2))
    with pytest.raises(SystemExit, match="stopped by SIGINT after step 2; continue with --resume auto"):
        ppo.main(tiny_args(tmp_path, tiny_checkpoint, output_dir=str(tmp_path / "stopped"), **options))
    assert [path.name for path in (tmp_path / "stopped").iterdir()] == ["checkpoint-2"]
    resumed = record_run()
    policy, value_model = ppo.main(
        tiny_args(tmp_path, tiny_checkpoint, output_dir=str(tmp_path / "stopped"), resume="auto", **options)
    )
    later = {key: value for key, value in whole.items() if key[1] > 2 and key[0] != "charts/SPS"}
    assert {key: resumed[key] for key in later} == later and ("losses/value_loss", 4) in later
    assert whole[("objective/kl_coef", 4)] != whole[("objective/kl_coef", 1)]  # the controller's state was resumed
    assert ("objective/scores", 2) not in resumed
    for model, expected in ((policy, whole_policy), (value_model, whole_value)):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected.parameters()))
    assert changed(whole_policy, AutoModelForCausalLM.from_pretrained(tiny_checkpoint))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 4), length=st.integers(2, 8), scale=st.floats(0.1, 100.0))
@example(seed=10000, rows=1, length=2, scale=0.25)  # a variance of 1e-4, where eps = 1e-8 shows
def test_masked_whiten(seed, rows, length, scale):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, length, generator=generator, dtype=torch.float64) * scale + 3.0
    mask = (torch.rand(rows, length, generator=generator) < 0.7).double()
    mask[0, :2] = 1.0  # at least two entries, so the variance is defined
    whitened = ppo.masked_whiten(values, mask)
    assert common.masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-6)
    variance = ppo.masked_var(values, mask).item()  # whitening divides by sqrt(var + eps): variance var / (var + eps)
    assert ppo.masked_var(whitened, mask).item() == pytest.approx(variance / (variance + 1e-8), rel=1e-9)
    assert torch.all(whitened[mask == 0] == 0)
    unshifted = ppo.masked_whiten(values, mask, shift_mean=False)
    assert common.masked_mean(unshifted, mask).item() == pytest.approx(
        common.masked_mean(values, mask).item(), rel=1e-6
    )
