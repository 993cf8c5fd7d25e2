"""The job API over real HTTP, in dry mode (jobs are validated and queued, never
launched): tokens on every route, precise 4xx answers to bad requests, path
confinement, idempotency, cancel and resume rules, paging, persistence across a
restart, the driver's report routes through ``HttpReporter``, the CLI, the committed
OpenAPI document, and a bounded schemathesis run that finds no 5xx."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
from api_fixtures import TOKEN, api_settings, running_api
from fastapi.routing import APIRoute
from fuzz_testkit import schema_failures
from typer.testing import CliRunner

from services.api.jobs import token_digest
from services.api.openapi import DOC, render
from services.api.states import Event, JobState
from services.cli import app as cli
from services.client import JobApiError
from services.train.reporting import HttpReporter, NullReporter, reporter_from_env

MAX_BODY = 16 * 1024


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api-http").resolve()
    (root / "model").mkdir()
    (root / "data").mkdir()
    outside = tmp_path_factory.mktemp("outside")
    (root / "escape").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def api(root):
    settings = api_settings(
        root / "state",
        [root],
        dry=True,
        max_body_bytes=MAX_BODY,
        allowed_reward_urls=["https://rm.example"],
    )
    with running_api(settings) as (server, client):
        yield server, client


@pytest.fixture
def client(api):
    return api[1]


@pytest.fixture
def http(api):
    with httpx.Client(base_url=api[0].url, headers={"Authorization": f"Bearer {TOKEN}"}) as h:
        yield h


def body(**sections) -> dict:
    raw = {"model": {"path": "model"}, "data": {"train": "data/train.jsonl"},
           "train": {"eval_every": 0}}  # fmt: skip
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


_outputs = iter(range(10**6))


def fresh(**sections) -> dict:
    """A spec with an output dir of its own (an unfinished job holds its output dir)."""
    return body(output={"dir": f"runs/t{next(_outputs)}"}, **sections)


# ----------------------------------------------------------------------- tokens


def routes(app) -> list[tuple[str, str]]:
    found = []
    for route in app.routes:
        if isinstance(route, APIRoute):
            path = route.path.replace("{job_id}", "job-0000")
            found += [(method, path) for method in sorted(route.methods)]
    return found


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer wrong-token"}, "wrong"),
        ({"Authorization": "Basic abc"}, "missing bearer token"),
    ],
)
def test_every_route_but_healthz_needs_a_token(api, headers, reason):
    server = api[0]
    checked = 0
    for method, path in routes(server.app):
        response = httpx.request(method, server.url + path, headers=headers, json={})
        if path == "/healthz":
            assert response.status_code == 200
            continue
        assert response.status_code == 401, (method, path, response.text)
        assert reason in response.json()["detail"], (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
        checked += 1
    assert checked >= 13


def test_driver_routes_refuse_the_admin_token(http, client):
    job = client.submit(fresh())
    response = http.post(f"/v1/jobs/{job.id}/report/state", json={"state": "RUNNING"})
    assert response.status_code == 401
    assert "--token-file" in response.json()["detail"]


def test_the_token_is_not_in_the_log(api, caplog):
    with caplog.at_level("DEBUG"):
        httpx.get(api[0].url + "/v1/jobs", headers={"Authorization": "Bearer guess-1234"})
        httpx.get(api[0].url + "/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert TOKEN not in caplog.text and "guess-1234" not in caplog.text


# ------------------------------------------------------------------ bad requests


def error_fields(response) -> list[str]:
    return [".".join(str(p) for p in e["loc"][1:]) for e in response.json()["errors"]]


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (body(bogus=1), "bogus", "Extra inputs"),
        (body(model={"path": "model", "colour": "red"}), "model.colour", "Extra inputs"),
        (body(train={"steps": "many", "eval_every": 0}), "train.steps", "integer"),
        (body(rollout={"group_size": 1}), "rollout.group_size", "greater than or equal to 2"),
        ({"data": {"train": "t"}}, "model", "Field required"),
        (body(train={"eval_every": 5}), "", "data.eval is null"),
        (body(name="no spaces allowed"), "name", "pattern"),
    ],
)
def test_malformed_specs_get_422_naming_the_field(http, spec, field, message):
    response = http.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert field in error_fields(response)
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    ("sections", "field", "message"),
    [
        ({"model": {"path": "../outside"}}, "model.path", "'..' is not allowed"),
        ({"model": {"path": "/etc"}}, "model.path", "outside the allowed roots"),
        ({"data": {"train": "escape/train.jsonl"}}, "data.train", "outside the allowed roots"),
        ({"data": {"train": "t", "eval": "/tmp/eval.jsonl"}}, "data.eval", "outside"),
        ({"output": {"dir": "/var/tmp/run"}}, "output.dir", "outside the allowed roots"),
        ({"checkpoint": {"resume": "escape/step_2"}}, "checkpoint.resume", "outside"),
        ({"cluster": {"ray_address": "ray://elsewhere:10001"}}, "cluster.ray_address", "null"),
        (
            {"reward": {"url": "https://rm.example", "token_env": "HOME"}},
            "reward.token_env",
            "GRPO_REWARD_",
        ),
        ({"reward": {"url": "http://x"}}, "reward.url", "GRPO_API_ALLOWED_REWARD_URLS"),
    ],
)
def test_paths_outside_the_roots_get_422_naming_the_field(http, sections, field, message):
    response = http.post("/v1/jobs", json=body(**sections))
    assert response.status_code == 422, response.text
    assert error_fields(response) == [field]
    assert message in response.json()["detail"]


def test_other_bad_requests_get_precise_4xx(http, api):
    assert http.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
                     ).status_code == 422  # fmt: skip
    assert http.post("/v1/jobs", json=[1, 2]).status_code == 422
    too_big = body(data={"train": "t", "system_prompt": "x" * MAX_BODY})
    response = http.post("/v1/jobs", json=too_big)
    assert response.status_code == 413 and "GRPO_API_MAX_BODY_BYTES" in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        yield json.dumps(too_big).encode()

    assert http.post("/v1/jobs", content=chunks()).status_code == 413
    assert http.get("/v1/jobs", params={"limit": 0}).status_code == 422
    assert http.get("/v1/jobs", params={"state": "DONE"}).status_code == 422
    assert http.get("/v1/jobs", params={"next": "abc"}).status_code == 422
    assert http.post("/v1/jobs", json=fresh(), headers={"Idempotency-Key": "k" * 201}
                     ).status_code == 422  # fmt: skip
    for path in ("", "/metrics", "/checkpoints", "/events", "/logs"):
        assert http.get(f"/v1/jobs/job-missing{path}").status_code == 404, path
    for path in ("/cancel", "/resume"):
        assert http.post(f"/v1/jobs/job-missing{path}").status_code == 404, path
    assert http.delete("/v1/jobs").status_code == 405


# ------------------------------------------------------------- job operations


def test_submit_is_idempotent_by_key(http, client):
    spec = fresh(seed=3)
    first = http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "same"})
    assert first.status_code == 201 and first.json()["state"] == "QUEUED"
    reordered = dict(reversed(list(spec.items())))
    again = http.post("/v1/jobs", json=reordered, headers={"Idempotency-Key": "same"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = http.post("/v1/jobs", json={**spec, "seed": 4}, headers={"Idempotency-Key": "same"})
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    assert client.submit(fresh()).id != first.json()["id"]  # no key: always a new job

    results: list[str] = []
    racing = fresh()

    def submit() -> None:
        response = http.post("/v1/jobs", json=racing, headers={"Idempotency-Key": "race"})
        results.append(response.json()["id"])

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 6


def test_a_job_shows_its_resolved_redacted_spec(client, root):
    job = client.submit(fresh(reward={"url": "https://u:secret@rm.example/score?key=k1"}))
    shown = client.get(job.id)
    assert shown.spec["model"]["path"] == str(root / "model")
    assert shown.spec["reward"]["url"] == "https://***@rm.example/score?***"
    assert "secret" not in shown.model_dump_json()
    assert shown.total_steps == 200 and shown.step is None and shown.latest_metrics is None
    default_dir = client.submit(body(seed=11))
    assert default_dir.output_dir == str(root / "runs" / default_dir.id)


def test_cancel_and_resume_follow_the_state_machine(http, client):
    job = client.submit(fresh())
    response = http.post(f"/v1/jobs/{job.id}/cancel")
    assert response.status_code == 200 and response.json()["state"] == "CANCELLED"
    response = http.post(f"/v1/jobs/{job.id}/cancel")
    assert response.status_code == 409 and "CANCELLED" in response.json()["detail"]
    response = http.post(f"/v1/jobs/{job.id}/resume")
    assert response.status_code == 202
    assert response.json()["state"] == "QUEUED" and response.json()["run"] == 2
    response = http.post(f"/v1/jobs/{job.id}/resume")
    assert response.status_code == 409 and "FAILED or CANCELLED" in response.json()["detail"]
    history = [(e.run, e.event, e.to_state) for e in client.events(job.id)]
    assert history == [(1, "submit", JobState.QUEUED), (1, "cancel", JobState.CANCELLED),
                       (2, "resume", JobState.QUEUED)]  # fmt: skip


def test_a_running_job_is_cancelled_through_cancelling(http, api, client):
    store = api[0].app.state.store
    job = client.submit(fresh())
    store.apply(job.id, Event.LAUNCH)
    first = http.post(f"/v1/jobs/{job.id}/cancel")
    assert first.status_code == 202 and first.json()["state"] == "CANCELLING"
    assert first.json()["cancel_requested_at"]
    again = http.post(f"/v1/jobs/{job.id}/cancel")
    assert again.status_code == 202 and again.json()["state"] == "CANCELLING"


def test_an_unfinished_job_holds_its_output_dir(http, client):
    spec = fresh()
    job = client.submit(spec)
    response = http.post("/v1/jobs", json={**spec, "seed": 1})
    assert response.status_code == 409 and job.id in response.json()["detail"]
    client.cancel(job.id)
    assert http.post("/v1/jobs", json={**spec, "seed": 1}).status_code == 201


def test_lists_page_and_filter(client):
    made = [client.submit(fresh(name=f"page-{i}")).id for i in range(5)]
    client.cancel(made[0])
    first = client.list_jobs(limit=2)
    assert len(first.items) == 2 and first.next is not None
    second = client.list_jobs(limit=2, next=first.next)
    assert [j.id for j in first.items + second.items] == made[::-1][:4]
    everything = [j.id for j in client.iter_jobs()]
    assert len(everything) == len(set(everything)) and set(made) <= set(everything)
    cancelled = [j.id for j in client.iter_jobs(state="CANCELLED")]
    assert made[0] in cancelled and made[1] not in cancelled
    assert all(j.state is JobState.QUEUED for j in client.iter_jobs(state=JobState.QUEUED))


def test_dry_logs_are_empty_and_metrics_scrape(http, client):
    job = client.submit(fresh())
    chunk = client.logs(job.id)
    assert chunk.data == b"" and chunk.next_offset == 0 and not chunk.complete
    assert b"".join(client.follow_logs(job.id)) == b""
    assert client.metrics(job.id).items == [] and client.checkpoints(job.id) == []
    text = client.prometheus()
    assert 'grpo_api_jobs{state="QUEUED"}' in text
    assert 'route="/v1/jobs/{job_id}"' in text


def test_jobs_survive_a_restart(root):
    settings = api_settings(root / "restart-state", [root], dry=True)
    spec = fresh()
    with running_api(settings) as (_, client):
        job = client.submit(spec, idempotency_key="restart")
        client.cancel(client.submit(fresh()).id)
    with running_api(settings) as (_, client):
        assert client.get(job.id).state is JobState.QUEUED
        assert client.submit(spec, idempotency_key="restart").id == job.id
        assert len(list(client.iter_jobs())) == 2
        assert len(list(client.iter_jobs(state="CANCELLED"))) == 1


# ------------------------------------------------------------ driver's reports


def test_http_reporter_reports_and_sees_a_cancel(api, client, caplog):
    store = api[0].app.state.store
    job = client.submit(fresh())
    store.apply(job.id, Event.LAUNCH, token_hash=token_digest("run-token"))
    reporter = HttpReporter(api[0].url, job.id, "run-token", retries=0)
    reporter.state("RUNNING")
    reporter.metrics({"step": 0, "eval/accuracy": 0.5})
    reporter.metrics({"step": 1, "reward/mean": float("nan"), "loss/policy": 0.25,
                      "weights_version": 1})  # fmt: skip
    reporter.checkpoint(1, "/ckpt/step_1")
    assert reporter.cancel_requested() is False
    shown = client.get(job.id)
    assert shown.state is JobState.RUNNING and shown.step == 1
    assert shown.latest_metrics == {"step": 1, "reward/mean": None, "loss/policy": 0.25,
                                    "weights_version": 1}  # fmt: skip
    assert [r["step"] for r in client.metrics(job.id).items] == [0, 1]
    assert [(c.step, c.path) for c in client.checkpoints(job.id)] == [(1, "/ckpt/step_1")]

    client.cancel(job.id)
    assert reporter.cancel_requested() is True
    reporter.checkpoint(1, "/ckpt/step_1b")
    reporter.state("CANCELLED")
    assert client.get(job.id).state is JobState.CANCELLED
    with caplog.at_level("WARNING"):
        reporter.metrics({"step": 2})  # the run is over: refused, logged, not raised
        HttpReporter(api[0].url, job.id, "wrong", retries=0).state("FAILED", error="x")
    assert "409" in caplog.text and "401" in caplog.text
    assert client.get(job.id).state is JobState.CANCELLED
    reporter.close()


def test_reporter_from_env(monkeypatch):
    for name in ("GRPO_JOB_API_URL", "GRPO_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(reporter_from_env("t"), NullReporter)
    monkeypatch.setenv("GRPO_JOB_API_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("GRPO_JOB_ID", "job-x")
    assert isinstance(reporter_from_env(None), NullReporter)  # no token file: no reports
    reporter = reporter_from_env("t")
    assert isinstance(reporter, HttpReporter)
    assert reporter._http.headers["Authorization"] == "Bearer t"
    assert reporter.base == "http://127.0.0.1:1/v1/jobs/job-x/report"
    reporter.close()


# ------------------------------------------------------------------------- CLI


def test_cli_talks_to_the_api(api, root, tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_API_URL", api[0].url)
    monkeypatch.setenv("GRPO_API_TOKEN", TOKEN)
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(fresh()))
    runner = CliRunner()

    submitted = runner.invoke(cli, ["submit", str(config), "--set", "train.steps=7"])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip().splitlines()[-1]
    status = runner.invoke(cli, ["status", job_id])
    assert status.exit_code == 0 and json.loads(status.stdout)["total_steps"] == 7
    listed = runner.invoke(cli, ["jobs", "--state", "queued"])
    assert listed.exit_code == 0 and job_id[:12] in listed.stdout
    assert runner.invoke(cli, ["logs", job_id]).exit_code == 0
    assert runner.invoke(cli, ["logs", job_id, "--follow"]).exit_code == 0
    cancelled = runner.invoke(cli, ["cancel", job_id])
    assert cancelled.exit_code == 0 and "CANCELLED" in cancelled.stdout
    resumed = runner.invoke(cli, ["resume", job_id])
    assert resumed.exit_code == 0 and "run 2" in resumed.stdout

    bad = runner.invoke(cli, ["submit", str(config), "--set", "model.path=/etc"])
    assert bad.exit_code == 1 and "model.path" in bad.output
    invalid = runner.invoke(cli, ["submit", str(config), "--set", "rollout.group_size=1"])
    assert invalid.exit_code == 2 and "rollout.group_size" in invalid.output
    assert runner.invoke(cli, ["status", "job-nope"]).exit_code == 1
    monkeypatch.setenv("GRPO_API_TOKEN", "wrong")
    unauthorized = runner.invoke(cli, ["jobs"])
    assert unauthorized.exit_code == 1 and "401" in unauthorized.output


def test_serve_refuses_to_start_without_a_token(monkeypatch):
    monkeypatch.delenv("GRPO_API_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--port", "0"])
    assert result.exit_code == 2 and "GRPO_API_TOKEN" in result.output


def test_client_errors_carry_status_and_fields(client):
    with pytest.raises(JobApiError) as error:
        client.submit(body(model={"path": "../x"}))
    assert error.value.status == 422 and error.value.errors[0]["loc"] == ["body", "model", "path"]


# --------------------------------------------------------------------- schema


def test_the_committed_openapi_document_is_current():
    assert DOC.read_text() == render(), "run: python -m services.api.openapi"


def test_fuzzing_from_the_openapi_schema_finds_no_server_error(api):
    failures = schema_failures(json.loads(DOC.read_text()), api[0].url, TOKEN, max_examples=15)
    assert failures == [], "\n\n".join(failures)
