"""The durable store of the job API: jobs, their state history, metrics and checkpoints.

SQLAlchemy 2 on SQLite by default (a file under the API's state directory) or any
database by URL (Postgres in production). Everything a user can see survives a
restart of the API: the job and its spec, each change of state, every metrics record
and checkpoint the driver reported. The ``leases`` table lets replicas of the API on
one database agree on which of them runs the scheduler (``take_lease``).

A job's state is only ever written by ``JobStore.apply``, which runs the one
transition function of ``services.api.states`` and writes the result with a
compare-and-set (``UPDATE … WHERE state = old AND run = run``), so concurrent writers
(request threads, the scheduler loop) can never make an illegal transition.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from services.api.states import Event, IllegalTransition, JobState, starts_new_run, transition


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(16), index=True)
    run: Mapped[int] = mapped_column(Integer, default=1)
    spec_json: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    output_dir: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    queued_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    cancel_requested_at: Mapped[float | None] = mapped_column(Float)
    stop_requested_at: Mapped[float | None] = mapped_column(Float)
    step: Mapped[int | None] = mapped_column(Integer)
    latest_metrics_json: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    ray_submission_id: Mapped[str | None] = mapped_column(String(100))
    token_hash: Mapped[str | None] = mapped_column(String(64))


class MetricRow(Base):
    __tablename__ = "metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    run: Mapped[int] = mapped_column(Integer)
    record_json: Mapped[str] = mapped_column(Text)
    at: Mapped[float] = mapped_column(Float)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "path"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    run: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    final: Mapped[bool] = mapped_column(Boolean)
    at: Mapped[float] = mapped_column(Float)


class EventRow(Base):
    __tablename__ = "events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    run: Mapped[int] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)
    event: Mapped[str] = mapped_column(String(16))
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)


class LeaseRow(Base):
    """Who holds a named lease, and until when (seconds since the epoch)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class Job:
    """A job as stored (a detached copy of its row)."""

    seq: int
    id: str
    name: str
    state: JobState
    run: int
    spec: dict[str, Any]
    spec_hash: str
    idempotency_key: str | None
    output_dir: str
    created_at: float
    updated_at: float
    queued_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested_at: float | None
    stop_requested_at: float | None
    step: int | None
    latest_metrics: dict[str, Any] | None
    error: str | None
    ray_submission_id: str | None
    token_hash: str | None

    @classmethod
    def of(cls, row: JobRow) -> Job:
        return cls(
            seq=row.seq,
            id=row.id,
            name=row.name,
            state=JobState(row.state),
            run=row.run,
            spec=json.loads(row.spec_json),
            spec_hash=row.spec_hash,
            idempotency_key=row.idempotency_key,
            output_dir=row.output_dir,
            created_at=row.created_at,
            updated_at=row.updated_at,
            queued_at=row.queued_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            cancel_requested_at=row.cancel_requested_at,
            stop_requested_at=row.stop_requested_at,
            step=row.step,
            latest_metrics=json.loads(row.latest_metrics_json) if row.latest_metrics_json else None,
            error=row.error,
            ray_submission_id=row.ray_submission_id,
            token_hash=row.token_hash,
        )


@dataclass(frozen=True)
class Checkpoint:
    run: int
    step: int
    path: str
    final: bool
    at: float


@dataclass(frozen=True)
class StateEvent:
    seq: int
    run: int
    at: float
    event: str
    from_state: JobState
    to_state: JobState
    detail: str | None


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id


class DuplicateKey(ValueError):
    """Another job was submitted with the same Idempotency-Key."""


class StaleRun(ValueError):
    """A report for a run of the job that is no longer current (or not active)."""


