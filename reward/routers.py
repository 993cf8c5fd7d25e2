"""HTTP routes of the reward service: one router per resource, no logic in handlers.

Handlers take typed bodies (FastAPI validates them) and hand them to the app's
`RewardScorer`. Scoring handlers are plain `def`s, so they run in the server's thread
pool and never block the event loop; `/healthz` stays fast while batches are being
scored. Each route declares the error answers it gives, with their bodies, so the
OpenAPI document tells the truth (the app adds 401 where a token is needed).
`/get_reward` is also served under `/openrlhf/{path_token}` when a path token is set.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from httpedge import ErrorBody
from reward.metrics import RewardMetrics
from reward.protocol import (
    HealthResponse,
    OpenRLHFFailure,
    OpenRLHFRequest,
    OpenRLHFResponse,
    ScoreRequest,
    ScoreResponse,
    VerifiersResponse,
)
from reward.scorer import RewardScorer


def get_scorer(request: Request) -> RewardScorer:
    return request.app.state.scorer


def get_metrics(request: Request) -> RewardMetrics:
    return request.app.state.metrics


Scorer = Annotated[RewardScorer, Depends(get_scorer)]
Metrics = Annotated[RewardMetrics, Depends(get_metrics)]


def json_response(model: BaseModel) -> Response:
    """The model as JSON in one pass (FastAPI would validate and serialize it again)."""
    return Response(model.model_dump_json(exclude_none=True), media_type="application/json")


UNAUTHORIZED = {401: {"model": ErrorBody, "description": "Missing or wrong token."}}
BODY_REFUSED = {
    413: {"model": ErrorBody, "description": "Body over max_request_bytes, or over max_items."},
    422: {
        "model": ErrorBody,
        "description": "Not UTF-8 JSON, a missing or unknown field (one entry per field in "
        "`errors`), or an unknown verifier.",
    },
}
BATCH_FAILED = {502: {"model": OpenRLHFFailure, "description": "Some items could not be scored."}}

score_router = APIRouter(prefix="/v1", tags=["score"])
verifiers_router = APIRouter(prefix="/v1", tags=["verifiers"])
openrlhf_router = APIRouter(tags=["openrlhf"])
openrlhf_path_router = APIRouter(prefix="/openrlhf/{path_token}", tags=["openrlhf"])
health_router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["metrics"])


@score_router.post(
    "/score",
    response_model=ScoreResponse,
    response_model_exclude_none=True,
    responses=BODY_REFUSED,
)
def score(body: ScoreRequest, scorer: Scorer) -> Response:
    """Score a batch of completions; results come back in the order of `items`."""
    return json_response(scorer.score(body))


@verifiers_router.get("/verifiers")
def list_verifiers(scorer: Scorer) -> VerifiersResponse:
    """The verifiers this service offers, and its defaults."""
    return scorer.describe()


def get_reward(body: OpenRLHFRequest, scorer: Scorer) -> OpenRLHFResponse:
    """OpenRLHF's remote reward-model format, scored with the default verifiers."""
    return scorer.score_openrlhf(body)


for _router in (openrlhf_router, openrlhf_path_router):
    _router.add_api_route(
        "/get_reward", get_reward, methods=["POST"], responses={**BODY_REFUSED, **BATCH_FAILED}
    )


@health_router.get("/healthz")
async def healthz() -> HealthResponse:
    """Liveness; needs no token."""
    return HealthResponse()


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(registry: Metrics) -> Response:
    """Prometheus metrics of this app."""
    return Response(content=registry.render(), media_type=registry.content_type)
