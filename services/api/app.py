"""The app factory of the job API: store, Ray launcher, background loop, routers, auth,
metrics and error answers, behind the shared HTTP edge (``httpedge``: body limit, UTF-8
check, request log).

``create_app(settings)`` builds everything from ``ApiSettings``; the app's lifespan
starts the scheduler/reconciler loop (unless ``dry``) and stops it. Every route but
``/healthz`` needs a bearer token: the admin token for the user routes and
``/metrics``, the job's own token for the driver's report routes. The OpenAPI
document is not served (it would be a route without a token); it is committed as
``docs/openapi.json`` and built by ``services.api.openapi``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from httpedge import BodyLimitMiddleware, ObserveMiddleware, route_template
from services.api.auth import admin_auth
from services.api.errors import add_error_handlers
from services.api.jobs import JobService
from services.api.launcher import RayLauncher
from services.api.metrics import ApiMetrics
from services.api.reconciler import Reconciler
from services.api.routes import health_router, jobs_router, metrics_router, reports_router
from services.api.settings import ApiSettings
from services.api.store import JobStore

log = logging.getLogger(__name__)

API_VERSION = "1"
DESCRIPTION = """Submit, watch and cancel GRPO training jobs on a Ray cluster.

Every route but `/healthz` needs `Authorization: Bearer <token>`: the API's token
(GRPO_API_TOKEN) for users, the job's own token for the driver's `/report` routes.
Job states: QUEUED → RUNNING → SUCCEEDED | FAILED; QUEUED → CANCELLED | FAILED;
RUNNING → CANCELLING → CANCELLED | FAILED. See docs/api.md."""


def create_app(settings: ApiSettings | None = None, *, driver_url: str | None = None) -> FastAPI:
    """The job API. ``driver_url`` is where drivers reach it (default from settings)."""
    settings = settings or ApiSettings()
    state_dir = settings.state_dir.expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.database_url)
    launcher = None
    reconciler = None
    if not settings.dry:
        launcher = RayLauncher(settings.ray_address, settings.ray_token, state_dir / "runs")
        reconciler = Reconciler(settings, store, launcher, driver_url or settings.driver_url())
    service = JobService(
        settings, store, launcher, wake=reconciler.wake if reconciler else lambda: None
    )
    metrics = ApiMetrics()
    metrics.watch_jobs(store.counts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if reconciler is not None:
            reconciler.start()
        try:
            yield
        finally:
            if reconciler is not None:
                await run_in_threadpool(reconciler.stop)
            store.close()

    app = FastAPI(
        title="grpo job API",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.service = service
    app.state.reconciler = reconciler
    app.state.metrics = metrics
    admin = [Depends(admin_auth(settings.token))]
    app.include_router(health_router)
    app.include_router(jobs_router, dependencies=admin)
    app.include_router(reports_router)
    app.include_router(metrics_router, dependencies=admin)
    add_error_handlers(app)
    # The last middleware added runs first: metrics see every answer, 413s included.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        setting="max_body_bytes",
        env="GRPO_API_MAX_BODY_BYTES",
    )
    app.add_middleware(ObserveMiddleware, observe=_observer(metrics), logger=log)
    if settings.dry:
        log.warning("dry mode: jobs are validated and queued but never launched")
    return app


def _observer(metrics: ApiMetrics):
    """Counts each answer by method, route template and status."""

    def observe(scope: Scope, status: int, seconds: float) -> None:
        route = route_template(scope) or "other"
        metrics.observe_request(scope["method"], route, status, seconds)

    return observe
