"""Users' reward functions and reward clients work unchanged through the reward service:
TRL's own reward functions and its calling convention (keywords, conversational form,
metadata columns, async, None), verl's `compute_score`, and OpenRLHF's remote-RM client
(no headers, numeric labels) through the path token; the loopback rule of a tokenless
service; one WARNING per refused request; a truthful OpenAPI document, fuzzed."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import requests
import reward_custom_verifiers
from fuzz_testkit import schema_failures
from reward_custom_verifiers import CALLS
from reward_testkit import item, running_service

from reward import RewardClient, RewardSettings, create_app
from reward.protocol import CALL_KEYWORDS

TOKEN = "clients-token-123"
PATH_TOKEN = "openrlhf-path-secret-0123"
CUSTOM = reward_custom_verifiers.__name__
GRPO = Path(sys.executable).with_name("grpo")


def chat(name: str) -> dict:
    return {"path": f"trl.rewards:{name}", "conversational": True}


CUSTOM_VERIFIERS: dict[str, object] = {
    "trl_docs": f"{CUSTOM}:trl_docs_reward",
    "probe": f"{CUSTOM}:keyword_probe",
    "probe_chat": {"path": f"{CUSTOM}:keyword_probe", "conversational": True},
    "async_boxed": f"{CUSTOM}:async_boxed",
    "verl": {"path": f"{CUSTOM}:verl_compute_score", "style": "verl", "data_source": "plain"},
    **{
        name: chat(name)
        for name in ("accuracy_reward", "think_format_reward", "reasoning_accuracy_reward")
    },
}
SETTINGS = {
    "token": TOKEN,
    "path_token": PATH_TOKEN,
    "item_timeout_s": 5.0,
    "custom_verifiers": CUSTOM_VERIFIERS,
}


@pytest.fixture(scope="module")
def url():
    with running_service(**SETTINGS) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    with RewardClient(url, TOKEN, retries=0) as c:
        yield c


def scored(client, name: str, items: list[dict]) -> list[tuple[str, float | None]]:
    results = client.score([{**entry, "verifiers": [{"name": name}]} for entry in items])
    return [(r.status, r.reward) for r in results]


# --- TRL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "right", "wrong"),
    [
        ("accuracy_reward", "so \\boxed{12}", "so \\boxed{13}"),
        ("think_format_reward", "<think>5+7</think>12", "5+7 is 12"),
        ("reasoning_accuracy_reward", "<think>5+7</think> \\boxed{12}", "<think>x</think> 13"),
    ],
)
def test_trls_own_reward_functions_in_conversational_mode(client, name, right, wrong):
    items = [
        item(str(i), text, metadata={"solution": "12"}) for i, text in enumerate([right, wrong])
    ]
    assert scored(client, name, items) == [("ok", 1.0), ("ok", 0.0)]


def test_trls_none_is_unscorable_not_zero(client):
    # accuracy_reward answers None when the gold solution does not parse.
    [result] = client.score(
        [
            item(
                "a",
                "\\boxed{1}",
                metadata={"solution": ""},
                verifiers=[{"name": "accuracy_reward"}],
            )
        ]
    )
    assert result.status == "error" and result.reward is None
    assert "returned None" in result.error


def test_trl_docs_example_reads_its_column_in_plain_mode(client):
    items = [
        item("a", "x \\boxed{12}", metadata={"ground_truth": "12"}),
        item("b", "x \\boxed{13}", metadata={"ground_truth": "12"}),
    ]
    assert scored(client, "trl_docs", items) == [("ok", 1.0), ("ok", 0.0)]


def test_one_keyword_call_per_batch_with_every_column(client):
    CALLS.clear()
    items = [
        item("a", "one", "r1", metadata={"expect": "one", "extra": 1}, completion_ids=[5, 6]),
        item("b", "two", None, metadata={"expect": "nope"}, completion_ids=[7]),
    ]
    assert scored(client, "probe", items) == [("ok", 1.0), ("ok", 0.0)]
    [call] = CALLS
    assert call == {
        "prompts": ["Q", "Q"],
        "completions": ["one", "two"],
        "reference": ["r1", None],
        "completion_ids": [[5, 6], [7]],
        "expect": ["one", "nope"],
        "extra": [1, None],
    }


def test_completion_ids_only_when_every_item_has_them(client):
    CALLS.clear()
    items = [item("a", "x", metadata={"expect": "x"}, completion_ids=[1]), item("b", "y")]
    scored(client, "probe", items)
    assert "completion_ids" not in CALLS[0]


def test_conversational_mode_passes_one_message_lists(client):
    CALLS.clear()
    message = [{"role": "assistant", "content": "hi"}]
    assert scored(client, "probe_chat", [item("a", "hi", metadata={"expect": message})]) == [
        ("ok", 1.0)
    ]
    assert CALLS[0]["prompts"] == [[{"role": "user", "content": "Q"}]]
    assert CALLS[0]["completions"] == [message]


@pytest.mark.parametrize("key", sorted(CALL_KEYWORDS))
def test_metadata_colliding_with_a_call_keyword_is_422(url, key):
    body = {"items": [item("a", "x", metadata={key: 1})]}
    response = httpx.post(
        f"{url}/v1/score", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 422
    assert "items.0.metadata" in response.json()["detail"] and repr(key) in response.text


def test_async_function_is_awaited(client):
    items = [item("a", "\\boxed{3}", "3"), item("b", "\\boxed{4}", "3"), item("c", "x")]
    assert scored(client, "async_boxed", items) == [("ok", 1.0), ("ok", 0.0), ("error", None)]


# --- verl -----------------------------------------------------------------------------


def test_verl_compute_score_per_item(client):
    items = [
        item("a", "so 12", "12"),
        item("b", "so 13", "12", metadata={"data_source": "with_details"}),
        item("c", "so 12", "12", metadata={"explode": "c"}),
        item("d", "so 12", "12", metadata={"data_source": "with_details"}),
    ]
    results = client.score([{**entry, "verifiers": [{"name": "verl"}]} for entry in items])
    assert [(r.status, r.reward) for r in results] == [
        ("ok", 1.0),
        ("ok", 0.0),
        ("error", None),
        ("ok", 1.0),
    ]
    assert results[3].details["verl"] == {"acc": True, "pred": "12", "status": "ok", "reward": 1.0}
    assert "ValueError: cannot score item c" in results[2].error


# --- OpenRLHF ---------------------------------------------------------------------------

PROMPTS = ["Q: 5+7\nA:", "Q: 6+6\nA:", "Q: 10+2\nA:"]
ANSWERS = [" \\boxed{12}", " \\boxed{13}", " 12"]
LABELS = ["12", "12", 12]


def openrlhf_post(url: str, queries: list, prompts: list, labels: list) -> requests.Response:
    """What OpenRLHF's remote-RM client sends: a JSON body and no Authorization header."""
    data = {"query": queries, "prompts": prompts, "labels": labels}
    return requests.post(url, json=data, headers={"Content-Type": "application/json"}, timeout=60)


