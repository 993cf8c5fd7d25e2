"""The shared HTTP edge (`httpedge`), as both services use it: it imports neither of
them; a body that is not UTF-8 is a 422 in both apps; both log each refusal once; the
threaded server reports its real port and refuses a second start."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import httpx
import pytest
from api_fixtures import TOKEN, api_settings, running_api
from reward_testkit import running_service

import httpedge

NOT_UTF8 = b'{"items": [{"id": "\xff\xfe"}]}'


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge").resolve()
    with running_api(api_settings(root / "state", [root], dry=True)) as (server, _client):
        yield server.url


def test_the_edge_imports_neither_service():
    code = "import sys, httpedge; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run(
        [sys.executable, "-c", f"import json; {code}"], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    assert loaded.isdisjoint({"reward", "services", "learner", "rollout", "torch", "ray"})


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/job-0000/report/state"])
def test_job_api_answers_a_non_utf8_body_with_422(api, path):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    response = httpx.post(api + path, content=NOT_UTF8, headers=headers)
    assert response.status_code == 422
    body = response.json()
    assert "not valid UTF-8 (byte 0xff at offset 19)" in body["detail"]
    assert body["errors"][0]["loc"] == ["body"]


def test_reward_app_answers_a_non_utf8_body_with_422():
    with running_service() as url:
        response = httpx.post(f"{url}/v1/score", content=NOT_UTF8)
    assert response.status_code == 422 and "UTF-8" in response.json()["detail"]


def test_job_api_logs_each_refusal_once(api, caplog):
    caplog.set_level(logging.WARNING, logger="services.api.app")
    httpx.get(api + "/v1/jobs", headers={"Authorization": "Bearer wrong"})
    refused = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert [r.getMessage() for r in refused] == [
        "refused GET /v1/jobs with 401: wrong bearer token: this route takes the API's token "
        "(GRPO_API_TOKEN)"
    ]


def test_threaded_server_reports_its_port_and_starts_once():
    with running_service() as url:
        assert int(url.rsplit(":", 1)[1]) > 0
    server = httpedge.ThreadedServer(
        lambda port: _hello, host="127.0.0.1", port=0, log_level="warning", name="hello"
    )
    with server:
        assert httpx.get(server.url).text == "hello"
        with pytest.raises(RuntimeError, match="hello already started"):
            server.start()


async def _hello(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def test_a_refusal_cannot_forge_log_lines(api, caplog):
    caplog.set_level(logging.WARNING, logger="services.api.app")
    body = {"spec": {}, "bad\nWARNING forged": 1}
    httpx.post(api + "/v1/jobs", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert "\n" not in line and "bad\\nWARNING forged" in line
