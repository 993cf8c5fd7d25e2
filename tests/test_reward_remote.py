"""`remote` verifiers against a fake user service on 127.0.0.1 that misbehaves on purpose:
every failure is an error or a timeout, never a reward of 0, and the service stays up."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from pydantic import ValidationError
from reward_testkit import FakeUserService, item, running_service

from reward import ConfigurationError, RewardClient, RewardSettings, create_app


@pytest.fixture(scope="module")
def user_service():
    with FakeUserService(hang_s=3.0) as service:
        yield service


def _remote(url: str, **extra: object) -> dict:
    return {"url": url, "timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, **extra}


@pytest.fixture(scope="module")
def url(user_service, monkeypatch_module):
    monkeypatch_module.setenv("FAKE_USER_TOKEN", "secret-token")
    base = user_service.url
    remotes = {
        "ok": _remote(f"{base}/ok/v1/score"),
        "flaky": _remote(f"{base}/flaky/v1/score"),
        "down": _remote(f"{base}/down/v1/score"),
        "hang": _remote(f"{base}/hang/v1/score", timeout_s=0.3, retries=1),
        "hang_long": _remote(f"{base}/hang/v1/score", timeout_s=2.5, retries=0),
        "nonjson": _remote(f"{base}/nonjson/v1/score"),
        "short": _remote(f"{base}/short/v1/score"),
        "bad": _remote(f"{base}/bad/v1/score"),
        "throttled": _remote(f"{base}/throttled/v1/score"),
        "auth": _remote(f"{base}/auth/v1/score", token_env="FAKE_USER_TOKEN"),
        "noauth": _remote(f"{base}/auth/v1/score"),
        "orm": _remote(f"{base}/orm/get_reward", format="openrlhf"),
        "steps": _remote(f"{base}/steps/v1/score"),
        "unreachable": _remote("http://127.0.0.1:9/v1/score", retries=1),
    }
    with running_service(remote_hosts=["127.0.0.1"], remote_verifiers=remotes) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def client(url):
    with RewardClient(url) as c:
        yield c


def _score(client: RewardClient, verifier: str, n: int = 2):
    items = [
        item(f"{verifier}-{i}", f"line one\nanswer {i}", str(i), verifiers=[{"name": verifier}])
        for i in range(n)
    ]
    return client.score(items)


def test_ok_service_gives_rewards_and_steps(client):
    results = _score(client, "ok")
    assert [r.status for r in results] == ["ok", "ok"]
    assert [r.reward for r in results] == [1.0, 1.0]
    assert [(s.end, s.reward) for s in results[0].step_rewards] == [(8, 0.5), (17, 0.5)]


def test_500_then_success_is_retried(client, user_service):
    before = user_service.calls["/flaky/v1/score"]
    results = _score(client, "flaky")
    assert [r.status for r in results] == ["ok", "ok"]
    assert user_service.calls["/flaky/v1/score"] - before == 2


def test_429_is_retried(client):
    assert [r.status for r in _score(client, "throttled")] == ["ok", "ok"]


@pytest.mark.parametrize(
    ("verifier", "status", "message"),
    [
        ("down", "error", "answered 500"),
        ("hang", "timeout", "no answer"),
        ("nonjson", "error", "non-JSON"),
        ("short", "error", "1 result(s) for 2 item(s)"),
        ("noauth", "error", "answered 401"),
        ("unreachable", "error", "cannot reach"),
    ],
)
def test_failures_are_never_zero(client, url, verifier, status, message):
    results = _score(client, verifier)
    for result in results:
        assert result.status == status, result
        assert result.reward is None
        assert message in result.error
    started = time.monotonic()
    assert httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    assert time.monotonic() - started < 2.0  # generous: the test machine may be busy


def test_retries_are_bounded(client, user_service):
    before = user_service.calls["/down/v1/score"]
    _score(client, "down")
    assert user_service.calls["/down/v1/score"] - before == 3  # 1 + retries=2


def test_400_is_not_retried(client, user_service):
    before = user_service.calls["/bad/v1/score"]
    results = _score(client, "bad")
    assert all(r.status == "error" and "answered 400" in r.error for r in results)
    assert user_service.calls["/bad/v1/score"] - before == 1


def test_token_from_environment_is_sent(client):
    assert [r.status for r in _score(client, "auth")] == ["ok", "ok"]


def test_openrlhf_format_service(client):
    items = [
        item("a", "the answer is 12", "12", verifiers=[{"name": "orm"}]),
        item("b", "the answer is 13", "12", verifiers=[{"name": "orm"}]),
    ]
    assert [r.reward for r in client.score(items)] == [1.0, 0.0]


def test_healthz_answers_while_a_remote_call_hangs(client, url):
    done = threading.Event()
    thread = threading.Thread(target=lambda: (_score(client, "hang_long", 1), done.set()))
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    assert time.monotonic() - started < 1.0
    assert not done.is_set()  # the scoring request is still waiting on the user service
    thread.join(10)
    assert done.is_set()


BROKEN = [
    ("nan", "step_rewards.1.reward: Input should be a finite number (got nan)"),
    ("inf", "step_rewards.1.reward: Input should be a finite number (got inf)"),
    ("null", "step_rewards.1.reward: Input should be a valid number (got None)"),
    ("past", "step_rewards.1.end: 12 is past the end of the completion (11 characters)"),
    ("unrewarded", "an 'ok' result needs a finite reward"),
]


def _assert_only_the_broken_items_fail(results) -> None:
    assert results[0].status == "ok" and results[0].reward == 1.0, results[0]
    assert [(s.end, s.reward) for s in results[0].step_rewards] == [(4, 0.5), (11, 0.5)]
    for result, (word, problem) in zip(results[1:], BROKEN, strict=True):
        assert result.status == "error" and result.reward is None, result
        assert "breaks reward protocol v1" in result.error and problem in result.error, word


def _broken_items(**extra: object) -> list[dict]:
    good = item("good", "fine\nanswer", "answer", **extra)
    return [good] + [item(word, f"{word}\nx 1234", "x", **extra) for word, _ in BROKEN]


def test_a_broken_step_fails_its_item_and_keeps_the_rest(client):
    """A remote service's NaN/Inf/null step reward or a step past the completion makes
    that item an error saying which step and why; the batch's other items are scored."""
    _assert_only_the_broken_items_fail(client.score(_broken_items(verifiers=[{"name": "steps"}])))


def test_the_drivers_client_keeps_the_answer_of_a_service_with_broken_steps(user_service):
    """``reward.url`` may name a user's v1 service: the driver's client fails only the
    items whose result is broken, and raises nothing (the run goes on)."""
    with RewardClient(f"{user_service.url}/steps", retries=0) as direct:
        _assert_only_the_broken_items_fail(direct.score(_broken_items(), job_id="j", step=1))


def test_host_outside_allowlist_is_a_configuration_error():
    with pytest.raises(ValidationError, match="not in remote_hosts"):
        RewardSettings(
            remote_hosts=["127.0.0.1"],
            remote_verifiers={"evil": {"url": "http://example.com/v1/score"}},
        )


def test_missing_token_variable_is_a_configuration_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    settings = RewardSettings(
        remote_hosts=["127.0.0.1"],
        remote_verifiers={"x": {"url": "http://127.0.0.1:9", "token_env": "NO_SUCH_TOKEN_VAR"}},
    )
    with pytest.raises(ConfigurationError, match="NO_SUCH_TOKEN_VAR"):
        create_app(settings)
