"""Reward protocol v1: the typed request and response models of the reward service.

This module owns the wire format shared by the service (`reward.app`), its client
(`reward.client`) and remote verifiers that speak v1 (`reward.verifiers.remote`). It
imports nothing but pydantic, so a driver or a user's own service can use it alone.

Request models forbid unknown fields (a misspelt `refrence` is a 422, not a silently
missing reference), refuse text that is not valid Unicode (`ValidUnicode`) and weights
whose sum would overflow (`check_weights`). Response models ignore unknown fields, so
an older client keeps working against a newer service. `checked_results` reads a
service's answer for the items it was sent: a result that breaks the protocol on its
own makes that item unscorable, and keeps the rest of the answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

Status = Literal["ok", "error", "timeout"]

# The keywords the service itself passes to TRL-style functions (and TRL's trainer
# does): a metadata key may not take one of these names.
CALL_KEYWORDS = frozenset(
    {"prompts", "completions", "completion_ids", "reference"}
    | {"trainer_state", "log_extra", "log_metric"}
)


def lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string in ``value`` (dicts and lists as JSON decodes
    them, keys included) that holds a lone UTF-16 surrogate such as ``"\\ud800"``, or
    None. Such a string is not Unicode: it cannot be written as UTF-8."""
    if isinstance(value, str):
        return None if _is_unicode(value) else path or "(text)"
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{_shown(key)}" if path else _shown(key)
            if isinstance(key, str) and not _is_unicode(key):
                return where
            found = lone_surrogate_path(item, where)
            if found is not None:
                return found
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = lone_surrogate_path(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(key: object) -> str:
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")


class ValidUnicode(BaseModel):
    """A body whose every string, mapping keys included, must be valid Unicode: a lone
    surrogate anywhere is a 422 naming where, before any other field is read."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate_path(data)
        if where is not None:
            raise ValueError(
                f"{where}: holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                "valid Unicode; send the text as UTF-8 (pair every surrogate)"
            )
        return data


def check_weights(refs: Sequence[VerifierRef]) -> None:
    """ValueError when the verifiers' weights are so large that their sum overflows."""
    if not math.isfinite(sum(abs(ref.weight) for ref in refs)):
        raise ValueError(
            "the verifiers' weights sum to more than a float can hold; use smaller weights"
        )


class VerifierRef(BaseModel):
    """One verifier applied to an item, with the weight of its reward in the item's sum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1, max_length=200, description="A name listed by `GET /v1/verifiers`."
    )
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
    completion_ids: list[int] | None = Field(
        default=None,
        description="The completion's token ids, passed to TRL-style functions as "
        "`completion_ids` when every item of the batch has them.",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form fields (the dataset's columns): keyword lists of TRL-style "
        "functions, `extra_info` of verl-style ones. No key may be one of "
        f"{sorted(CALL_KEYWORDS)}.",
    )

    @field_validator("metadata")
    @classmethod
    def _no_call_keywords(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(CALL_KEYWORDS.intersection(value))
        if clash:
            raise ValueError(
                f"keys {clash} collide with keywords the service passes to TRL-style "
                "functions; rename those dataset columns (or leave them out of "
                "data.metadata_fields)"
            )
        return value

    @model_validator(mode="after")
    def _weights_fit(self) -> Item:
        check_weights(self.verifiers or ())
        return self


class ScoreRequest(ValidUnicode):
    """Body of `POST /v1/score`."""

    model_config = ConfigDict(extra="forbid")

    items: list[Item] = Field(description="Completions to score; results come back in order.")
    job_id: str | None = Field(default=None, description="Training job the batch belongs to.")
    step: int | None = Field(default=None, ge=0, description="Training step of the batch.")


class StepReward(BaseModel):
    """The reward of one step of a completion (process supervision)."""

    model_config = ConfigDict(frozen=True)

    end: int = Field(ge=0, description="Exclusive character offset of the step's end.")
    reward: float = Field(allow_inf_nan=False)


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


class ScoredItem(Protocol):
    """What `checked_results` needs of an item that was sent: its id and completion."""

    @property
    def id(self) -> str: ...

    @property
    def completion(self) -> str: ...


def checked_results(body: Any, items: Sequence[ScoredItem]) -> list[Result]:
    """The results in a decoded v1 answer `body` to `items`, in order.

    An answer that is not `{"results": [...]}` with one result per item, carrying the
    items' ids in order, raises ValueError: the whole batch failed. A result that breaks
    the protocol on its own (a step reward that is not a finite number, a step that ends
    past its completion, an `ok` without a finite reward) becomes that item's `error`,
    saying which field and why; the other results are kept.
    """
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise ValueError("the answer has no 'results' list")
    if len(results) != len(items):
        raise ValueError(f"{len(results)} result(s) for {len(items)} item(s)")
    return [_checked(raw, item, index) for index, (raw, item) in enumerate(zip(results, items))]


def _checked(raw: Any, item: ScoredItem, index: int) -> Result:
    found = raw.get("id") if isinstance(raw, dict) else None
    if found != item.id:
        raise ValueError(f"result {index} has id {found!r} where {item.id!r} was expected")
    try:
        result = Result.model_validate(raw)
    except ValidationError as error:
        return _broken(item.id, "; ".join(_problem(e) for e in error.errors()))
    for number, step in enumerate(result.step_rewards or ()):
        if step.end > len(item.completion):
            return _broken(
                item.id,
                f"step_rewards.{number}.end: {step.end} is past the end of the completion "
                f"({len(item.completion)} characters)",
            )
    return result


def _problem(error: Any) -> str:
    """``"step_rewards.1.reward: Input should be a finite number (got nan)"``."""
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return message
    shown = repr(error["input"])
    got = f" (got {shown})" if len(shown) <= 40 else ""
    return f"{'.'.join(map(str, error['loc']))}: {message}{got}"


def _broken(item_id: str, problem: str) -> Result:
    return Result(
        id=item_id,
        status="error",
        error="the scoring service's result breaks reward protocol v1, so the item is "
        f"unscorable: {problem}",
    )


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


def _label(value: Any) -> Any:
    """OpenRLHF sends labels as the dataset holds them: a number as its string form, and
    `""` (no label key set) as no label."""
    if isinstance(value, bool):
        raise ValueError("a label must be a string or a number, not a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"a numeric label must be finite, not {value!r}")
        return str(value)
    return None if value == "" else value


Label = Annotated[str | None, BeforeValidator(_label)]


class OpenRLHFRequest(ValidUnicode):
    """Body of `POST /get_reward` (OpenRLHF's remote reward-model format).

    `query[i]` is prompt + completion; `labels[i]` is the reference answer (a number is
    taken as its string form, `""` as no label). Unknown fields are ignored, as OpenRLHF
    versions differ in what else they send.
    """

    model_config = ConfigDict(extra="ignore")

    query: list[str]
    prompts: list[str]
    labels: list[Label] | None = None

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


class FailedItem(BaseModel):
    """One item of an OpenRLHF-format batch that could not be scored."""

    index: int = Field(description="Its position in `query`.")
    status: Status
    error: str | None = None


class OpenRLHFFailure(BaseModel):
    """Body of the 502 answer to `POST /get_reward` when some items could not be scored
    (the format has no per-item status, so nothing is scored rather than a fake reward)."""

    detail: str
    failed: list[int] = Field(description="Indices of the failed items, ascending.")
    errors: list[FailedItem]
