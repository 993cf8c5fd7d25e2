"""How the job API's errors become HTTP answers: JSON ``{"detail": ..., "errors"?: [...]}``.

404 unknown job; 409 a state that forbids the request (a terminal job, a reused
Idempotency-Key, an output directory in use, a stale run); 422 an invalid spec or
parameter, one entry per field with its location; 503 Ray cannot be reached.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from httpedge import add_validation_handler
from httpedge import error_response as _error
from services.api.jobs import IdempotencyConflict, OutputDirInUse, RunNotFound
from services.api.launcher import RayRejected, RayUnavailable
from services.api.specs import SpecRejected
from services.api.states import IllegalTransition
from services.api.store import JobNotFound, StaleRun

CONFLICTS = (IllegalTransition, IdempotencyConflict, OutputDirInUse, StaleRun)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(JobNotFound)
    async def not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(RunNotFound)
    async def missing(request: Request, exc: RunNotFound) -> JSONResponse:
        return _error(404, str(exc))

    for kind in CONFLICTS:

        @app.exception_handler(kind)
        async def conflict(request: Request, exc: Exception) -> JSONResponse:
            return _error(409, str(exc))

    @app.exception_handler(SpecRejected)
    async def rejected(request: Request, exc: SpecRejected) -> JSONResponse:
        errors = [
            {"loc": list(loc), "msg": msg, "type": "value_error"} for loc, msg in exc.problems
        ]
        return _error(422, f"invalid job spec: {exc}", errors)

    @app.exception_handler(RayUnavailable)
    async def unavailable(request: Request, exc: RayUnavailable) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(RayRejected)
    async def ray_error(request: Request, exc: RayRejected) -> JSONResponse:
        return _error(502, f"Ray's job API answered: {exc}")

    add_validation_handler(app)
