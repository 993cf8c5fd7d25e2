"""A learner as one rank of N (FSDP2 over gloo on CPU), against the single-process learner.

Two ranks run in spawned processes (``learner_testkit.run_ranks``) on the tiny
model; the single-process learner runs here. The same recorded batches go
through both: the updates must agree (gradients summed over ranks equal the
single-process gradient), each rank must hold about half the state,
checkpoints must move between 2 ranks and 1 in both directions, and a rank
that dies must fail its peer's step instead of hanging it.
"""

from __future__ import annotations

import pytest
import torch
from learner_testkit import (
    free_port,
    make_learner,
    rank_fails,
    rank_resume,
    rank_train,
    recorded_rollouts,
    resume_and_step,
    run_ranks,
    train_and_checkpoint,
)

from learner.batching import plan_micro_batches
from learner.distributed import DistContext, split_by_rank
from services.embedded.tiny_model import tiny_model_dir

# The second config splits each step into two mini-batches (ρ ≠ 1, clipping live).
CONFIGS = [{"micro_batch_tokens": 24}, {"updates_per_step": 2, "micro_batch_tokens": 48}]
LOSS_METRICS = ("loss/policy", "loss/kl", "loss/ratio_mean", "loss/clip_frac_low")
WEIGHT_TOLERANCE = 0.05 * 1e-3  # 5% of make_learner's lr
"""Adam moves each weight by about lr whatever its gradient's size, so where a gradient
is a near-cancelling sum, the ranks' other summation order moves the weight by a visible
fraction of lr (1.4% seen on an AVX-512 machine); a wrong gradient moves it by ~lr."""


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(tiny_model_dir("tiny"))


@pytest.fixture(scope="module")
def batches() -> list:
    steps = recorded_rollouts(11, n_steps=3, batch=8)
    steps[2] = steps[2][:1]  # one sample for two ranks: rank 1 runs placeholders only
    return steps


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("learner_group")


@pytest.fixture(scope="module")
def single(model_dir, batches, workdir) -> list[dict]:
    """One process, each config: per-step metrics, weights, gradients; checkpoint after step 1."""
    runs = []
    for index, overrides in enumerate(CONFIGS):
        learner = make_learner(model_dir, **overrides)
        runs.append(train_and_checkpoint(learner, batches, workdir / f"single_ckpt{index}"))
    return runs


