"""The job API under hostile input (issue 17), over HTTP with Ray unreachable: every
bad body is a 4xx naming the field, never a 500, nothing bad is stored, reward URLs
must be allowed, and the driver routes answer unknown and known jobs alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.jobs import token_digest
from services.api.settings import ApiSettings
from services.api.states import Event

TOKEN = "hardening-token-" + "x" * 16
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ALLOWED = "http://rm.internal:8000"
UNREACHABLE_RAY = "http://127.0.0.1:9"  # discard port: nothing listens


def settings(tmp_path: Path, **overrides) -> ApiSettings:
    values = {"token": TOKEN, "state_dir": tmp_path / "state", "allowed_roots": [tmp_path],
              "ray_address": UNREACHABLE_RAY, "allowed_reward_urls": [ALLOWED], "dry": True,
              "log_level": "warning", **overrides}  # fmt: skip
    return ApiSettings(**values)


@pytest.fixture
def api(tmp_path):
    with TestClient(create_app(settings(tmp_path)), raise_server_exceptions=False) as client:
        yield client


def body(**sections) -> dict:
    raw = {"model": {"path": "models/m"}, "data": {"train": "train.jsonl"},
           "train": {"eval_every": 0}}  # fmt: skip
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


def post_raw(api: TestClient, text: str):
    """POST a body written by hand: JSON that json.dumps would not write (lone
    surrogate escapes, the Infinity literal, huge integers)."""
    headers = {**ADMIN, "Content-Type": "application/json"}
    return api.post("/v1/jobs", content=text.encode(), headers=headers)


def assert_names(response, field: str) -> None:
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"], response.json()


@pytest.mark.parametrize("ray_dry", [True, False])
def test_jobs_are_accepted_while_ray_is_unreachable(tmp_path, ray_dry):
    app = create_app(settings(tmp_path, dry=ray_dry, poll_interval_s=0.1, scheduler_lease_s=1))
    with TestClient(app) as api:
        created = api.post("/v1/jobs", json=body(), headers=ADMIN)
        assert created.status_code == 201, created.text
        shown = api.get(f"/v1/jobs/{created.json()['id']}", headers=ADMIN)
        assert shown.status_code == 200 and shown.json()["state"] == "QUEUED"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"data": {"train": "t", "system_prompt": "\\ud800"}}', "data.system_prompt"),
        ('{"model": {"path": "m\\udfff"}}', "model.path"),
        ('{"rollout": {"stop": ["\\ud83d"]}}', "rollout.stop.0"),
        ('{"cluster": {"learner": {"resources": {"\\ud800": 1}}}}', "resources"),
    ],
)
def test_lone_surrogates_are_422_and_nothing_is_stored(api, text, field):
    raw = json.loads(text)
    spec = body(**raw)
    assert_names(post_raw(api, json.dumps(spec)), field)
    listed = api.get("/v1/jobs", headers=ADMIN)
    assert listed.status_code == 200 and listed.json()["items"] == []


@pytest.mark.parametrize(
    ("section", "literal", "field"),
    [
        ("rollout", '{"temperature": Infinity}', "rollout.temperature"),
        ("reward", '{"timeout_s": Infinity}', "reward.timeout_s"),
        ("algorithm", '{"clip_high": Infinity}', "algorithm.clip_high"),
        ("algorithm", '{"beta": NaN}', "algorithm.beta"),
        ("train", '{"eval_every": 0, "steps": 1000000000000000000000000000000}', "train.steps"),
        ("rollout", '{"engines": 1000000}', "rollout.engines"),
        ("cluster", '{"learner": {"num_gpus": 1e9}}', "cluster.learner.num_gpus"),
        ("model", '{"path": "m", "lora": {"rank": 8, "alpha": Infinity}}', "model.lora.alpha"),
    ],
)
def test_absurd_and_non_finite_numbers_are_422(api, section, literal, field):
    spec = body()
    spec.pop(section, None)
    text = json.dumps(spec)[:-1] + f', "{section}": {literal}}}'
    assert_names(post_raw(api, text), field)
    assert_names(post_raw(api, json.dumps({**spec, "seed": 10**30})), "seed")


@pytest.mark.parametrize(
    "url",
    ["not a url", "file:///etc/passwd", "gopher://rm.internal:70/_", "http://169.254.169.254/",
     "http://rm.internal.evil.example:8000", "https://rm.internal:8000"],
)  # fmt: skip
def test_reward_urls_outside_the_allowlist_are_422(api, url):
    assert_names(api.post("/v1/jobs", json=body(reward={"url": url}), headers=ADMIN), "reward.url")


def test_an_allowed_reward_url_is_pinned_and_its_secrets_are_hidden(api):
    url = "http://user:s3cret@rm.internal:8000/v1/score?key=k3y"
    created = api.post("/v1/jobs", json=body(reward={"url": url}), headers=ADMIN)
    assert created.status_code == 201, created.text
    shown = api.get(f"/v1/jobs/{created.json()['id']}", headers=ADMIN).json()
    assert shown["spec"]["reward"]["url"] == "http://***@rm.internal:8000/v1/score?***"
    assert shown["spec"]["reward"]["token_url"] == ALLOWED
    assert "s3cret" not in json.dumps(shown) and "k3y" not in json.dumps(shown)
    refused = api.post("/v1/jobs", json=body(reward={"url": "ftp://u:s3cret@h/"}), headers=ADMIN)
    assert refused.status_code == 422 and "s3cret" not in refused.text


def test_too_many_metadata_fields_are_422(api):
    spec = body(data={"metadata_fields": [f"column{i}" for i in range(65)]})
    assert_names(api.post("/v1/jobs", json=spec, headers=ADMIN), "data.metadata_fields")


def test_weights_whose_sum_overflows_are_422(api):
    weights = [{"name": "math", "weight": 1e308}, {"name": "exact", "weight": 1e308}]
    assert_names(
        api.post("/v1/jobs", json=body(reward={"verifiers": weights}), headers=ADMIN), "weights"
    )


def test_output_dir_may_not_be_the_root_nor_hold_other_runs(api, tmp_path):
    assert_names(
        api.post("/v1/jobs", json=body(output={"dir": str(tmp_path)}), headers=ADMIN), "output.dir"
    )
    assert (
        api.post("/v1/jobs", json=body(output={"dir": "runs/a"}), headers=ADMIN).status_code == 201
    )
    holder = api.post("/v1/jobs", json=body(output={"dir": "runs"}), headers=ADMIN)
    assert holder.status_code == 409 and "inside one another" in holder.json()["detail"]


def test_driver_routes_answer_unknown_and_known_jobs_alike(api):
    job_id = api.post("/v1/jobs", json=body(), headers=ADMIN).json()["id"]
    answers = []
    for target in (job_id, "job-0123456789abcdef"):
        answer = api.post(
            f"/v1/jobs/{target}/report/state",
            json={"state": "RUNNING"},
            headers={"Authorization": "Bearer not-the-token"},
        )
        answers.append((answer.status_code, answer.json(), answer.headers.get("www-authenticate")))
    assert answers[0] == answers[1] and answers[0][0] == 401
    assert job_id not in json.dumps(answers[0][1])


@pytest.mark.parametrize(
    ("route", "raw"),
    [
        ("state", b'{"state": "FAILED", "error": "boom \\ud800"}'),
        ("metrics", b'{"step": 1, "values": {"loss\\udc00": 1.0}}'),
        ("checkpoints", b'{"step": 1, "path": "/runs/\\ud800"}'),
    ],
)
def test_driver_reports_with_lone_surrogates_are_422(api, route, raw):
    job_id = api.post("/v1/jobs", json=body(), headers=ADMIN).json()["id"]
    api.app.state.store.apply(
        job_id, Event.LAUNCH, ray_submission_id="grpo-x", token_hash=token_digest("run-token")
    )
    headers = {"Authorization": "Bearer run-token", "Content-Type": "application/json"}
    answer = api.post(f"/v1/jobs/{job_id}/report/{route}", content=raw, headers=headers)
    assert_names(answer, "surrogate")
    assert api.get(f"/v1/jobs/{job_id}", headers=ADMIN).status_code == 200
