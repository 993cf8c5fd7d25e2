"""Reward protocol v1: the typed request and response models of the reward service.

This module owns the wire format shared by the service (`reward.app`), its client
(`reward.client`) and remote verifiers that speak v1 (`reward.verifiers.remote`). It
imports nothing but pydantic, so a driver or a user's own service can use it alone.

Request models forbid unknown fields (a misspelt `refrence` is a 422, not a silently
missing reference). Response models ignore unknown fields, so an older client keeps
working against a newer service.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Status = Literal["ok", "error", "timeout"]


class VerifierRef(BaseModel):
    """One verifier applied to an item, with the weight of its reward in the item's sum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="A name listed by `GET /v1/verifiers`.")
    weight: float = Field(default=1.0, description="Multiplies this verifier's reward.")

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("weight must be a finite number")
        return value


class Item(BaseModel):
    """One completion to score."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Caller's id; echoed in the result.")
    prompt: str = Field(description="The prompt the completion answers.")
    completion: str = Field(description="The generated text (without the prompt).")
    reference: str | None = Field(
        default=None, description="The reference answer, for verifiers that need one."
    )
    verifiers: list[VerifierRef] | None = Field(
        default=None,
        min_length=1,
        description="Verifiers to combine (weighted sum); the service's defaults if absent.",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Free-form fields passed to custom verifiers."
    )


class ScoreRequest(BaseModel):
    """Body of `POST /v1/score`."""

    model_config = ConfigDict(extra="forbid")

    items: list[Item] = Field(description="Completions to score; results come back in order.")
    job_id: str | None = Field(default=None, description="Training job the batch belongs to.")
    step: int | None = Field(default=None, ge=0, description="Training step of the batch.")


class StepReward(BaseModel):
    """The reward of one step of a completion (process supervision)."""

    model_config = ConfigDict(frozen=True)

    end: int = Field(ge=0, description="Exclusive character offset of the step's end.")
    reward: float


class Result(BaseModel):
    """The score of one item. A non-`ok` result never carries a reward."""

    id: str
    status: Status
    reward: float | None = None
    step_rewards: list[StepReward] | None = None
    details: dict[str, Any] | None = None
    error: str | None = None

    @model_validator(mode="after")
    def _reward_iff_ok(self) -> Result:
        if self.status == "ok":
            if self.reward is None or not math.isfinite(self.reward):
                raise ValueError("an 'ok' result needs a finite reward")
        elif self.reward is not None:
            raise ValueError(f"a {self.status!r} result must not carry a reward")
        return self


class ScoreResponse(BaseModel):
    """Body of the answer to `POST /v1/score`: one result per item, in request order."""

    results: list[Result]


class VerifierInfo(BaseModel):
    """What `GET /v1/verifiers` says about one verifier."""

    name: str
    kind: Literal["builtin", "remote", "custom"]
    description: str
    needs_reference: bool = Field(description="Items without `reference` fail with it.")
    step_rewards: bool = Field(description="Whether it reports per-step rewards.")


class VerifiersResponse(BaseModel):
    """Body of `GET /v1/verifiers`."""

    verifiers: list[VerifierInfo]
    default: list[str] = Field(description="Verifiers used for items without `verifiers`.")


class HealthResponse(BaseModel):
    """Body of `GET /healthz`."""

    status: Literal["ok"] = "ok"


class OpenRLHFRequest(BaseModel):
    """Body of `POST /get_reward` (OpenRLHF's remote reward-model format).

    `query[i]` is prompt + completion; `labels[i]` is the reference answer. Unknown
    fields are ignored, as OpenRLHF versions differ in what else they send.
    """

    model_config = ConfigDict(extra="ignore")

    query: list[str]
    prompts: list[str]
    labels: list[str | None] | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> OpenRLHFRequest:
        if len(self.prompts) != len(self.query):
            raise ValueError(
                f"'prompts' has {len(self.prompts)} entries but 'query' has {len(self.query)}"
            )
        if self.labels is not None and len(self.labels) != len(self.query):
            raise ValueError(
                f"'labels' has {len(self.labels)} entries but 'query' has {len(self.query)}"
            )
        return self


class OpenRLHFResponse(BaseModel):
    """Answer to `POST /get_reward`: `rewards` (for advantages), `scores` (OpenRLHF uses them
    for dynamic filtering; equal to `rewards` here) and `extra_logs` (per-item lists, one per
    verifier, which OpenRLHF logs)."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(default_factory=dict)
