"""The fast faults of the fault suite (bench/faults.py), and the accounting it counts with.

- ``groups.jsonl`` accounts for every group the sampling pipeline submits for a step,
  once, with its outcome: ``trained``, ``zero_variance``, ``unscorable``,
  ``stale_dropped`` or ``dynamic_dropped`` (stand-in pool and reward: no Ray).
- The run directory cuts ``groups.jsonl`` back to a checkpoint's step, as it does the
  metrics, and drops a torn last line; ``bench.faults.count_groups`` counts groups lost,
  duplicated and unexpected against a baseline.
- A real run (vLLM engine, Ray, learner, and a real reward service over HTTP behind
  ``bench.faults.FaultyRewardProxy``) whose reward service answers 500 on every request
  of step 2 and garbage on step 3: those steps' groups are unscorable and get no update,
  the other steps train, the run finishes, and no group is lost or duplicated.
"""

from __future__ import annotations

import logging

import pytest
from test_train_parts import StandInPool
from test_training_e2e import job

from bench.faults import FaultyRewardProxy, count_groups
from reward.protocol import Result
from services.spec import validate_spec
from services.train.data import DataCursor, Question
from services.train.run import TrainingRun
from services.train.run_dir import RunDirectory
from services.train.sampling import SamplingPipeline
from tests.reward_testkit import running_service


class SplitReward:
    """1.0 for each group's first completion and 0.0 for the others (a learning signal),
    1.0 for all with ``flat``; every item of the steps in ``failing`` fails."""

    name = "the split reward"

    def __init__(self, failing=(), flat=False) -> None:
        self.failing, self.flat = set(failing), flat

    def score(self, items, *, job_id, step):
        if step in self.failing:
            return [Result(id=i.id, status="error", error="500 injected") for i in items]
        first = [self.flat or i.id.endswith("/0") for i in items]
        return [Result(id=i.id, status="ok", reward=float(f)) for i, f in zip(items, first)]


def pipeline(reward: SplitReward, *, mode="sync", max_staleness=1, dynamic=False):
    spec = validate_spec(
        {
            "model": {"path": "m"},
            "data": {"train": "t"},
            "rollout": {"group_size": 2},
            "algorithm": {"dynamic_sampling": dynamic},
            "train": {"steps": 3, "questions_per_step": 2, "mode": mode,
                      "max_staleness": max_staleness, "eval_every": 0},
        }
    )  # fmt: skip
    cursor = DataCursor([Question(f"q{i}", "1", i) for i in range(10)], seed=0)
    pool = StandInPool()
    return SamplingPipeline(spec, pool, reward, cursor), pool


def step_rows(sampling: SamplingPipeline, step: int, version: int) -> list[dict]:
    batch, _ = sampling.next_batch(step, version)
    return batch.with_advantages("outcome", scale="group", tokenizer=None).group_rows(step)


def submitted_for(pool: StandInPool, step: int) -> list[str]:
    return sorted(i for ids in pool.submitted for i in ids if i.startswith(f"s{step}-"))


def test_every_submitted_group_is_recorded_once_with_its_outcome():
    sampling, pool = pipeline(SplitReward(failing={2}))
    rows = {step: step_rows(sampling, step, step - 1) for step in (1, 2)}
    for step, recorded in rows.items():
        assert sorted(r["group_id"] for r in recorded) == submitted_for(pool, step)
        assert {r["step"] for r in recorded} == {step}
    assert [r["outcome"] for r in rows[1]] == ["trained", "trained"]
    assert [r["outcome"] for r in rows[2]] == ["unscorable", "unscorable"]
    # the ids name the step, refill round, position and the question's dataset row
    first = pipeline(SplitReward())[0].cursor.next_batch(2, 1)
    assert [r["group_id"] for r in rows[1]] == [
        f"s1-a0-q{i}-d{q.index}" for i, q in enumerate(first)
    ]


