"""``/v1/jobs``: submit, list, show, cancel and resume jobs; their metrics, checkpoints,
state history and logs. Every route needs the admin token (added by the app factory)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from services.api import models
from services.api.auth import JobId, Service
from services.api.states import JobState
from services.spec import JobSpec

ERROR = models.ErrorBody
router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    responses={
        401: {"model": ERROR, "description": "Missing or wrong token."},
        422: {"model": ERROR, "description": "Invalid parameters or body, one entry per field."},
    },
)
NOT_FOUND = {404: {"model": ERROR, "description": "No such job."}}
CONFLICT = {409: {"model": ERROR, "description": "The job's state forbids it."}}

Limit = Annotated[int, Query(ge=1, le=500, description="Most items in one page.")]
Cursor = Annotated[
    str | None,
    Query(alias="next", pattern=r"^[0-9]{1,18}$", description="`next` of the previous page."),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Same key and same body: the same job (200); same key, other body: 409.",
    ),
]


@router.post(
    "",
    status_code=201,
    responses={
        200: {"model": models.Job, "description": "The job this Idempotency-Key created before."},
        409: {"model": ERROR, "description": "Key reused with another body, or output.dir in use."},
        413: {"model": ERROR, "description": "Body over GRPO_API_MAX_BODY_BYTES."},
    },
)
def submit_job(
    spec: JobSpec, service: Service, response: Response, idempotency_key: IdempotencyKey = None
) -> models.Job:
    """Validate a job spec (the body is the spec of `grpo train`) and queue the job."""
    job, created = service.submit(spec, idempotency_key)
    if not created:
        response.status_code = 200
    return job


@router.get("")
def list_jobs(
    service: Service,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> models.JobPage:
    """Jobs, newest first."""
    return service.list_jobs(state, limit, cursor)


@router.get("/{job_id}", responses=NOT_FOUND)
def get_job(job_id: JobId, service: Service) -> models.Job:
    """The job: spec (secrets redacted), state, timestamps, step, latest metrics, error."""
    return service.get(job_id)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    responses={
        200: {"model": models.Job, "description": "A QUEUED job, now CANCELLED."},
        **NOT_FOUND,
        **CONFLICT,
    },
)
def cancel_job(job_id: JobId, service: Service, response: Response) -> models.Job:
    """Cancel: a QUEUED job is CANCELLED at once (200); a RUNNING one is CANCELLING (202)
    while its driver checkpoints and exits; a terminal job is 409."""
    job = service.cancel(job_id)
    if job.state is JobState.CANCELLED:
        response.status_code = 200
    return job


@router.post("/{job_id}/resume", status_code=202, responses={**NOT_FOUND, **CONFLICT})
def resume_job(job_id: JobId, service: Service) -> models.Job:
    """Run a FAILED or CANCELLED job again, from its newest checkpoint in output.dir."""
    return service.resume(job_id)


@router.get("/{job_id}/metrics", responses=NOT_FOUND)
def job_metrics(
    job_id: JobId,
    service: Service,
    after_step: Annotated[
        int, Query(ge=-1, le=10**9, description="Only records of later steps.")
    ] = -1,
    limit: Limit = 100,
) -> models.MetricsPage:
    """The job's metrics records in step order, from after `after_step`."""
    return service.metrics(job_id, after_step, limit)


@router.get("/{job_id}/checkpoints", responses=NOT_FOUND)
def job_checkpoints(
    job_id: JobId, service: Service, limit: Limit = 100, cursor: Cursor = None
) -> models.CheckpointPage:
    """Checkpoints and the final model, in the order the driver wrote them."""
    return service.checkpoints(job_id, limit, cursor)


@router.get("/{job_id}/events", responses=NOT_FOUND)
def job_events(
    job_id: JobId, service: Service, limit: Limit = 100, cursor: Cursor = None
) -> models.EventPage:
    """Every change of the job's state, oldest first."""
    return service.events(job_id, limit, cursor)


@router.get(
    "/{job_id}/logs",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Log bytes from `offset`; headers X-Next-Offset and X-Log-Complete. "
            "With follow=true, a chunked stream that ends when the run is over.",
        },
        **NOT_FOUND,
        502: {"model": ERROR, "description": "Ray's job API refused the request."},
        503: {"model": ERROR, "description": "Ray cannot be reached."},
    },
)
def job_logs(
    job_id: JobId,
    service: Service,
    offset: Annotated[int, Query(ge=0, le=2**53, description="Byte offset to start at.")] = 0,
    follow: Annotated[bool, Query(description="Stream until the run is over.")] = False,
    run: Annotated[int | None, Query(ge=1, le=10**6, description="Default: latest.")] = None,
) -> Response:
    """The driver's log (Ray's job log) of a run, from byte `offset`."""
    if follow:
        return StreamingResponse(
            service.follow(job_id, offset, run), media_type="text/plain; charset=utf-8"
        )
    chunk = service.logs(job_id, offset, run)
    return Response(
        chunk.data,
        media_type="text/plain; charset=utf-8",
        headers={
            "X-Next-Offset": str(chunk.next_offset),
            "X-Log-Complete": "true" if chunk.complete else "false",
        },
    )
