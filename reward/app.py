"""The app factory of the reward service: routers, auth, metrics, and the mapping from
the service's errors to HTTP answers, behind the shared HTTP edge (`httpedge`: bearer
auth, body limit and UTF-8 check, 422 for invalid requests, one log line per refusal).

`create_app(settings)` builds every verifier (so a bad configuration fails here, before
the service listens); the app's lifespan starts them (the math worker pool) and closes
them. Error answers are JSON `{"detail": "..."}` whose message names the problem. With
a token, every route but `/healthz` needs it, and `path_token` opens OpenRLHF's route
at `/openrlhf/<path_token>/get_reward` to clients that cannot send headers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

import httpedge
from reward.errors import BatchFailedError, RequestError
from reward.metrics import RewardMetrics
from reward.routers import (
    UNAUTHORIZED,
    health_router,
    metrics_router,
    openrlhf_path_router,
    openrlhf_router,
    score_router,
    verifiers_router,
)
from reward.scorer import RewardScorer
from reward.settings import RewardSettings

logger = logging.getLogger(__name__)

TOKEN_HINT = "the service's token (GRPO_REWARD_TOKEN)"
token_scheme = httpedge.bearer_scheme("rewardToken", f"The bearer token: {TOKEN_HINT}.")


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
    _include_routers(app, settings)
    _add_error_handlers(app)
    # The last middleware added runs first: metrics see every answer, 413s included.
    app.add_middleware(
        httpedge.BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        setting="max_request_bytes",
        env="GRPO_REWARD_MAX_REQUEST_BYTES",
    )
    app.add_middleware(httpedge.ObserveMiddleware, observe=_observer(metrics), logger=logger)
    return app


def _include_routers(app: FastAPI, settings: RewardSettings) -> None:
    """Every router; with a token, all but health require it (and say so in OpenAPI)."""
    guarded: dict = {}
    if settings.token is not None:
        auth = httpedge.bearer_auth(settings.token, token_scheme, TOKEN_HINT)
        guarded = {"dependencies": [Depends(auth)], "responses": UNAUTHORIZED}
    app.include_router(health_router)
    for router in (score_router, verifiers_router, openrlhf_router, metrics_router):
        app.include_router(router, **guarded)
    if settings.path_token is not None:
        app.include_router(
            openrlhf_path_router,
            dependencies=[Depends(path_token_auth(settings.path_token))],
            responses=UNAUTHORIZED,
        )


def path_token_auth(expected: SecretStr):
    """A dependency that requires the URL's `{path_token}` segment to be `expected`."""

    def require_path_token(
        path_token: Annotated[str, Path(description="The service's GRPO_REWARD_PATH_TOKEN.")],
    ) -> None:
        if not httpedge.same_secret(path_token, expected):
            raise httpedge.unauthorized(
                "wrong path token: this URL takes the service's GRPO_REWARD_PATH_TOKEN "
                "as /openrlhf/<path_token>/get_reward"
            )

    return require_path_token


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return httpedge.error_response(exc.status_code, str(exc))

    @app.exception_handler(BatchFailedError)
    async def batch_failed(request: Request, exc: BatchFailedError) -> JSONResponse:
        content = {
            "detail": f"{exc}; this format has no per-item status, so nothing is scored",
            "failed": [entry["index"] for entry in exc.failed],
            "errors": exc.failed,
        }
        return JSONResponse(status_code=502, content=content)

    httpedge.add_validation_handler(app)


def _observer(metrics: RewardMetrics):
    """Counts each answer by route template ('other' for unknown paths) and status."""

    def observe(scope: Scope, status: int, seconds: float) -> None:
        metrics.observe_request(httpedge.route_template(scope) or "other", status, seconds)

    return observe
