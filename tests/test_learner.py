"""The learner on CPU, without Ray or vLLM: updates, micro-batching, checkpoints, replay.

The replay test is the fast proof of exact resume on the learner side: recorded
rollouts are fed to a learner straight through, and to one that is
checkpointed, thrown away and restored half way; the weights must be identical.
"""

from __future__ import annotations

import pytest
import torch
from learner_testkit import make_learner, recorded_rollouts, weights_digest
from safetensors.torch import load as load_safetensors

from learner import AlgorithmConfig, TrainSample
from learner.batching import collate, split_by_tokens
from services.embedded.tiny_model import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir():
    return str(tiny_model_dir("tiny"))


def test_train_step_changes_every_parameter_and_reports_metrics(model_dir):
    learner = make_learner(model_dir)
    before = {n: t.clone() for n, t in learner.named_weights()}
    metrics = learner.train_step(recorded_rollouts(0, n_steps=1)[0])
    after = dict(learner.named_weights())
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert unchanged == []
    for key in (
        "loss/policy",
        "loss/kl",
        "loss/clip_frac_low",
        "loss/clip_frac_high",
        "train/grad_norm",
        "train/lr",
        "time/logprob_s",
    ):
        assert key in metrics
    assert metrics["loss/ratio_mean"] == pytest.approx(1.0)  # one update: ρ = 1
    assert metrics["loss/kl"] == pytest.approx(0.0, abs=1e-9)  # policy == reference at step 1


def test_micro_batch_split_gives_the_same_gradient_as_one_batch(model_dir):
    batch = recorded_rollouts(1, n_steps=1, batch=12)[0]
    whole = make_learner(model_dir, micro_batch_tokens=100_000)
    split = make_learner(model_dir, micro_batch_tokens=24)
    assert len(split_by_tokens(batch, 24)) > 3
    whole.train_step(batch)
    split.train_step(batch)
    # Gradients, not updated weights: Adam's first step is ~lr·sign(g), which turns
    # float noise on near-zero gradients into visible weight differences.
    pairs = zip(whole.policy.named_parameters(), split.policy.named_parameters())
    for (name, a), (_, b) in pairs:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_several_updates_per_step_move_the_ratio_away_from_one(model_dir):
    learner = make_learner(model_dir, updates_per_step=4)
    metrics = learner.train_step(recorded_rollouts(2, n_steps=1, batch=16)[0])
    assert metrics["loss/ratio_mean"] != pytest.approx(1.0, abs=1e-7)


def test_logprobs_are_of_the_tempered_distribution(model_dir):
    hot = make_learner(model_dir, temperature=0.5)
    cold = make_learner(model_dir, temperature=1.0)
    sample = recorded_rollouts(3, n_steps=1, batch=1)[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([list(sample[0].prompt_token_ids) + list(sample[0].token_ids)])
    logits = model(ids).logits[0, len(sample[0].prompt_token_ids) - 1 : -1]
    tokens = torch.tensor(sample[0].token_ids)
    for learner, temperature in ((hot, 0.5), (cold, 1.0)):
        expected = torch.log_softmax(logits / temperature, -1).gather(1, tokens[:, None])[:, 0]
        got = torch.tensor(learner.compute_logprobs(sample)[0])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_export_is_hf_named_safetensors_with_tied_weights_once(model_dir):
    learner = make_learner(model_dir)
    tensors = load_safetensors(learner.export_safetensors())
    assert "model.embed_tokens.weight" in tensors
    assert "lm_head.weight" not in tensors  # tied to the embedding
    assert all(name.startswith("model.") for name in tensors)


def test_replayed_rollouts_resume_exactly_from_a_checkpoint(model_dir, tmp_path):
    steps = recorded_rollouts(4, n_steps=4)
    straight = make_learner(model_dir, warmup_steps=2)
    straight_losses = [straight.train_step(batch)["loss/policy"] for batch in steps]

    first = make_learner(model_dir, warmup_steps=2)
    losses = [first.train_step(batch)["loss/policy"] for batch in steps[:2]]
    first.save_checkpoint(tmp_path)
    del first
    resumed = make_learner(model_dir, warmup_steps=2)
    resumed.load_checkpoint(tmp_path)
    losses += [resumed.train_step(batch)["loss/policy"] for batch in steps[2:]]

    assert losses == straight_losses
    assert weights_digest(resumed) == weights_digest(straight)


def test_collate_aligns_completion_positions(model_dir):
    sample = TrainSample([5, 6, 7], [8, 9], [0.5, -0.5], [-1.0, -2.0])
    batch = collate([sample], [0], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.completion_positions.tolist() == [[2, 3]]  # logits at 2 predict token 8
    assert batch.advantages.tolist() == [[0.5, -0.5]]


def test_per_token_advantages_must_match_the_completion_length():
    with pytest.raises(ValueError, match="per-token advantages"):
        collate([TrainSample([1], [2, 3], [1.0], None)], [0], pad_id=0)


def test_beta_zero_skips_the_reference_model(model_dir):
    learner = make_learner(model_dir, algorithm=AlgorithmConfig(beta=0.0))
    assert learner.reference is None
    assert learner.train_step(recorded_rollouts(5, n_steps=1)[0])["loss/kl"] == 0.0
