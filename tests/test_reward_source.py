"""The training run's reward source with the real reward service: a refused probe fails the
run at start, a service that stays away makes items unscorable (never zero, never a crash),
a driver-started service whose actor died is restarted once, and evaluation reports the
eval items it could not score (``eval/unscorable_frac``) beside ``eval/accuracy``."""

from __future__ import annotations

import time

import pytest

from reward.protocol import Item
from services.spec import validate_spec
from services.train.parts import RewardSource, RewardSourceError
from tests.reward_testkit import running_service


def spec(url: str | None, **reward):
    raw = {
        "model": {"path": "m"},
        "data": {"train": "t"},
        "reward": {"url": url, "timeout_s": 5, **reward},
        "train": {"eval_every": 0},
    }
    return validate_spec(raw)


ITEM = Item(id="a/0", prompt="Q: 1+1\nA:\n", completion="\\boxed{2}", reference="2")


def test_a_wrong_token_fails_the_probe_before_the_first_step(monkeypatch):
    monkeypatch.setenv("PROBE_TOKEN", "not-the-token")
    with running_service(token="the-token") as url:
        source = RewardSource(spec(url, token_env="PROBE_TOKEN"))
        try:
            with pytest.raises(RewardSourceError, match=r"refused a probe item.*401"):
                source.probe(ITEM)
        finally:
            source.close()


def test_a_service_that_stays_away_leaves_the_items_unscorable():
    with running_service() as url:
        pass  # the port is closed again
    source = RewardSource(spec(url, token_env=None))
    source.client.backoff_s = 0.01
    try:
        results = source.score([ITEM, ITEM.model_copy(update={"id": "a/1"})], job_id="j", step=1)
    finally:
        source.close()
    assert [r.status for r in results] == ["error", "error"]
    assert all(r.reward is None and "failed after" in r.error for r in results)


def kill(ray, source: RewardSource) -> None:
    """Kill the service's actor and wait until its port is closed."""
    ray.kill(source.actor)
    deadline = time.monotonic() + 60
    while source.client.health() and time.monotonic() < deadline:
        time.sleep(0.1)
    source.client.backoff_s = 0.01


@pytest.mark.ray
def test_a_dead_driver_started_service_is_restarted_once_with_a_fresh_token(ray_session):
    source = RewardSource(spec(None))
    try:
        token = source.client._http.headers["Authorization"]
        assert source.score([ITEM], job_id="j", step=1)[0].reward == 1.0
        kill(ray_session, source)
        results = source.score([ITEM], job_id="j", step=2)
        assert results[0].status == "ok" and results[0].reward == 1.0  # re-scored
        assert source.restarted and source.client._http.headers["Authorization"] != token
        kill(ray_session, source)  # a second death is not restarted: unscorable
        assert source.score([ITEM], job_id="j", step=3)[0].status == "error"
    finally:
        source.close()


class EvalPool:
    """Stands in for the engine pool: each eval question's greedy completion is given."""

    def __init__(self, completions: dict[str, str]) -> None:
        self.completions = completions

    def generate(self, requests, sampling):
        from rollout import RolloutRecord

        return [
            [
                RolloutRecord(
                    r.group_id, 0, [1], [2], [-0.1], self.completions[r.group_id], "stop", 0
                )
            ]
            for r in requests
        ]


def test_eval_items_that_cannot_be_scored_are_counted_apart_from_wrong_ones():
    from services.train.data import Question
    from services.train.evaluation import evaluate
    from services.train.parts import Parts

    questions = [Question("Q: 1+1\nA:\n", reference, i) for i, reference in enumerate("22")]
    questions.append(Question("Q: ?\nA:\n", "\\frac{", 2))  # a reference that does not parse
    pool = EvalPool({"eval-0": "\\boxed{2}", "eval-1": "\\boxed{3}", "eval-2": "\\boxed{1}"})
    with running_service() as url:
        source = RewardSource(spec(url, token_env=None))
        try:
            metrics = evaluate(source.spec, Parts(pool, source), questions, step=0)
        finally:
            source.close()
    assert metrics == {"eval/accuracy": 1 / 3, "eval/unscorable_frac": 1 / 3}
