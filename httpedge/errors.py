"""Error answers at the edge: the body every refusal has, and the 422 for invalid requests.

Every error is JSON `{"detail": "<a message naming the problem>", "errors"?: [...]}`;
`errors` lists, for a 422, one `{loc, msg, type}` per invalid field (at most 50), and
`detail` repeats the first ten as `loc: msg`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

_SHOWN = 10
_LISTED = 50


class ErrorBody(BaseModel):
    """The body of every error answer."""

    detail: str = Field(description="What is wrong and what to change.")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="For 422: one `{loc, msg, type}` per invalid field."
    )


def error_response(status: int, detail: str, errors: list | None = None) -> JSONResponse:
    content: dict[str, Any] = {"detail": detail}
    if errors is not None:
        content["errors"] = errors
    return JSONResponse(status_code=status, content=content)


def add_validation_handler(app: FastAPI) -> None:
    """Answer FastAPI's RequestValidationError with a 422 `ErrorBody`, not its default."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        ]
        shown = "; ".join(problems[:_SHOWN]) + ("; …" if len(problems) > _SHOWN else "")
        errors = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()[:_LISTED]
        ]
        return error_response(422, f"invalid request: {shown}", errors)