class JobStore:
    """Jobs, state history, metrics and checkpoints in one SQL database."""

    def __init__(self, url: str) -> None:
        sqlite = url.startswith("sqlite")
        database = make_url(url).database
        if sqlite and database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {},
            pool_pre_ping=not sqlite,
        )
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # ------------------------------------------------------------------- jobs

    def create(
        self,
        *,
        job_id: str,
        name: str,
        spec: dict[str, Any],
        spec_hash: str,
        idempotency_key: str | None,
        output_dir: str,
    ) -> Job:
        """A new QUEUED job; ``DuplicateKey`` when the idempotency key is taken."""
        now = time.time()
        row = JobRow(
            id=job_id,
            name=name,
            state=JobState.QUEUED.value,
            run=1,
            spec_json=json.dumps(spec),
            spec_hash=spec_hash,
            idempotency_key=idempotency_key,
            output_dir=output_dir,
            created_at=now,
            updated_at=now,
            queued_at=now,
        )
        try:
            with self._tx() as session:
                session.add(row)
                session.flush()
                session.add(_event_row(job_id, 1, now, "submit", JobState.QUEUED, JobState.QUEUED))
        except IntegrityError:
            if idempotency_key is not None and self.by_key(idempotency_key) is not None:
                raise DuplicateKey(idempotency_key) from None
            raise
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._tx() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == job_id))
            if row is None:
                raise JobNotFound(job_id)
            return Job.of(row)

    def by_key(self, key: str) -> Job | None:
        with self._tx() as session:
            row = session.scalar(select(JobRow).where(JobRow.idempotency_key == key))
            return Job.of(row) if row else None

    def list_jobs(
        self, *, state: JobState | None = None, limit: int = 50, before: int | None = None
    ) -> list[Job]:
        """Newest first; ``before`` is the ``seq`` of the last job of the previous page."""
        query = select(JobRow).order_by(JobRow.seq.desc()).limit(limit)
        if state is not None:
            query = query.where(JobRow.state == state.value)
        if before is not None:
            query = query.where(JobRow.seq < before)
        with self._tx() as session:
            return [Job.of(row) for row in session.scalars(query)]

    def queued(self) -> list[Job]:
        """QUEUED jobs in the order they were queued (FIFO)."""
        query = (
            select(JobRow)
            .where(JobRow.state == JobState.QUEUED.value)
            .order_by(JobRow.queued_at, JobRow.seq)
        )
        with self._tx() as session:
            return [Job.of(row) for row in session.scalars(query)]

    def active(self) -> list[Job]:
        """Jobs handed to Ray (RUNNING or CANCELLING)."""
        states = [JobState.RUNNING.value, JobState.CANCELLING.value]
        query = select(JobRow).where(JobRow.state.in_(states)).order_by(JobRow.seq)
        with self._tx() as session:
            return [Job.of(row) for row in session.scalars(query)]

    def using_output_dir(self, output_dir: str) -> list[Job]:
        """Unfinished jobs that write to ``output_dir``."""
        done = [state.value for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)]
        query = select(JobRow).where(JobRow.output_dir == output_dir, JobRow.state.not_in(done))
        with self._tx() as session:
            return [Job.of(row) for row in session.scalars(query)]

    def nested_output_dirs(self, output_dir: str) -> list[Job]:
        """Jobs, in any state, whose output_dir lies inside ``output_dir`` or holds it."""
        outer = [str(parent) for parent in Path(output_dir).parents]
        inner = JobRow.output_dir.startswith(output_dir.rstrip("/") + "/", autoescape=True)
        query = select(JobRow).where(or_(inner, JobRow.output_dir.in_(outer)))
        with self._tx() as session:
            found = [Job.of(row) for row in session.scalars(query)]
        mine = Path(output_dir)
        # LIKE ignores case on SQLite: keep exact path relations only.
        return [
            job
            for job in found
            if mine != Path(job.output_dir)
            and (Path(job.output_dir).is_relative_to(mine) or mine.is_relative_to(job.output_dir))
        ]

    def counts(self) -> dict[JobState, int]:
        query = select(JobRow.state, func.count()).group_by(JobRow.state)
        with self._tx() as session:
            found = {JobState(state): count for state, count in session.execute(query)}
        return {state: found.get(state, 0) for state in JobState}

    def apply(
        self,
        job_id: str,
        event: Event,
        *,
        run: int | None = None,
        detail: str | None = None,
        **fields: Any,
    ) -> tuple[Job, JobState]:
        """Apply ``event`` (the transition table decides); returns ``(job, previous state)``.

        ``run``, when given, must be the job's current run (else ``StaleRun``). ``fields``
        are written with the new state (e.g. the Ray submission id at launch).
        Raises ``IllegalTransition`` when the event cannot happen in the current state.
        """
        for _ in range(20):
            job = self.get(job_id)
            if run is not None and job.run != run:
                raise StaleRun(f"run {run} of job {job_id} is over; run {job.run} is current")
            new = transition(job.state, event)
            values = self._values(job, event, new, detail, fields)
            now = values["updated_at"]
            with self._tx() as session:
                changed = session.execute(
                    update(JobRow)
                    .where(
                        JobRow.id == job_id,
                        JobRow.state == job.state.value,
                        JobRow.run == job.run,
                    )
                    .values(**values)
                ).rowcount
                if changed and (new is not job.state or starts_new_run(event)):
                    session.add(
                        _event_row(
                            job_id, values.get("run", job.run), now, event, job.state, new, detail
                        )
                    )
            if changed:
                return self.get(job_id), job.state
        raise RuntimeError(f"job {job_id}: too many concurrent updates; try again")

    @staticmethod
    def _values(
        job: Job, event: Event, new: JobState, detail: str | None, fields: dict[str, Any]
    ) -> dict[str, Any]:
        now = time.time()
        values: dict[str, Any] = {"state": new.value, "updated_at": now}
        if starts_new_run(event):
            values.update(
                run=job.run + 1,
                queued_at=now,
                started_at=None,
                finished_at=None,
                cancel_requested_at=None,
                stop_requested_at=None,
                error=None,
                ray_submission_id=None,
                token_hash=None,
            )
        elif new is not job.state:
            if new is JobState.RUNNING:
                values["started_at"] = now
            if new is JobState.CANCELLING:
                values["cancel_requested_at"] = now
            if new.terminal:
                values["finished_at"] = now
            if new is JobState.FAILED:
                values["error"] = detail or "failed"
        values.update(fields)
        return values

    def mark_stop_requested(self, job_id: str, run: int) -> None:
        with self._tx() as session:
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.run == run)
                .values(stop_requested_at=time.time())
            )

    # ----------------------------------------------------------------- leases

    def take_lease(self, name: str, holder: str, duration_s: float) -> bool:
        """Take (or renew) lease ``name`` for ``duration_s`` if it is free, lapsed or
        already ``holder``'s; False while someone else holds it. Each step is one
        compare-and-set, so at most one holder has it at any time (with clocks that
        agree to well within ``duration_s``)."""
        now = time.time()
        with self._tx() as session:
            renewed = session.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.name == name,
                    or_(LeaseRow.holder == holder, LeaseRow.expires_at < now),
                )
                .values(holder=holder, expires_at=now + duration_s)
            ).rowcount
        if renewed:
            return True
        try:
            with self._tx() as session:
                session.add(LeaseRow(name=name, holder=holder, expires_at=now + duration_s))
        except IntegrityError:
            return False  # held by another, or taken by another just now
        return True

    def release_lease(self, name: str, holder: str) -> None:
        """Give lease ``name`` up now if ``holder`` has it."""
        with self._tx() as session:
            session.execute(
                delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder)
            )

    # ------------------------------------------------------- driver's reports

    def add_metrics(self, job_id: str, run: int, record: dict[str, Any]) -> None:
        """Store one metrics record; later steps of an earlier run are dropped (resume)."""
        step = int(record["step"])
        now = time.time()
        with self._tx() as session:
            self._require_active(session, job_id, run)
            session.execute(
                delete(MetricRow).where(MetricRow.job_id == job_id, MetricRow.step >= step)
            )
            session.add(
                MetricRow(job_id=job_id, step=step, run=run, record_json=json.dumps(record), at=now)
            )
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(step=step, latest_metrics_json=json.dumps(record), updated_at=now)
            )

    def add_checkpoint(self, job_id: str, run: int, step: int, path: str, final: bool) -> None:
        now = time.time()
        with self._tx() as session:
            self._require_active(session, job_id, run)
            session.execute(
                delete(CheckpointRow).where(
                    CheckpointRow.job_id == job_id, CheckpointRow.path == path
                )
            )
            session.add(
                CheckpointRow(job_id=job_id, run=run, step=step, path=path, final=final, at=now)
            )

    @staticmethod
    def _require_active(session: Session, job_id: str, run: int) -> None:
        row = session.scalar(select(JobRow).where(JobRow.id == job_id))
        if row is None:
            raise JobNotFound(job_id)
        if row.run != run or not JobState(row.state).active:
            raise StaleRun(
                f"job {job_id} run {run} is not running (current: run {row.run}, {row.state})"
            )

    def metrics(self, job_id: str, *, after_step: int = -1, limit: int = 100) -> list[dict]:
        query = (
            select(MetricRow.record_json)
            .where(MetricRow.job_id == job_id, MetricRow.step > after_step)
            .order_by(MetricRow.step)
            .limit(limit)
        )
        with self._tx() as session:
            return [json.loads(text) for text in session.scalars(query)]

    def checkpoints(
        self, job_id: str, *, limit: int = 100, after: int | None = None
    ) -> list[tuple[int, Checkpoint]]:
        """``(seq, checkpoint)`` in the order they were written."""
        query = (
            select(CheckpointRow)
            .where(CheckpointRow.job_id == job_id)
            .order_by(CheckpointRow.seq)
            .limit(limit)
        )
        if after is not None:
            query = query.where(CheckpointRow.seq > after)
        with self._tx() as session:
            return [
                (r.seq, Checkpoint(run=r.run, step=r.step, path=r.path, final=r.final, at=r.at))
                for r in session.scalars(query)
            ]

    def events(
        self, job_id: str, *, limit: int = 100, after: int | None = None
    ) -> list[StateEvent]:
        query = (
            select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.seq).limit(limit)
        )
        if after is not None:
            query = query.where(EventRow.seq > after)
        with self._tx() as session:
            return [
                StateEvent(
                    seq=r.seq,
                    run=r.run,
                    at=r.at,
                    event=r.event,
                    from_state=JobState(r.from_state),
                    to_state=JobState(r.to_state),
                    detail=r.detail,
                )
                for r in session.scalars(query)
            ]


def _event_row(
    job_id: str,
    run: int,
    at: float,
    event: Event | str,
    old: JobState,
    new: JobState,
    detail: str | None = None,
) -> EventRow:
    return EventRow(
        job_id=job_id,
        run=run,
        at=at,
        event=str(event),
        from_state=old.value,
        to_state=new.value,
        detail=detail,
    )


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


__all__ = [
    "Checkpoint",
    "DuplicateKey",
    "IllegalTransition",
    "Job",
    "JobNotFound",
    "JobStore",
    "StaleRun",
    "StateEvent",
]
