"""HTTP routes of the reward service: one router per resource, no logic in handlers.

Handlers take typed bodies (FastAPI validates them) and hand them to the app's
`RewardScorer`. Scoring handlers are plain `def`s, so they run in the server's thread pool
and never block the event loop; `/healthz` stays fast while batches are being scored.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from reward.metrics import RewardMetrics
from reward.protocol import (
    HealthResponse,
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


score_router = APIRouter(prefix="/v1", tags=["score"])
verifiers_router = APIRouter(prefix="/v1", tags=["verifiers"])
openrlhf_router = APIRouter(tags=["openrlhf"])
health_router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["metrics"])


@score_router.post("/score", response_model=ScoreResponse, response_model_exclude_none=True)
def score(body: ScoreRequest, scorer: Scorer) -> Response:
    """Score a batch of completions; results come back in the order of `items`."""
    return json_response(scorer.score(body))


@verifiers_router.get("/verifiers")
def list_verifiers(scorer: Scorer) -> VerifiersResponse:
    """The verifiers this service offers, and its defaults."""
    return scorer.describe()


@openrlhf_router.post(
    "/get_reward",
    responses={502: {"description": "Some items could not be scored; body lists their indices."}},
)
def get_reward(body: OpenRLHFRequest, scorer: Scorer) -> OpenRLHFResponse:
    """OpenRLHF's remote reward-model format, scored with the default verifiers."""
    return scorer.score_openrlhf(body)


@health_router.get("/healthz")
async def healthz() -> HealthResponse:
    """Liveness; needs no token."""
    return HealthResponse()


@metrics_router.get("/metrics", response_class=Response)
def metrics(registry: Metrics) -> Response:
    """Prometheus metrics of this app."""
    return Response(content=registry.render(), media_type=registry.content_type)
