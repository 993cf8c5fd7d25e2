"""Typed request and response bodies of the job API (shared with ``services.client``).

The submit body is ``services.spec.JobSpec`` itself. The driver's reports, like the
spec, refuse text that is not valid Unicode (``reward.protocol.ValidUnicode``).
Timestamps are ISO 8601 (UTC). Lists page with ``limit`` and an opaque ``next``
cursor: pass a page's ``next`` back to get the following page; ``next`` is null on
the last page.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reward.protocol import ValidUnicode
from services.api.states import JobState

_STRICT = ConfigDict(extra="forbid")


class JobSummary(BaseModel):
    """One row of ``GET /v1/jobs``."""

    id: str
    name: str
    state: JobState
    run: int
    """Runs of this job so far: 1, plus one per resume."""
    created_at: datetime
    updated_at: datetime
    step: int | None = None
    """The last step the driver reported metrics for."""
    total_steps: int
    error: str | None = None


class Job(JobSummary):
    """``GET /v1/jobs/{id}``: the job, its spec (secrets redacted) and its progress."""

    spec: dict[str, Any]
    """The spec as the driver gets it: paths resolved, secrets in URLs redacted."""
    output_dir: str
    queued_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    latest_metrics: dict[str, Any] | None = None
    ray_submission_id: str | None = None


class JobPage(BaseModel):
    items: list[JobSummary]
    next: str | None = None


class MetricsPage(BaseModel):
    items: list[dict[str, Any]]
    """Metrics records in step order (the driver's ``metrics.jsonl`` lines)."""
    next: int | None = None
    """Pass as ``after_step`` for the next page; null when this page is the last so far."""


class CheckpointInfo(BaseModel):
    run: int
    step: int
    path: str
    final: bool
    """The trained model (``final/``) rather than a resumable checkpoint."""
    created_at: datetime


class CheckpointPage(BaseModel):
    items: list[CheckpointInfo]
    next: str | None = None


class StateChange(BaseModel):
    run: int
    at: datetime
    event: str
    from_state: JobState
    to_state: JobState
    detail: str | None = None


class EventPage(BaseModel):
    items: list[StateChange]
    next: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorBody(BaseModel):
    detail: str
    errors: list[dict[str, Any]] | None = None


# --------------------------------------------------------------- driver's reports


class StateReport(ValidUnicode):
    """The driver moved to ``state``."""

    model_config = _STRICT

    state: Literal["RUNNING", "SUCCEEDED", "CANCELLED", "FAILED"]
    error: str | None = Field(None, max_length=20_000)


class MetricsReport(ValidUnicode):
    """One metrics record (one step); non-finite numbers are sent as null."""

    model_config = _STRICT

    step: int = Field(ge=0, le=10**9)
    values: dict[str, int | float | None] = Field(max_length=1000)


class CheckpointReport(ValidUnicode):
    """A checkpoint (or the final model) was written at ``path``."""

    model_config = _STRICT

    step: int = Field(ge=0, le=10**9)
    path: str = Field(min_length=1, max_length=4096)
    final: bool = False


class ReportAck(BaseModel):
    """The answer to every report: whether the owner asked the job to stop."""

    state: JobState
    cancel_requested: bool
