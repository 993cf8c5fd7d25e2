"""Bearer tokens of the job API: the admin token for users, a per-run token for drivers.

Both are HTTP bearer security schemes in the OpenAPI document (``adminToken``,
``jobToken``), checked by the shared edge (``httpedge.auth``: constant-time compare).
Tokens are never logged; the store keeps only a SHA-256 digest of each run's token.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from pydantic import SecretStr

from httpedge import Credentials, bearer_auth, bearer_scheme, presented_token, unauthorized
from services.api.jobs import JobService, Unauthorized
from services.api.store import Job

admin_scheme = bearer_scheme("adminToken", "The API's admin token (GRPO_API_TOKEN).")
job_scheme = bearer_scheme(
    "jobToken", "The token of the job's current run (the driver's --token-file)."
)


def admin_auth(token: SecretStr):
    """A dependency that requires the API's admin token."""
    return bearer_auth(token, admin_scheme, "the API's token (GRPO_API_TOKEN)")


def get_service(request: Request) -> JobService:
    return request.app.state.service


Service = Annotated[JobService, Depends(get_service)]
JobId = Annotated[str, Path(max_length=64, description="The job's id, e.g. job-1f2e3d4c5b6a7988.")]


def driver_job(
    service: Service,
    job_id: JobId,
    credentials: Annotated[Credentials, Depends(job_scheme)],
) -> Job:
    """The job whose current run's token the request carries (driver routes)."""
    token = presented_token(credentials, "the run's token (the driver's --token-file)")
    try:
        return service.authenticate_driver(job_id, token)
    except Unauthorized as error:  # the same answer for unknown jobs (JobService)
        raise unauthorized(str(error)) from None


DriverJob = Annotated[Job, Depends(driver_job)]
