"""Bearer tokens of the job API: the admin token for users, a per-run token for drivers.

Both are HTTP bearer security schemes in the OpenAPI document (``adminToken``,
``jobToken``). Tokens are compared in constant time (``hmac.compare_digest``) and never
logged; the store keeps only a SHA-256 digest of each run's token.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from services.api.jobs import JobService, Unauthorized
from services.api.store import Job, JobNotFound

admin_scheme = HTTPBearer(
    scheme_name="adminToken",
    description="The API's admin token (GRPO_API_TOKEN).",
    auto_error=False,
)
job_scheme = HTTPBearer(
    scheme_name="jobToken",
    description="The token of the job's current run (GRPO_JOB_TOKEN in the driver).",
    auto_error=False,
)
Credentials = HTTPAuthorizationCredentials | None


def unauthorized(reason: str) -> HTTPException:
    return HTTPException(status_code=401, detail=reason, headers={"WWW-Authenticate": "Bearer"})


def _token(credentials: Credentials, who: str) -> str:
    if credentials is None:
        raise unauthorized(f"missing bearer token: send 'Authorization: Bearer <token>' with {who}")
    return credentials.credentials


def admin_auth(token: SecretStr):
    """A dependency that requires the API's admin token."""
    expected = token.get_secret_value().encode()

    def require_admin(credentials: Annotated[Credentials, Depends(admin_scheme)]) -> None:
        given = _token(credentials, "the API's token (GRPO_API_TOKEN)")
        if not hmac.compare_digest(given.encode(), expected):
            raise unauthorized("wrong bearer token: this route takes GRPO_API_TOKEN")

    return require_admin


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
    token = _token(credentials, "the job's token (GRPO_JOB_TOKEN)")
    try:
        return service.authenticate_driver(job_id, token)
    except Unauthorized as error:
        raise unauthorized(str(error)) from None
    except JobNotFound:
        # Answered like a wrong token, so the route does not reveal which jobs exist.
        raise unauthorized("wrong token for this job") from None


DriverJob = Annotated[Job, Depends(driver_job)]