def openrlhf_rewards(url: str) -> tuple[list[float], list[float]]:
    """(whole batch in one POST, one sample per POST)."""
    queries = [p + a for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    batch = openrlhf_post(url, queries, PROMPTS, LABELS)
    assert batch.status_code == 200, batch.text
    singles = []
    for query, prompt, label in zip(queries, PROMPTS, LABELS, strict=True):
        answer = openrlhf_post(url, [query], [prompt], [label])
        assert answer.status_code == 200, answer.text
        singles += answer.json()["rewards"]
    return batch.json()["rewards"], singles


def test_openrlhf_client_through_the_path_token(url):
    assert openrlhf_rewards(f"{url}/openrlhf/{PATH_TOKEN}/get_reward") == ([1.0, 0.0, 1.0],) * 2


def test_openrlhf_without_the_way_in_is_refused(url):
    queries = [PROMPTS[0] + ANSWERS[0]]
    assert openrlhf_post(f"{url}/get_reward", queries, PROMPTS[:1], ["12"]).status_code == 401
    wrong = openrlhf_post(f"{url}/openrlhf/{'x' * 25}/get_reward", queries, PROMPTS[:1], ["12"])
    assert wrong.status_code == 401 and "GRPO_REWARD_PATH_TOKEN" in wrong.json()["detail"]


def test_openrlhf_empty_label_is_no_label(url):
    # OpenRLHF sends "" when the user set no label key; `math` needs a reference: 502.
    queries = [PROMPTS[0] + ANSWERS[0]]
    answer = openrlhf_post(f"{url}/openrlhf/{PATH_TOKEN}/get_reward", queries, PROMPTS[:1], [""])
    assert answer.status_code == 502 and "needs the item's 'reference'" in answer.text


@pytest.mark.parametrize("label", [True, None])
def test_openrlhf_label_types(url, label):
    queries = [PROMPTS[0] + ANSWERS[0]]
    answer = openrlhf_post(f"{url}/openrlhf/{PATH_TOKEN}/get_reward", queries, PROMPTS[:1], [label])
    assert answer.status_code == (422 if label is True else 502), answer.text


# --- refusals are logged once -----------------------------------------------------------


def test_every_refused_request_is_logged_once_with_its_reason(url, caplog):
    caplog.set_level(logging.WARNING, logger="reward.app")
    httpx.post(f"{url}/v1/score", json={"items": []})
    httpx.post(f"{url}/openrlhf/{'y' * 25}/get_reward", json={"query": [], "prompts": []})
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    httpx.post(f"{url}/v1/score", content=b'{"items": "\xff"}', headers=headers)
    deadline = time.monotonic() + 5
    while len(refusals(caplog)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = refusals(caplog)
    assert len(lines) == 3, lines
    assert lines[0].startswith("refused POST /v1/score with 401: missing bearer token")
    assert lines[1].startswith("refused POST /openrlhf/{path_token}/get_reward with 401: wrong")
    assert lines[2].startswith("refused POST /v1/score with 422: invalid request: the body is not")
    assert all(record.levelno == logging.WARNING for record in caplog.records)
    assert "y" * 25 not in caplog.text


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]


# --- the loopback rule, and a tokenless `grpo reward serve` ----------------------------


def test_tokenless_service_binds_loopback_only():
    with pytest.raises(ValueError, match="GRPO_REWARD_TOKEN"):
        RewardSettings(host="0.0.0.0")
    assert RewardSettings(host="::1").host == "::1"
    assert RewardSettings(host="0.0.0.0", token="t" * 16).host == "0.0.0.0"


def test_tokenless_cli_refuses_a_public_address():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPO_REWARD_")}
    result = subprocess.run(
        [str(GRPO), "reward", "serve", "--host", "0.0.0.0", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0 and "GRPO_REWARD_TOKEN" in result.stderr


def test_tokenless_cli_on_loopback_serves_openrlhf(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPO_REWARD_")}
    command = [str(GRPO), "reward", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env={**env, "GRPO_REWARD_WORKERS": "1"}, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process)
        assert openrlhf_rewards(f"{base}/get_reward") == ([1.0, 0.0, 1.0],) * 2
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_healthy(base: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)


# --- the OpenAPI document tells the truth -----------------------------------------------


def reward_schema() -> dict:
    return create_app(RewardSettings(**SETTINGS, workers=1)).openapi()


def test_openapi_declares_the_bearer_scheme_and_error_bodies():
    schema = reward_schema()
    assert schema["components"]["securitySchemes"]["rewardToken"]["scheme"] == "bearer"
    score = schema["paths"]["/v1/score"]["post"]
    assert score["security"] == [{"rewardToken": []}]
    for status in ("401", "413", "422"):
        body = score["responses"][status]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ErrorBody"}
    detail = schema["components"]["schemas"]["ErrorBody"]["properties"]["detail"]
    assert detail["type"] == "string"
    failure = schema["paths"]["/get_reward"]["post"]["responses"]["502"]
    assert failure["content"]["application/json"]["schema"]["$ref"].endswith("OpenRLHFFailure")
    assert "security" not in schema["paths"]["/healthz"]["get"]


def get_reward_batch_failed(response, case) -> bool:
    """/get_reward's 502 is its documented answer to a batch with unscorable items
    (OpenRLHF's format has no per-item status); any other 5xx is a bug."""
    return response.status_code == 502 and case.path.endswith("get_reward")


def test_fuzzing_the_reward_app_finds_no_server_error(url):
    schema = json.loads(json.dumps(reward_schema()))
    failures = schema_failures(
        schema, url, TOKEN, max_examples=12, documented_5xx=get_reward_batch_failed
    )
    assert failures == [], "\n\n".join(failures)
