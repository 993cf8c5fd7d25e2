"""Length-bucketed micro-batches: the plan's invariants, and that bucketing changes no result.

``split_by_tokens`` sorts the samples by length and picks, by dynamic
programming, the split into runs of least padded tokens plus a per-pass cost;
these tests check it against brute force, its budgets and its cover of the
batch, the N-rank plan, and that a learner trained on the bucketed plan gets
the loss, gradients and log-probabilities of one trained in batch order.
"""

from __future__ import annotations

import itertools
import random
import time

import pytest
import torch
from learner_testkit import make_learner, recorded_rollouts

import learner.learner as learner_module
from learner import TrainSample
from learner.batching import plan_micro_batches, split_by_tokens
from services.embedded.tiny_model import tiny_model_dir


def _samples(lengths: list[int]) -> list[TrainSample]:
    return [TrainSample([1] * 2, [1] * (n - 2), 0.0) for n in lengths]


def _padded(samples: list[TrainSample], group: list[int]) -> int:
    return len(group) * max(samples[i].length for i in group)


def _cost(samples: list[TrainSample], groups: list[list[int]], pass_cost: int) -> int:
    return sum(_padded(samples, g) + pass_cost for g in groups)


def _random_lengths(seed: int, n: int, longest: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, longest) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_every_index_once_and_budgets_hold(seed):
    samples = _samples([*_random_lengths(seed, 50), 90])  # 90: over the budget alone
    groups = split_by_tokens(samples, 80, pass_cost=16)
    assert sorted(i for g in groups for i in g) == list(range(len(samples)))
    assert all(_padded(samples, g) <= 80 or len(g) == 1 for g in groups)
    longest = [max(samples[i].length for i in g) for g in groups]
    shortest = [min(samples[i].length for i in g) for g in groups]
    assert all(a <= b for a, b in zip(longest, shortest[1:]))  # runs of the sorted lengths


@pytest.mark.parametrize("seed", range(20))
def test_the_split_is_the_cheapest_run_split_of_the_sorted_lengths(seed):
    samples = _samples(_random_lengths(seed, 10, longest=14 if seed % 2 else 40))
    order = sorted(range(len(samples)), key=lambda i: (samples[i].length, i))
    best = None
    for cuts in itertools.product((False, True), repeat=len(order) - 1):
        groups, current = [], [order[0]]
        for cut, index in zip(cuts, order[1:]):
            if cut:
                groups.append(current)
                current = []
            current.append(index)
        groups.append(current)
        if all(_padded(samples, g) <= 100 or len(g) == 1 for g in groups):
            cost = _cost(samples, groups, 8)
            best = cost if best is None else min(best, cost)
    assert _cost(samples, split_by_tokens(samples, 100, pass_cost=8), 8) == best


def test_a_large_batch_is_planned_quickly():
    samples = _samples(_random_lengths(3, 20_000, longest=1000))
    started = time.perf_counter()
    split_by_tokens(samples, 2**24)
    assert time.perf_counter() - started < 5.0


def test_pass_cost_trades_padding_for_passes():
    samples = _samples([5, 9, 5, 9, 7])
    assert split_by_tokens(samples, 1000, pass_cost=0) == [[0, 2], [4], [1, 3]]  # no padding
    assert split_by_tokens(samples, 1000, pass_cost=1000) == [[0, 2, 4, 1, 3]]  # one pass


def test_every_rank_plans_as_many_bucketed_micro_batches_as_the_busiest():
    samples = _samples(_random_lengths(7, 30))
    shards = [list(range(0, 30, 3)), [i for i in range(30) if i % 3]]
    plans = [plan_micro_batches(samples, shards, rank, 60) for rank in (0, 1)]
    assert len(plans[0]) == len(plans[1])
    for shard, plan in zip(shards, plans):
        real = [indices for indices in plan if indices is not None]
        assert plan == real + [None] * (len(plan) - len(real))  # placeholders last
        assert sorted(i for indices in real for i in indices) == shard
    assert None in plans[0]


@pytest.fixture(scope="module")
def model_dir():
    return str(tiny_model_dir("tiny"))


def _in_batch_order(samples, shards, rank, max_tokens):
    """The whole shard as one micro-batch, rows in batch order (no sorting)."""
    return [list(shards[rank])]


def _train(model_dir: str, batch: list[TrainSample], **overrides):
    """The metrics and gradients of one step."""
    learner = make_learner(model_dir, **overrides)
    metrics = learner.train_step(batch)
    return metrics, {n: p.grad.clone() for n, p in learner.policy.named_parameters()}


def test_bucketed_plan_gives_the_loss_and_gradients_of_batch_order(model_dir, monkeypatch):
    batch = recorded_rollouts(11, n_steps=1, batch=12)[0]
    bucketed_metrics, bucketed_grads = _train(model_dir, batch, micro_batch_tokens=24)
    assert len(split_by_tokens(batch, 24)) > 3
    monkeypatch.setattr(learner_module, "plan", _in_batch_order)
    ordered_metrics, ordered_grads = _train(model_dir, batch, micro_batch_tokens=24)
    for key in ("loss/policy", "loss/kl", "loss/ratio_mean"):
        assert bucketed_metrics[key] == pytest.approx(ordered_metrics[key], rel=1e-5, abs=1e-7)
    for name, grad in ordered_grads.items():
        torch.testing.assert_close(bucketed_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_log_probabilities_land_on_their_own_samples(model_dir):
    batch = recorded_rollouts(12, n_steps=1, batch=10)[0]
    bucketed = make_learner(model_dir, micro_batch_tokens=24).compute_logprobs(batch)
    one_by_one = make_learner(model_dir, micro_batch_tokens=24)
    for sample, row in zip(batch, bucketed):
        expected = one_by_one.compute_logprobs([sample])[0]
        assert len(row) == len(sample.token_ids)
        torch.testing.assert_close(torch.tensor(row), torch.tensor(expected), rtol=0, atol=1e-5)


def test_logits_kept_only_from_the_first_completion_position_give_the_full_log_probs(model_dir):
    """Prompts of different lengths in one micro-batch: ``token_logprobs`` (logits from
    ``logits_start`` on) against log-softmax over every position's logits, by hand."""
    from transformers import AutoModelForCausalLM

    from learner.batching import collate
    from learner.models import token_logprobs

    samples = [
        TrainSample([5, 6, 7, 8, 9], [10, 11], 0.0),
        TrainSample([5, 6], [12, 13, 14, 15], 0.0),
        TrainSample([5, 6, 7], [], 0.0),  # no completion: no say in where logits start
    ]
    batch = collate(samples, [0, 1, 2], pad_id=0)
    assert batch.logits_start == 1  # the 2-token prompt's last position
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        kept = token_logprobs(model, batch, temperature=0.7, autocast_dtype=None)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    full = torch.log_softmax(logits.float() / 0.7, dim=-1)
    for row, sample in enumerate(samples):
        prompt = len(sample.prompt_token_ids)
        expected = [full[row, prompt - 1 + k, token] for k, token in enumerate(sample.token_ids)]
        got = kept[row, : len(sample.token_ids)]
        torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)
