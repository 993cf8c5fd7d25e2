"""``/v1/jobs/{id}/report``: where a running driver reports (``services.train.reporting``).

These routes take the job's per-run token, not the admin token. Every answer says
whether the job's owner asked it to stop, so the driver learns of a cancel from any
report, or by polling ``GET …/report/cancel``.
"""

from __future__ import annotations

from fastapi import APIRouter

from services.api import models
from services.api.auth import DriverJob, Service

router = APIRouter(
    prefix="/v1/jobs/{job_id}/report",
    tags=["driver"],
    responses={
        401: {"model": models.ErrorBody, "description": "Missing or wrong job token."},
        409: {"model": models.ErrorBody, "description": "The run is over or not current."},
        422: {"model": models.ErrorBody, "description": "Invalid body, one entry per field."},
    },
)


@router.post("/state")
def report_state(body: models.StateReport, job: DriverJob, service: Service) -> models.ReportAck:
    """The driver moved to a state (RUNNING, SUCCEEDED, CANCELLED, FAILED with an error)."""
    return service.report_state(job, body)


@router.post("/metrics")
def report_metrics(
    body: models.MetricsReport, job: DriverJob, service: Service
) -> models.ReportAck:
    """One step's metrics record."""
    return service.report_metrics(job, body)


@router.post("/checkpoints")
def report_checkpoint(
    body: models.CheckpointReport, job: DriverJob, service: Service
) -> models.ReportAck:
    """A checkpoint, or the final model, was written."""
    return service.report_checkpoint(job, body)


@router.get("/cancel")
def cancel_requested(job: DriverJob, service: Service) -> models.ReportAck:
    """Whether the owner asked the job to stop."""
    return service.ack(job.id)
