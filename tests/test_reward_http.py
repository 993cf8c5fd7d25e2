"""The reward service's HTTP surface: auth, limits, malformed requests, the OpenRLHF
endpoint, custom verifiers by import path, the client, and TCP_NODELAY."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import reward_custom_verifiers
from reward_testkit import item, running_service

from httpedge import listen_socket
from reward import ConfigurationError, RewardClient, RewardClientError, RewardSettings, create_app
from reward.client import rewards_and_steps

TOKEN = "test-token-123"
MAX_ITEMS = 8
MAX_BYTES = 4096
CUSTOM = reward_custom_verifiers.__name__


@pytest.fixture(scope="module")
def url():
    settings = {
        "token": TOKEN,
        "max_items": MAX_ITEMS,
        "max_request_bytes": MAX_BYTES,
        "item_timeout_s": 5.0,
        "custom_verifiers": {
            "mentions": f"{CUSTOM}:mentions_reference",
            "too_few": f"{CUSTOM}:too_few",
            "raises": f"{CUSTOM}:raises",
        },
    }
    with running_service(**settings) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


@pytest.fixture(scope="module")
def client(url):
    with RewardClient(url, TOKEN, max_batch=3, retries=1, backoff_s=0.01) as c:
        yield c


# --- auth ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer nope"}, "wrong bearer token"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/score"), ("GET", "/v1/verifiers"), ("POST", "/get_reward"), ("GET", "/metrics")],
)
def test_token_required(url, headers, reason, method, path):
    body = {"items": [item("a", "\\boxed{1}", "1")]} if method == "POST" else None
    response = httpx.request(method, f"{url}{path}", json=body, headers=headers)
    assert response.status_code == 401
    assert reason in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_healthz_needs_no_token(url):
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}


def test_docs_hidden_when_token_set(url):
    assert httpx.get(f"{url}/openapi.json").status_code == 404


# --- malformed requests ------------------------------------------------------------------


def test_unknown_verifier_lists_valid_names(http):
    response = http.post(
        "/v1/score", json={"items": [item("a", "x", "1", verifiers=[{"name": "nope"}])]}
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert (
        "unknown verifier 'nope'" in detail
        and "'math'" in detail
        and "'arithmetic_steps'" in detail
    )


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"items": [{"id": "a", "prompt": "p"}]}, "items.0.completion: Field required"),
        ({}, "body.items: Field required"),
        ({"items": [item("a", "x", refrence="1")]}, "items.0.refrence: Extra inputs"),
        ({"items": [item("a", "x", verifiers=[])]}, "items.0.verifiers"),
        ({"items": [], "step": -1}, "step"),
    ],
)
def test_malformed_bodies_name_the_field(http, body, names):
    response = http.post("/v1/score", json=body)
    assert response.status_code == 422
    assert names in response.json()["detail"]


def test_invalid_json(http):
    response = http.post(
        "/v1/score", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


def test_too_many_items_names_the_limit(http):
    items = [item(str(i), "1", "1", verifiers=[{"name": "exact"}]) for i in range(MAX_ITEMS + 1)]
    response = http.post("/v1/score", json={"items": items})
    assert response.status_code == 413
    assert f"max_items={MAX_ITEMS}" in response.json()["detail"]


def test_oversized_body_by_content_length(http):
    response = http.post("/v1/score", json={"items": [item("a", "x" * 2 * MAX_BYTES, "1")]})
    assert response.status_code == 413
    assert f"max_request_bytes={MAX_BYTES}" in response.json()["detail"]


def test_oversized_body_without_content_length(http):
    data = json.dumps({"items": [item("a", "x" * 2 * MAX_BYTES, "1")]}).encode()
    chunks = (data[i : i + 1024] for i in range(0, len(data), 1024))
    response = http.post("/v1/score", content=chunks, headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert "max_request_bytes" in response.json()["detail"]


def test_empty_batch(http):
    response = http.post("/v1/score", json={"items": []})
    assert response.status_code == 200 and response.json() == {"results": []}


# --- the OpenRLHF endpoint ---------------------------------------------------------------


def test_openrlhf_round_trip(url):
    # A client written to OpenRLHF's remote reward-model format: POST query/prompts/labels,
    # read `rewards`.
    prompts = ["Q: 1+1\nA:", "Q: half\nA:", "Q: 2*3\nA:"]
    responses = [" \\boxed{2}", " it is 0.5", " 7"]
    data = {
        "query": [p + r for p, r in zip(prompts, responses, strict=True)],
        "prompts": prompts,
        "labels": ["2", "1/2", "6"],
    }
    response = httpx.post(
        f"{url}/get_reward", json=data, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rewards"] == [1.0, 1.0, 0.0]
    assert body["scores"] == body["rewards"]
    assert body["extra_logs"] == {"math": [1.0, 1.0, 0.0]}


def test_openrlhf_failed_items_give_502_with_indices(http):
    data = {
        "query": ["P1 \\boxed{2}", "other text", "P3 \\boxed{3}", "P4 \\boxed{4}"],
        "prompts": ["P1", "P2", "P3", "P4"],
        "labels": ["2", "2", "}{", "4"],
    }
    response = http.post("/get_reward", json=data)
    assert response.status_code == 502
    body = response.json()
    assert body["failed"] == [1, 2]
    assert "does not start with its prompt" in body["errors"][0]["error"]
    assert "rewards" not in body


def test_openrlhf_length_mismatch(http):
    response = http.post("/get_reward", json={"query": ["a", "b"], "prompts": ["a"]})
    assert response.status_code == 422
    assert "'prompts' has 1 entries but 'query' has 2" in response.json()["detail"]


# --- custom verifiers by import path -----------------------------------------------------


def test_custom_verifier_gets_reference_and_metadata(client):
    items = [
        item(
            "a", "the answer is 12", "12", verifiers=[{"name": "mentions"}], metadata={"scale": 0.5}
        ),
        item("b", "the answer is 13", "12", verifiers=[{"name": "mentions"}]),
        item("c", "no reference here", None, verifiers=[{"name": "mentions"}]),
    ]
    results = client.score(items)
    assert [r.status for r in results] == ["ok", "ok", "error"]
    assert [r.reward for r in results] == [0.5, 0.0, None]
    assert "returned None" in results[2].error


@pytest.mark.parametrize(
    ("name", "message"), [("too_few", "returned 1 value(s) for 2"), ("raises", "exploded")]
)
def test_broken_custom_verifier_is_an_error(client, name, message):
    results = client.score([item(str(i), "x", "1", verifiers=[{"name": name}]) for i in range(2)])
    assert all(r.status == "error" and r.reward is None and message in r.error for r in results)


def test_custom_verifier_listed_with_its_docstring(client):
    by_name = {v.name: v for v in client.verifiers().verifiers}
    assert by_name["mentions"].kind == "custom"
    assert by_name["mentions"].description.startswith("1 if the completion mentions the reference")


def test_unimportable_custom_verifier_fails_at_startup():
    settings = RewardSettings(custom_verifiers={"x": "no_such_module_here:fn"})
    with pytest.raises(ConfigurationError, match="cannot import 'no_such_module_here:fn'"):
        create_app(settings)


def test_custom_verifier_path_is_checked():
    with pytest.raises(ValueError, match="not an import path"):
        RewardSettings(custom_verifiers={"x": "just_a_module"})


# --- the client ----------------------------------------------------------------------------


def test_client_batches_and_keeps_order(client):
    items = [
        item(f"i{i}", f"\\boxed{{{i}}}", str(i % 3), verifiers=[{"name": "exact"}])
        for i in range(7)
    ]
    results = client.score(items, job_id="job-1", step=0)
    assert [r.id for r in results] == [f"i{i}" for i in range(7)]
    assert [r.reward for r in results] == [1.0 if i < 3 else 0.0 for i in range(7)]


def test_client_raises_on_4xx_with_the_message(client):
    with pytest.raises(RewardClientError, match="unknown verifier 'nope'") as info:
        client.score([item("a", "x", "1", verifiers=[{"name": "nope"}])])
    assert info.value.status_code == 422


def test_client_wrong_token(url):
    with RewardClient(url, "bad", retries=0) as c, pytest.raises(RewardClientError, match="401"):
        c.score([item("a", "x", "1")])


def test_client_gives_up_on_unreachable_service():
    with RewardClient("http://127.0.0.1:9", retries=1, backoff_s=0.01) as c:
        with pytest.raises(RewardClientError, match="after 2 attempt"):
            c.score([item("a", "x", "1")])
        assert not c.health()


def test_client_errors_and_logs_hide_the_urls_secrets(caplog):
    url = "http://user:s3cret@127.0.0.1:9/?key=k3y"
    client = RewardClient(url, retries=1, backoff_s=0.01)
    with client, pytest.raises(RewardClientError) as refused:
        client.score([item("a", "x", "1")])
    shown = str(refused.value) + caplog.text
    assert "http://***@127.0.0.1:9/?***" in str(refused.value) and "retry 1" in caplog.text
    assert "s3cret" not in shown and "k3y" not in shown


def test_rewards_and_steps_maps_failures_to_nan(client):
    items = [
        item("a", "1+1=2\n\\boxed{2}", "2", verifiers=[{"name": "arithmetic_steps"}]),
        item("b", "x", None, verifiers=[{"name": "exact"}]),
    ]
    rewards, steps = rewards_and_steps(client.score(items))
    assert rewards[0] == 1.0 and math.isnan(rewards[1])
    assert [(s.end, s.reward) for s in steps[0]] == [(5, 1.0), (15, 1.0)]
    assert steps[1] is None


def test_cached_result_is_identical(client):
    items = [item("a", "\\boxed{1/2}", "0.5")]
    first = client.score(items, job_id="job-2", step=5)
    second = client.score(items, job_id="job-2", step=5)
    assert first == second and first[0].reward == 1.0


# --- TCP_NODELAY ---------------------------------------------------------------------------


def test_accepted_sockets_inherit_tcp_nodelay():
    listener = listen_socket("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()) as _peer:
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_single_item_latency_has_no_nagle_stall(http):
    body = {"items": [item("a", "\\boxed{1}", "1", verifiers=[{"name": "exact"}])]}
    timings = []
    for _ in range(15):
        started = time.perf_counter()
        assert http.post("/v1/score", json=body).status_code == 200
        timings.append(time.perf_counter() - started)
    # A Nagle stall costs every request >= 40 ms (delayed ACK); the fastest shows it.
    assert min(timings) < 0.03


def test_port_zero_reports_the_real_port():
    with running_service(workers=1) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        assert port > 0
        assert httpx.get(f"{base_url}/healthz").status_code == 200


# --- settings from the environment and the blocking serve() ------------------------------


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("GRPO_REWARD_TOKEN", "env-token")
    monkeypatch.setenv("GRPO_REWARD_REMOTE_HOSTS", '["rm.internal"]')
    monkeypatch.setenv("GRPO_REWARD_REMOTE_VERIFIERS", '{"rm": {"url": "http://rm.internal:9000"}}')
    monkeypatch.setenv("GRPO_REWARD_DEFAULT_VERIFIERS", '["exact", "answer_format"]')
    settings = RewardSettings()
    assert settings.token.get_secret_value() == "env-token"
    assert "env-token" not in repr(settings)
    assert settings.remote_verifiers["rm"].endpoint == "http://rm.internal:9000/v1/score"
    assert settings.default_verifiers == ["exact", "answer_format"]


def test_serve_blocks_until_interrupted(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "GRPO_REWARD_TOKEN": "cli-token",
        "GRPO_REWARD_WORKERS": "1",
        "GRPO_REWARD_DEFAULT_VERIFIERS": '["exact"]',
    }
    code = f"from reward.server import serve; serve('127.0.0.1', {port})"
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        with RewardClient(f"http://127.0.0.1:{port}", "cli-token") as c:
            [result] = c.score([item("a", "\\boxed{0.5}", "0.5")])
        assert result.reward == 1.0
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
