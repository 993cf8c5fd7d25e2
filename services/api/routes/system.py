"""``/healthz`` (no token) and ``/metrics`` (Prometheus, admin token)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from services.api import models

health_router = APIRouter(tags=["system"])
metrics_router = APIRouter(tags=["system"])


@health_router.get("/healthz")
async def healthz() -> models.Health:
    """Liveness; needs no token."""
    return models.Health()


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        401: {"model": models.ErrorBody, "description": "Missing or wrong token."},
    },
)
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by route and status, jobs by state."""
    registry = request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)
