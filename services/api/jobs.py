"""What the job API does, apart from HTTP: the operations behind every route.

``JobService`` submits (with idempotency keys), lists, shows, cancels and resumes
jobs, serves their metrics, checkpoints, state history and logs, and takes the
driver's reports. It never changes a state itself: every change is an ``Event``
handed to ``JobStore.apply`` (the one transition table). Launching runs on Ray,
reconciling with Ray and the cancel grace period belong to ``services.api.reconciler``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from services.api import models, specs
from services.api.launcher import RayLauncher, submission_id
from services.api.settings import ApiSettings
from services.api.states import Event, JobState
from services.api.store import DuplicateKey, Job, JobNotFound, JobStore
from services.spec import JobSpec

log = logging.getLogger(__name__)

WRONG_JOB_TOKEN = (
    "wrong token for this job: driver routes take the run's own token (the driver's "
    "--token-file), which changes with every run"
)
NO_TOKEN = "0" * 64
"""Compared against when a job has no token, so that every refusal costs the same."""

REPORTED_STATES = {
    "RUNNING": Event.START,
    "SUCCEEDED": Event.SUCCEED,
    "CANCELLED": Event.CANCELLED,
    "FAILED": Event.FAIL,
}


class IdempotencyConflict(ValueError):
    """The Idempotency-Key was used before with another body."""


class OutputDirInUse(ValueError):
    """Another unfinished job writes to the same output directory."""


class RunNotFound(LookupError):
    """A run number the job has not reached."""


class Unauthorized(PermissionError):
    """A driver report without the job's current token."""


@dataclass(frozen=True)
class LogChunk:
    data: bytes
    next_offset: int
    complete: bool
    """The run is over and every byte of its log has been read."""


def new_job_id() -> str:
    return f"job-{secrets.token_hex(8)}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def timestamp(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC)


