"""The job API's background loop: launch queued runs, reconcile with Ray, enforce grace.

Every ``poll_interval_s`` (and right after a submit, cancel or resume) one thread
first takes or renews the scheduler lease in the store (``JobStore.take_lease``): of
several API replicas on one database only the holder runs the passes below, so no
replica launches a run, or fails it as vanished, on the strength of a view of Ray
that another replica just changed. A replica whose lease lapsed (it hung or died) is
succeeded by another after ``scheduler_lease_s``; one that stops gives it up at once.
Then:

1. asks Ray for every job it knows (one request) and brings the store in line: a run
   whose Ray job succeeded, failed, was stopped or vanished gets the matching event
   (the transition table decides the state; a vanished or failed Ray job makes the run
   FAILED with the reason);
2. stops the Ray job of a run that was asked to cancel more than ``cancel_grace_s``
   ago and has not exited, and every live Ray job of a run the store no longer
   records as going on (``orphans``: an earlier run of a resumed job, or a FAILED
   run, e.g. one whose submission errored after Ray had accepted it);
3. launches the oldest QUEUED runs (FIFO) while fewer than ``max_running`` runs are
   busy: RUNNING or CANCELLING in the store, or with a Ray job that has not ended yet
   (a driver reports its final state before it shuts its engines down). A job none of
   whose earlier runs' Ray jobs has ended waits: two drivers never share an output.dir.

A launch first records the run as RUNNING with its Ray submission id and a hash of a
fresh per-run token (compare-and-set, so a run cancelled meanwhile is not launched),
then submits it; a submission that errors fails the run with the error and stops
whatever Ray may have started under that id. In dry mode there is no launcher and the
loop does nothing: jobs stay QUEUED.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time

from services.api import specs
from services.api.jobs import token_digest
from services.api.launcher import (
    SUBMISSION_PREFIX,
    RayJob,
    RayLauncher,
    RayRejected,
    RayUnavailable,
    submission_id,
)
from services.api.settings import ApiSettings
from services.api.states import Event, IllegalTransition, JobState
from services.api.store import Job, JobNotFound, JobStore, StaleRun

log = logging.getLogger(__name__)

JOB_ENV = ("GRPO_JOB_API_URL", "GRPO_JOB_ID", "GRPO_JOB_RUN")
"""What a driver learns from its environment; its token comes in a file (``launcher``)."""
SCHEDULER_LEASE = "scheduler"
ORPHANED = frozenset({JobState.FAILED})
"""Store states of a current run whose live Ray job is stopped (CANCELLED and
SUCCEEDED runs were ended by their drivers, which are shutting down by themselves)."""


class Reconciler:
    """One pass at a time: ``tick()``; ``start()`` runs it on a daemon thread."""

    def __init__(
        self, settings: ApiSettings, store: JobStore, launcher: RayLauncher, driver_url: str
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.driver_url = driver_url
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.launched = 0
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.leading = False

    # ------------------------------------------------------------------ loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="grpo-api-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        with self._lock:
            self.store.release_lease(SCHEDULER_LEASE, self.holder)
            self.leading = False

    def wake(self) -> None:
        """Run a pass now rather than at the next period."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad pass
                log.exception(
                    "reconciler pass failed; retrying in %.1f s", self.settings.poll_interval_s
                )
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()

    def tick(self) -> None:
        with self._lock:
            if not self._lead():
                return
            try:
                ray_jobs = self.launcher.jobs()
            except (RayUnavailable, RayRejected) as error:
                log.warning("cannot reconcile with Ray: %s", error)
                return
            self.reconcile(ray_jobs)
            self.enforce_grace(ray_jobs)
            self.stop_orphans(ray_jobs)
            self.schedule(ray_jobs)

    def _lead(self) -> bool:
        """Take or renew the scheduler lease; whether this replica holds it."""
        leading = self.store.take_lease(
            SCHEDULER_LEASE, self.holder, self.settings.scheduler_lease_s
        )
        if leading != self.leading:
            log.info("%s the scheduler lease (%s)", "took" if leading else "lost", self.holder)
        self.leading = leading
        return leading

    # ------------------------------------------------------------ the passes

    def reconcile(self, ray_jobs: dict[str, RayJob]) -> None:
        for job in self.store.active():
            sid = job.ray_submission_id or submission_id(job.id, job.run)
            ray_job = ray_jobs.get(sid)
            if ray_job is None:
                self._apply(
                    job, Event.FAIL, f"the Ray job {sid} vanished (was the Ray cluster restarted?)"
                )
            elif ray_job.status == "SUCCEEDED":
                self._apply(job, Event.SUCCEED, f"Ray job {sid} succeeded")
            elif ray_job.status == "FAILED":
                self._apply(job, Event.FAIL, _failure(ray_job))
            elif ray_job.status == "STOPPED":
                detail = (
                    "stopped after the cancel grace period"
                    if job.state is JobState.CANCELLING
                    else f"the Ray job {sid} was stopped outside the job API"
                )
                self._apply(job, Event.STOPPED, detail)

    def enforce_grace(self, ray_jobs: dict[str, RayJob]) -> None:
        now = time.time()
        for job in self.store.active():
            if (
                job.state is not JobState.CANCELLING
                or job.stop_requested_at is not None
                or job.cancel_requested_at is None
                or now - job.cancel_requested_at < self.settings.cancel_grace_s
            ):
                continue
            sid = job.ray_submission_id or submission_id(job.id, job.run)
            ray_job = ray_jobs.get(sid)
            if ray_job is not None and not ray_job.terminal:
                log.warning(
                    "job %s did not exit within %.0f s of its cancel; stopping %s",
                    job.id,
                    self.settings.cancel_grace_s,
                    sid,
                )
                try:
                    self.launcher.stop(sid)
                except (RayUnavailable, RayRejected) as error:
                    log.warning("could not stop %s: %s", sid, error)
                    continue
            self.store.mark_stop_requested(job.id, job.run)

    def stop_orphans(self, ray_jobs: dict[str, RayJob]) -> None:
        """Stop live Ray jobs of runs that the store no longer records as going on."""
        for sid, ray_job in ray_jobs.items():
            run_of = _run_of(sid)
            if run_of is None or ray_job.terminal:
                continue
            try:
                job = self.store.get(run_of[0])
            except JobNotFound:
                continue  # not this API's job
            if run_of[1] < job.run or (run_of[1] == job.run and job.state in ORPHANED):
                log.warning("job %s: stopping %s, a run it no longer records", job.id, sid)
                self._stop_ray_job(sid)

    def schedule(self, ray_jobs: dict[str, RayJob]) -> None:
        live = {sid for sid, ray_job in ray_jobs.items() if not ray_job.terminal}
        busy = {job.ray_submission_id for job in self.store.active()}
        busy |= {sid for sid in live if sid.startswith(SUBMISSION_PREFIX)}
        free = self.settings.max_running - len(busy)
        running_jobs = {run_of[0] for run_of in map(_run_of, live) if run_of is not None}
        waiting = [job for job in self.store.queued() if job.id not in running_jobs]
        for job in waiting[: max(free, 0)]:
            self.launch(job)

    def launch(self, job: Job) -> None:
        sid = submission_id(job.id, job.run)
        token = secrets.token_urlsafe(32)
        try:
            job, _ = self.store.apply(
                job.id,
                Event.LAUNCH,
                run=job.run,
                detail=f"submitted as Ray job {sid}",
                ray_submission_id=sid,
                token_hash=token_digest(token),
            )
        except (IllegalTransition, StaleRun):
            return  # cancelled or resumed since it was read
        env = dict(
            zip(JOB_ENV, (self.driver_url, job.id, str(job.run)), strict=True),
            PYTHONUNBUFFERED="1",
        )
        try:
            self.launcher.submit(sid, specs.for_run(job.spec, job.run), env, token)
        except (RayUnavailable, RayRejected, OSError) as error:
            self._apply(job, Event.FAIL, f"could not submit the run to Ray: {error}")
            self._stop_ray_job(sid)  # Ray may have accepted it before the error
            return
        self.launched += 1

    def _stop_ray_job(self, sid: str) -> None:
        """Stop a Ray job if Ray has it; a failure is logged."""
        try:
            self.launcher.stop(sid)
        except (RayUnavailable, RayRejected) as error:
            log.warning(
                "could not stop Ray job %s (a later pass stops it if it runs): %s", sid, error
            )

    def _apply(self, job: Job, event: Event, detail: str) -> None:
        try:
            updated, previous = self.store.apply(job.id, event, run=job.run, detail=detail)
        except (IllegalTransition, StaleRun):
            return  # another writer got there first
        if updated.state is not previous:
            log.info("job %s: %s → %s (%s)", job.id, previous, updated.state, detail)


def _run_of(sid: str) -> tuple[str, int] | None:
    """``(job id, run)`` of a submission id made by ``submission_id``, else None."""
    job_id, sep, run = sid.removeprefix(SUBMISSION_PREFIX).rpartition("-run")
    if not sid.startswith(SUBMISSION_PREFIX) or not sep or not run.isdigit():
        return None
    return job_id, int(run)


def _failure(ray_job: RayJob) -> str:
    message = (ray_job.message or "no message").strip()
    return f"the Ray job {ray_job.submission_id} failed: {message}"
