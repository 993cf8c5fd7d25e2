"""The app factory of the reward service: routers, bearer-token auth, body-size limit,
metrics, and the mapping from errors to HTTP answers.

`create_app(settings)` builds every verifier (so a bad configuration fails here, before
the service listens); the app's lifespan starts them (the math worker pool) and closes
them. Error answers are JSON `{"detail": "..."}` whose message names the problem.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reward.errors import BatchFailedError, RequestError
from reward.metrics import RewardMetrics
from reward.routers import (
    health_router,
    metrics_router,
    openrlhf_router,
    score_router,
    verifiers_router,
)
from reward.scorer import RewardScorer
from reward.settings import RewardSettings

logger = logging.getLogger(__name__)

_ROUTES = {"/v1/score", "/v1/verifiers", "/get_reward", "/healthz", "/metrics"}


def create_app(settings: RewardSettings | None = None) -> FastAPI:
    """A FastAPI app speaking reward protocol v1 (and OpenRLHF's `/get_reward`)."""
    settings = settings or RewardSettings()
    metrics = RewardMetrics()
    scorer = RewardScorer(settings, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(scorer.start)
        try:
            yield
        finally:
            await run_in_threadpool(scorer.close)

    public_docs = settings.token is None
    app = FastAPI(
        title="grpo reward service",
        summary="Scores completions with pluggable verifiers (reward protocol v1).",
        lifespan=lifespan,
        docs_url="/docs" if public_docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if public_docs else None,
    )
    app.state.settings = settings
    app.state.scorer = scorer
    app.state.metrics = metrics
    auth = [Depends(bearer_auth(settings.token))] if settings.token is not None else []
    app.include_router(health_router)
    for router in (score_router, verifiers_router, openrlhf_router, metrics_router):
        app.include_router(router, dependencies=auth)
    _add_error_handlers(app)
    # The last middleware added runs first: metrics see every answer, 413s included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def bearer_auth(token: SecretStr):
    """A dependency that requires `Authorization: Bearer <token>` (constant-time compare)."""
    expected = f"Bearer {token.get_secret_value()}".encode()

    def require_token(authorization: str | None = Header(default=None)) -> None:
        if authorization is None:
            reason = "missing Authorization header"
        elif not hmac.compare_digest(authorization.encode(), expected):
            reason = "wrong bearer token"
        else:
            return
        raise HTTPException(
            status_code=401,
            detail=f"{reason}: send 'Authorization: Bearer <token>' with the service's "
            "token (GRPO_REWARD_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )

    return require_token


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)})

    @app.exception_handler(BatchFailedError)
    async def batch_failed(request: Request, exc: BatchFailedError) -> JSONResponse:
        content = {
            "detail": f"{exc}; this format has no per-item status, so nothing is scored",
            "failed": [entry["index"] for entry in exc.failed],
            "errors": exc.failed,
        }
        return JSONResponse(status_code=502, content=content)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        ]
        shown = "; ".join(problems[:10]) + ("; …" if len(problems) > 10 else "")
        errors = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()[:50]
        ]
        return JSONResponse(
            status_code=422, content={"detail": f"invalid request: {shown}", "errors": errors}
        )


class BodyLimitMiddleware:
    """Answers 413 to bodies over `max_bytes`, by Content-Length and by bytes received."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(send, f"Content-Length {int(length)}")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send, f"more than {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, what: str) -> None:
        response = JSONResponse(
            status_code=413,
            content={
                "detail": f"request body too large: {what}, over max_request_bytes="
                f"{self.max_bytes} (GRPO_REWARD_MAX_REQUEST_BYTES); send smaller batches"
            },
            headers={"Connection": "close"},
        )
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class MetricsMiddleware:
    """Counts requests and their latency per route (unknown paths count as 'other')."""

    def __init__(self, app: ASGIApp, metrics: RewardMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.observe_request(route, status, time.perf_counter() - started)
