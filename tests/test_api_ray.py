"""The job API on a real Ray cluster, with real training jobs (few: each costs a cold
vLLM engine start).

- A 4-step arithmetic job submitted through the client runs to SUCCEEDED; its metrics,
  checkpoints and log are served; after a restart of the API (a new app on the same
  database) the job is still there with its metrics. It trains a LoRA adapter with two
  learner ranks and the broadcast transport (the composition the LoRA issue names):
  the engines serve each new adapter version and their log-probs match the learner's.
- The run's token (with which that job's driver reported) is in nothing Ray shows of
  the job, and its token file is left on no disk.
- A running job that is cancelled checkpoints, ends CANCELLED, and its Ray actors die.
- The reconciler fails runs whose Ray job failed without a report or vanished, and
  stops a cancelled run that outlives its grace period (cheap Ray jobs, no training).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from api_fixtures import (  # noqa: F401
    TOKEN,
    api_settings,
    cache_root,
    free_port,
    ray_cluster,
    tiny_job,
)

from services.api.jobs import token_digest
from services.api.launcher import TOKEN_FILE, RayLauncher, submission_id
from services.api.reconciler import Reconciler
from services.api.server import ApiServer
from services.api.settings import ApiSettings
from services.api.states import Event, JobState
from services.api.store import JobStore
from services.client import JobApiError, JobClient

# Generous bounds: a cold engine start takes about a minute on a quiet machine, many on a
# shared, overloaded one. A passing run takes only as long as the jobs need.
pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(1800)]

JOB_TIMEOUT_S = 900.0
GRACE_S = 600.0


class Api:
    """A running job API that a test can restart on the same database."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.server: ApiServer | None = None
        self.client: JobClient | None = None
        self.start()

    def start(self) -> None:
        self.server = ApiServer(self.settings)
        self.client = JobClient(self.server.start(), TOKEN)

    def stop(self) -> None:
        self.client.close()
        self.server.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def api(ray_cluster, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("api-ray")
    settings = api_settings(
        root / "state",
        [root, cache_root()],
        ray_address=ray_cluster.dashboard_url,
        ray_token=ray_cluster.token,
        port=free_port(),  # a restart keeps the URL the running drivers report to
        max_running=1,
        cancel_grace_s=GRACE_S,
    )
    running = Api(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def jobs(api):
    """Both real jobs are queued at once; with max_running 1 they run one after the other
    (FIFO), so the machine holds one training job's memory at a time."""
    ok = api.client.submit(lora_job(), idempotency_key="real-1")
    cancel = api.client.submit(tiny_job("runs/cancel", train={"steps": 1000}))
    return {"ok": ok, "cancel": cancel}


LORA = {"rank": 8, "alpha": 16, "target_modules": "all-linear"}


def lora_job() -> dict:
    """4 steps of LoRA with 2 learner ranks and the broadcast weight transport, on the
    arithmetic base model (it scores some answers: every step has groups to train on)."""
    from services.embedded.arithmetic import base_model_dir

    model = {"path": str(base_model_dir()), "lora": LORA}
    composition = {"learner": {"replicas": 2}, "weight_transport": "broadcast"}
    return tiny_job("runs/ok", train={"steps": 4}, model=model, cluster=composition)


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5, explain=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    context = f"\n{explain()}" if explain else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}{context}")


def log_tail(client: JobClient, job_id: str) -> str:
    try:
        return client.logs(job_id).data.decode(errors="replace")[-4000:]
    except Exception as error:  # the log only explains a failure
        return f"(no log: {error})"


def complete_log(client: JobClient, job_id: str):
    chunk = client.logs(job_id)
    return chunk if chunk.complete else None


def test_job_runs_to_succeeded_and_survives_an_api_restart(api, jobs):
    client = api.client
    job = jobs["ok"]
    assert job.state is JobState.QUEUED
    assert job.output_dir == str(api.settings.base_dir / "runs/ok")

    wait_for(lambda: client.get(job.id).state is not JobState.QUEUED, 60, "the launch")
    assert client.get(jobs["cancel"].id).state is JobState.QUEUED  # max_running 1, FIFO

    done = client.wait(job.id, timeout_s=JOB_TIMEOUT_S, poll_s=1)
    assert done.state is JobState.SUCCEEDED, (done.error, log_tail(client, job.id))
    assert done.step == 4 and done.started_at and done.finished_at
    records = list(client.iter_metrics(job.id))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert "reward/mean" in records[1] and "eval/accuracy" in records[-1]
    assert done.latest_metrics == records[-1]
    # each step's samples came from the adapter the learner had just sent, and the
    # engines' log-probs of them match the learner's (fp32: at most 1e-5 apart)
    assert [r["weights_version"] for r in records[1:]] == [1, 2, 3, 4]
    assert max(r["train/inference_logprob_abs_diff"] for r in records[1:]) <= 1e-5
    checkpoints = client.checkpoints(job.id)
    assert [(c.step, c.final) for c in checkpoints] == [(4, False), (4, True)]
    final = Path(checkpoints[-1].path)
    assert (final / "model.safetensors").exists()  # the base with the adapter merged
    assert (final / "adapter" / "adapter_config.json").exists()  # and the adapter itself
    changes = [(e.from_state, e.to_state) for e in client.events(job.id)][1:]
    assert changes == [(JobState.QUEUED, JobState.RUNNING), (JobState.RUNNING, JobState.SUCCEEDED)]

    log = wait_for(lambda: complete_log(client, job.id), 60, "the complete log")
    assert b"succeeded after 4 steps" in log.data, log.data[-2000:]
    tail = client.logs(job.id, offset=len(log.data) - 10)
    assert tail.data == log.data[-10:] and tail.next_offset == len(log.data)
    assert b"".join(client.follow_logs(job.id)) == log.data

    api.restart()
    kept = api.client.get(job.id)
    assert kept.state is JobState.SUCCEEDED and kept.step == 4
    assert list(api.client.iter_metrics(job.id)) == records
    assert api.client.submit(lora_job(), idempotency_key="real-1").id == job.id


def test_the_run_token_is_in_nothing_ray_shows(api, jobs, ray_cluster):  # noqa: F811
    done = api.client.wait(jobs["ok"].id, timeout_s=JOB_TIMEOUT_S, poll_s=1)
    assert done.state is JobState.SUCCEEDED  # its driver reported with the token
    store = JobStore(api.settings.database_url)
    token_hash = store.get(done.id).token_hash
    store.close()
    ray_jobs = ray_cluster.job_client()
    info = ray_jobs.get_job_info(done.ray_submission_id)
    shown = repr(info) + repr(ray_jobs.list_jobs())
    assert done.ray_submission_id in shown and "--token-file" in shown
    words = set(re.findall(r"[A-Za-z0-9_-]{43}", shown))  # secrets.token_urlsafe(32)
    assert token_hash and not any(token_digest(word) == token_hash for word in words)
    assert "GRPO_JOB_TOKEN" not in shown
    # The driver read and deleted its copy on the node (the unpacked working dir)...
    package = info.runtime_env["working_dir"].removeprefix("gcs://").removesuffix(".zip")
    found = ray_cluster.temp_dir.glob(f"session_*/runtime_resources/*/{package}")
    (unpacked,) = {path.resolve() for path in found}  # session_latest links to the session
    assert (unpacked / "spec.json").exists() and not (unpacked / TOKEN_FILE).exists()
    # ...and the API deleted its own once Ray had the package.
    workdir = api.settings.state_dir.resolve() / "runs" / done.ray_submission_id
    assert (workdir / "spec.json").exists() and not (workdir / TOKEN_FILE).exists()


def test_cancel_of_a_running_job_checkpoints_and_ends_its_actors(api, jobs, ray_cluster):  # noqa: F811
    client = api.client
    job = jobs["cancel"]

    def training_or_over():
        shown = client.get(job.id)
        return shown if shown.step is not None or shown.state.terminal else None

    shown = wait_for(training_or_over, JOB_TIMEOUT_S, "the first metrics record",
                     explain=lambda: log_tail(client, job.id))  # fmt: skip
    assert not shown.state.terminal, (shown.state, shown.error, log_tail(client, job.id))
    assert client.cancel(job.id).state is JobState.CANCELLING
    assert client.cancel(job.id).state in (JobState.CANCELLING, JobState.CANCELLED)

    done = client.wait(job.id, timeout_s=GRACE_S - 60, poll_s=0.5)
    assert done.state is JobState.CANCELLED, (done.error, log_tail(client, job.id))
    checkpoints = client.checkpoints(job.id)
    assert checkpoints and not checkpoints[-1].final
    assert Path(checkpoints[-1].path, "driver_state.json").exists()
    assert done.step is not None and done.step < 1000
    assert done.started_at >= client.get(jobs["ok"].id).finished_at  # waited its turn
    with pytest.raises(JobApiError) as refused:
        client.cancel(job.id)
    assert refused.value.status == 409

    ray_jobs = ray_cluster.job_client()
    sid = done.ray_submission_id
    wait_for(lambda: ray_jobs.get_job_status(sid).is_terminal(), 60, "the Ray job to end")
    ray_job_id = ray_jobs.get_job_info(sid).job_id

    def all_dead():
        actors = ray_cluster.actors_of(ray_job_id)
        return actors if actors and all(a.state == "DEAD" for a in actors) else None

    actors = wait_for(all_dead, 60, "the job's actors to be DEAD")
    assert {"LearnerRank", "RewardService"} <= {a.class_name for a in actors}


def test_reconciler_fails_vanished_and_failed_ray_jobs_and_enforces_grace(
    ray_cluster,  # noqa: F811
    tmp_path,
):
    settings = api_settings(
        tmp_path / "state",
        [tmp_path],
        ray_address=ray_cluster.dashboard_url,
        ray_token=ray_cluster.token,
        max_running=10,
        cancel_grace_s=0.0,
    )
    store = JobStore(settings.database_url)
    launcher = RayLauncher(settings.ray_address, settings.ray_token, tmp_path / "runs")
    reconciler = Reconciler(settings, store, launcher, "http://127.0.0.1:9")
    ray_jobs = ray_cluster.job_client()

    def running(name: str, entrypoint: str | None) -> str:
        job_id = f"job-{name}-{tmp_path.name}"
        store.create(
            job_id=job_id,
            name=name,
            spec={"train": {"steps": 1}},
            spec_hash=name,
            idempotency_key=None,
            output_dir=str(tmp_path / name),
        )
        sid = submission_id(job_id, 1)
        store.apply(job_id, Event.LAUNCH, ray_submission_id=sid)
        if entrypoint:  # a stand-in for a driver: a cheap Ray job under the run's id
            ray_jobs.submit_job(entrypoint=entrypoint, submission_id=sid)
        return job_id

    vanished = running("vanished", None)
    failed = running("failed", "python -c 'import sys; sys.exit(3)'")
    stuck = running("stuck", "sleep 600")
    store.apply(stuck, Event.CANCEL)
    wait_for(lambda: ray_jobs.get_job_status(submission_id(failed, 1)).is_terminal(), 60,
             "the failing Ray job")  # fmt: skip

    def settled():
        reconciler.tick()
        return all(store.get(job).state.terminal for job in (vanished, failed, stuck))

    wait_for(settled, 60, "the reconciler to settle every job", poll_s=1)
    assert store.get(vanished).state is JobState.FAILED
    assert "vanished" in store.get(vanished).error
    failure = store.get(failed)
    assert failure.state is JobState.FAILED
    assert submission_id(failed, 1) in failure.error and "failed" in failure.error
    assert store.get(stuck).state is JobState.CANCELLED
    assert store.get(stuck).stop_requested_at is not None
    store.close()