class JobService:
    """The operations of the job API on one store (and, unless dry, one Ray cluster)."""

    def __init__(
        self,
        settings: ApiSettings,
        store: JobStore,
        launcher: RayLauncher | None,
        *,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.wake = wake

    # ------------------------------------------------------------ user routes

    def submit(self, spec: JobSpec, idempotency_key: str | None) -> tuple[models.Job, bool]:
        """``(job, created)``: a new QUEUED job, or the one this key already made."""
        digest = specs.spec_hash(spec)
        if idempotency_key is not None:
            existing = self._replay(idempotency_key, digest)
            if existing is not None:
                return existing, False
        job_id = new_job_id()
        prepared = specs.prepare(
            spec,
            roots=self.settings.allowed_roots,
            job_id=job_id,
            allowed_reward_urls=self.settings.allowed_reward_urls,
        )
        try:
            self._require_free_output(prepared["output"]["dir"], job_id)
            job = self.store.create(
                job_id=job_id,
                name=spec.name,
                spec=prepared,
                spec_hash=digest,
                idempotency_key=idempotency_key,
                output_dir=prepared["output"]["dir"],
            )
        except (DuplicateKey, OutputDirInUse):
            # A concurrent request with the same key may have won the race: its job is ours.
            existing = self._replay(idempotency_key, digest) if idempotency_key else None
            if existing is None:
                raise
            return existing, False
        log.info("job %s (%s) queued", job.id, job.name)
        self.wake()
        return job_view(job), True

    def _replay(self, key: str, digest: str) -> models.Job | None:
        existing = self.store.by_key(key)
        if existing is None:
            return None
        if not hmac.compare_digest(existing.spec_hash, digest):
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was used for job {existing.id} with another body; "
                "use a new key for a new job"
            )
        return job_view(existing)

    def _require_free_output(self, output_dir: str, job_id: str) -> None:
        for other in self.store.using_output_dir(output_dir):
            if other.id != job_id:
                raise OutputDirInUse(
                    f"output.dir {output_dir} is used by job {other.id} ({other.state}); "
                    "give this job another output.dir or wait for that job to finish"
                )
        for other in self.store.nested_output_dirs(output_dir):
            if other.id != job_id:
                raise OutputDirInUse(
                    f"output.dir {output_dir} and the output.dir of job {other.id} "
                    f"({other.output_dir}) lie inside one another; give this job a "
                    "directory of its own, beside the other runs"
                )

    def get(self, job_id: str) -> models.Job:
        return job_view(self.store.get(job_id))

    def list_jobs(self, state: JobState | None, limit: int, cursor: str | None) -> models.JobPage:
        before = int(cursor) if cursor else None
        jobs = self.store.list_jobs(state=state, limit=limit + 1, before=before)
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return models.JobPage(
            items=[summary_view(job) for job in jobs],
            next=str(jobs[-1].seq) if more else None,
        )

    def cancel(self, job_id: str) -> models.Job:
        job, previous = self.store.apply(job_id, Event.CANCEL, detail="cancel requested")
        if job.state is not previous:
            log.info("job %s: %s → %s", job_id, previous, job.state)
        self.wake()
        return job_view(job)

    def resume(self, job_id: str) -> models.Job:
        job = self.store.get(job_id)
        self._require_free_output(job.output_dir, job_id)
        job, _ = self.store.apply(
            job_id, Event.RESUME, detail=f"resume after run {job.run} ({job.state})"
        )
        log.info("job %s: run %d queued (resume)", job_id, job.run)
        self.wake()
        return job_view(job)

    def metrics(self, job_id: str, after_step: int, limit: int) -> models.MetricsPage:
        self.store.get(job_id)
        records = self.store.metrics(job_id, after_step=after_step, limit=limit + 1)
        more = len(records) > limit
        records = records[:limit]
        return models.MetricsPage(items=records, next=records[-1]["step"] if more else None)

    def checkpoints(self, job_id: str, limit: int, cursor: str | None) -> models.CheckpointPage:
        self.store.get(job_id)
        rows = self.store.checkpoints(
            job_id, limit=limit + 1, after=int(cursor) if cursor else None
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return models.CheckpointPage(
            items=[
                models.CheckpointInfo(
                    run=c.run, step=c.step, path=c.path, final=c.final, created_at=timestamp(c.at)
                )
                for _, c in rows
            ],
            next=str(rows[-1][0]) if more else None,
        )

    def events(self, job_id: str, limit: int, cursor: str | None) -> models.EventPage:
        self.store.get(job_id)
        rows = self.store.events(job_id, limit=limit + 1, after=int(cursor) if cursor else None)
        more = len(rows) > limit
        rows = rows[:limit]
        return models.EventPage(
            items=[
                models.StateChange(
                    run=e.run,
                    at=timestamp(e.at),
                    event=e.event,
                    from_state=e.from_state,
                    to_state=e.to_state,
                    detail=e.detail,
                )
                for e in rows
            ],
            next=str(rows[-1].seq) if more else None,
        )

    # ------------------------------------------------------------------- logs

    def logs(self, job_id: str, offset: int, run: int | None = None) -> LogChunk:
        """The run's log from byte ``offset`` (Ray's job log); the latest run by default."""
        job = self.store.get(job_id)
        run = job.run if run is None else run
        if run > job.run:
            raise RunNotFound(f"job {job_id} has {job.run} run(s), not {run}")
        over = run < job.run or job.state.terminal
        if self.launcher is None or (run == job.run and job.ray_submission_id is None):
            return LogChunk(b"", offset, complete=over)
        sid = submission_id(job_id, run)
        ray_job = self.launcher.job(sid)
        text = self.launcher.logs(sid) if ray_job is not None else None
        data = (text or b"")[offset:]
        ray_over = ray_job is None or ray_job.terminal
        return LogChunk(data, offset + len(data), complete=over and ray_over)

    def follow(self, job_id: str, offset: int, run: int | None = None) -> Iterator[bytes]:
        """The run's log from ``offset`` as it grows, until the run is over."""
        job = self.store.get(job_id)
        run = job.run if run is None else run
        if run > job.run:
            raise RunNotFound(f"job {job_id} has {job.run} run(s), not {run}")
        return self._follow(job_id, offset, run)

    def _follow(self, job_id: str, offset: int, run: int) -> Iterator[bytes]:
        while True:
            chunk = self.logs(job_id, offset, run)
            if chunk.data:
                yield chunk.data
            offset = chunk.next_offset
            if chunk.complete or self.launcher is None:
                return
            time.sleep(min(self.settings.poll_interval_s, 1.0))

    # ------------------------------------------------------- driver's reports

    def authenticate_driver(self, job_id: str, token: str) -> Job:
        """The job, if ``token`` is its current run's; ``Unauthorized`` (the same answer
        whether or not the job exists, so the route does not reveal which jobs do)."""
        try:
            job = self.store.get(job_id)
        except JobNotFound:
            job = None
        expected = job.token_hash if job is not None and job.token_hash else NO_TOKEN
        if not hmac.compare_digest(expected, token_digest(token)) or job is None:
            raise Unauthorized(WRONG_JOB_TOKEN)
        return job

    def report_state(self, job: Job, report: models.StateReport) -> models.ReportAck:
        event = REPORTED_STATES[report.state]
        detail = report.error if report.state == "FAILED" else f"driver reported {report.state}"
        updated, previous = self.store.apply(job.id, event, run=job.run, detail=detail)
        if updated.state is not previous:
            log.info("job %s: %s → %s (driver)", job.id, previous, updated.state)
        return self.ack(updated.id)

    def report_metrics(self, job: Job, report: models.MetricsReport) -> models.ReportAck:
        self.store.add_metrics(job.id, job.run, {"step": report.step, **report.values})
        return self.ack(job.id)

    def report_checkpoint(self, job: Job, report: models.CheckpointReport) -> models.ReportAck:
        self.store.add_checkpoint(job.id, job.run, report.step, report.path, report.final)
        return self.ack(job.id)

    def ack(self, job_id: str) -> models.ReportAck:
        job = self.store.get(job_id)
        return models.ReportAck(state=job.state, cancel_requested=job.state is JobState.CANCELLING)


def summary_view(job: Job) -> models.JobSummary:
    return models.JobSummary(
        id=job.id,
        name=job.name,
        state=job.state,
        run=job.run,
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        step=job.step,
        total_steps=job.spec["train"]["steps"],
        error=job.error,
    )


def job_view(job: Job) -> models.Job:
    return models.Job(
        **summary_view(job).model_dump(),
        spec=specs.redact(job.spec),
        output_dir=job.output_dir,
        queued_at=timestamp(job.queued_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        cancel_requested_at=timestamp(job.cancel_requested_at),
        latest_metrics=job.latest_metrics,
        ray_submission_id=job.ray_submission_id,
    )