@pytest.fixture(scope="module")
def group(model_dir, batches, workdir, single) -> list[dict]:
    """The same on two ranks (rank 0's results; rank 1's memory as ``memory_rank1``)."""
    out = workdir / "group"
    out.mkdir()
    ranks = run_ranks(rank_train, 2, out, model_dir, batches, CONFIGS, [free_port()])
    runs = ranks[0]["runs"]
    for run, other in zip(runs, ranks[1]["runs"]):
        run["memory_rank1"] = other["memory"]
        run["safetensors_rank1"] = other["safetensors"]
        assert other["weights"] == [{}] * len(batches)  # only rank 0 keeps gathered weights
    return runs


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_two_ranks_update_like_one(single, group, config):
    one, two = single[config], group[config]
    for step, (w1, w2) in enumerate(zip(one["weights"], two["weights"])):
        assert _max_diff(w1, w2) <= WEIGHT_TOLERANCE, f"step {step + 1}"
        for name, grad in one["grads"][step].items():
            torch.testing.assert_close(two["grads"][step][name], grad, rtol=1e-4, atol=1e-6)
    for m1, m2 in zip(one["metrics"], two["metrics"]):
        for key in (*LOSS_METRICS, "train/grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
        assert m2["train/lr"] == m1["train/lr"]


def test_two_ranks_export_like_one(single, group, workdir):
    from safetensors.torch import load as load_safetensors
    from transformers import AutoModelForCausalLM

    one, two = single[0], group[0]
    assert two["safetensors_rank1"] is None  # only rank 0 gets the payload
    exported = load_safetensors(two["safetensors"])
    assert exported.keys() == load_safetensors(one["safetensors"]).keys()
    assert _same(exported, two["weights"][-1])
    for lp1, lp2 in zip(one["logprobs"], two["logprobs"]):
        assert lp2 == pytest.approx(lp1, abs=2e-5)
    final = AutoModelForCausalLM.from_pretrained(workdir / "group" / "ckpt0_final")
    assert final.config.architectures == ["Qwen2ForCausalLM"]
    saved = {name: t for name, t in final.state_dict().items() if name in exported}
    assert _same(saved, exported)


def test_each_of_two_ranks_holds_about_half_the_state(single, group):
    def trained_state(memory: dict[str, int]) -> int:
        return memory["parameters"] + memory["gradients"] + memory["optimizer"]

    whole = trained_state(single[0]["memory"])
    for memory in (group[0]["memory"], group[0]["memory_rank1"]):
        assert trained_state(memory) <= 0.55 * whole
        assert memory["reference"] <= 0.55 * single[0]["memory"]["reference"]


@pytest.fixture(scope="module")
def resumed(model_dir, batches, workdir, group) -> list[dict]:
    """Two fresh ranks load the 2-rank checkpoint, then the 1-rank one, stepping after each."""
    out = workdir / "resumed"
    out.mkdir()
    checkpoints = [str(workdir / "group" / "ckpt0"), str(workdir / "single_ckpt0")]
    ranks = run_ranks(rank_resume, 2, out, model_dir, CONFIGS[0], checkpoints, batches[1])
    return ranks[0]["resumed"]


def test_two_rank_checkpoint_resumes_two_ranks_exactly(group, resumed):
    from_two = resumed[0]
    assert _same(from_two["loaded"], group[0]["weights"][0])
    assert _same(from_two["after"], group[0]["weights"][1])
    assert _untimed(from_two["metrics"]) == _untimed(group[0]["metrics"][1])


def test_one_rank_checkpoint_loads_into_two_ranks(single, resumed):
    from_one = resumed[1]
    assert _same(from_one["loaded"], single[0]["weights"][0])
    assert _max_diff(from_one["after"], single[0]["weights"][1]) <= 1e-5


def test_two_rank_checkpoint_loads_into_one(model_dir, batches, workdir, group, single):
    learner = make_learner(model_dir, **CONFIGS[0])
    from_two = resume_and_step(learner, str(workdir / "group" / "ckpt0"), batches[1])
    assert _same(from_two["loaded"], group[0]["weights"][0])
    assert _max_diff(from_two["after"], group[0]["weights"][1]) <= 1e-5
    assert learner.steps_done == 2


def _untimed(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if not key.startswith("time/")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("how", ["exits", "stalls"])
def test_a_failed_rank_fails_the_survivors_step_within_the_timeout(
    model_dir, batches, tmp_path, how
):
    timeout_s = 6.0
    batch = batches[0]
    survivor, _ = run_ranks(rank_fails, 2, tmp_path, model_dir, batch, how, timeout_s=timeout_s)
    assert survivor["error"] is not None
    assert survivor["seconds"] < timeout_s + 5.0


def test_split_by_rank_balances_tokens_deterministically():
    lengths = [10, 3, 7, 7, 1, 12]
    shards = split_by_rank(lengths, 2)
    assert shards == split_by_rank(lengths, 2)
    assert sorted(i for shard in shards for i in shard) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in shard) for shard in shards]
    assert abs(loads[0] - loads[1]) <= max(lengths)
    assert all(shard == sorted(shard) for shard in shards)
    assert split_by_rank(lengths, 1) == [list(range(len(lengths)))]
    assert split_by_rank([5], 3) == [[0], [], []]


def test_every_rank_plans_as_many_micro_batches_as_the_busiest(batches):
    samples = batches[0]
    shards = [list(range(len(samples))), []]
    plans = [plan_micro_batches(samples, shards, rank, 24) for rank in (0, 1)]
    assert len(plans[0]) == len(plans[1]) > 1
    assert set(plans[1]) == {None}
    single = plan_micro_batches(samples, [list(range(len(samples)))], 0, 24)
    assert single == plans[0]


def test_one_rank_is_the_plain_single_process_learner(model_dir):
    learner = make_learner(model_dir)
    assert learner.context == DistContext()
    assert not torch.distributed.is_initialized()
    assert all(type(p) is torch.nn.Parameter for p in learner.policy.parameters())