def test_stale_and_dynamically_dropped_groups_are_recorded_as_such():
    lagged, pool = pipeline(SplitReward(), mode="async", max_staleness=0)
    step_rows(lagged, 1, version=0)
    pool.version = 1
    stale = step_rows(lagged, 2, version=1)  # sampled at version 0: one behind
    assert [(r["outcome"], r["weights_version"]) for r in stale] == [("stale_dropped", 0)] * 2
    assert sorted(r["group_id"] for r in stale) == submitted_for(pool, 2)

    flat, pool = pipeline(SplitReward(flat=True), dynamic=True)
    dropped = step_rows(flat, 1, version=0)  # every round is flat: 4 rounds of 2, all dropped
    assert sorted(r["group_id"] for r in dropped) == submitted_for(pool, 1)
    assert len(dropped) == 8 and {r["outcome"] for r in dropped} == {"dynamic_dropped"}
    kept, _ = pipeline(SplitReward(flat=True))
    assert {r["outcome"] for r in step_rows(kept, 1, version=0)} == {"zero_variance"}


def test_resume_cuts_groups_back_to_the_checkpoint_and_a_torn_line_is_dropped(tmp_path, caplog):
    run_dir = RunDirectory(tmp_path)
    rows = [{"step": s, "group_id": f"s{s}-a0-q0-d1", "weights_version": s - 1,
             "outcome": "trained"} for s in (1, 2, 3)]  # fmt: skip
    run_dir.append_groups(rows)
    run_dir.truncate_after(2)
    assert run_dir.read_groups() == rows[:2]
    with open(run_dir.groups_file, "a") as handle:
        handle.write('{"step": 3, "group_')  # a crash while the line was written
    with caplog.at_level(logging.WARNING):
        assert run_dir.read_groups() == rows[:2]
    assert "torn last line" in caplog.text


def test_count_groups_counts_lost_duplicated_and_unexpected_groups():
    def row(step, group, outcome="trained"):
        return {"step": step, "group_id": group, "weights_version": 0, "outcome": outcome}

    baseline = [row(1, "a"), row(1, "b"), row(2, "c"), row(2, "d")]
    observed = [row(1, "a"), row(1, "a"), row(2, "c", "unscorable"), row(2, "d"), row(2, "x")]
    counted = count_groups(baseline, observed)
    assert (counted["lost"], counted["duplicated"], counted["unexpected"]) == (1, 1, 1)
    assert counted["outcomes"] == {"trained": 4, "unscorable": 1}
    assert counted["outcomes_changed"] == 1
    assert count_groups(baseline, observed, steps=[2])["lost"] == 0


@pytest.mark.vllm
@pytest.mark.ray
def test_a_reward_service_failing_one_step_leaves_it_unscorable_and_the_run_goes_on(
    ray_session, tmp_path
):
    faults = {2: "500", 3: "garbage"}
    with running_service() as upstream, FaultyRewardProxy(upstream, faults) as proxy:
        reward = {"url": proxy.url, "token_env": None, "timeout_s": 30}
        raw = job(tmp_path / "run", reward=reward, data={"eval": None}, train={"steps": 4})
        result = TrainingRun(validate_spec(raw)).run()

    assert result.status == "succeeded" and result.steps_done == 4
    assert proxy.answers[(2, "500")] == 4  # the first request and its 3 retries
    assert proxy.answers[(3, "garbage")] == 1  # an invalid answer is not retried
    steps = [r for r in result.metrics if r["step"] > 0]
    assert [r["reward/unscorable_frac"] for r in steps] == [0.0, 1.0, 1.0, 0.0]
    assert [r["weights_version"] for r in steps] == [1, 1, 1, 2]  # no update on 2 and 3
    groups = RunDirectory(result.run_dir).read_groups()
    by_step = {s: [r for r in groups if r["step"] == s] for s in (1, 2, 3, 4)}
    assert all(len(rows) == 4 for rows in by_step.values())  # 4 questions a step
    assert len({(r["step"], r["group_id"]) for r in groups}) == 16  # none twice
    assert {r["outcome"] for r in by_step[2] + by_step[3]} == {"unscorable"}
    assert "unscorable" not in {r["outcome"] for r in by_step[1] + by_step[4]}
