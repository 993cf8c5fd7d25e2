"""What a verifier is: its input, its output, and the protocol every verifier follows.

A verifier scores a batch of items and returns one `VerifierOutput` per item, in order.
It reports failures as `status="error"` or `"timeout"` with no reward: it never turns a
failure into a reward of 0. Verifiers are deterministic: the same input gives the same
output. Helpers shared by the text verifiers (finding `\\boxed{...}`) live here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Status = Literal["ok", "error", "timeout"]


@dataclass(frozen=True)
class VerifierInput:
    """One item as a verifier sees it."""

    id: str
    prompt: str
    completion: str
    reference: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    completion_ids: Sequence[int] | None = None


@dataclass(frozen=True)
class VerifierOutput:
    """A verifier's verdict on one item; `reward` is set if and only if `status` is ok.

    `step_rewards` are `(end, reward)` pairs, `end` an exclusive character offset into
    the completion.
    """

    status: Status
    reward: float | None = None
    step_rewards: list[tuple[int, float]] | None = None
    details: dict[str, Any] | None = None
    error: str | None = None

    @classmethod
    def ok(
        cls,
        reward: float,
        *,
        step_rewards: list[tuple[int, float]] | None = None,
        details: dict[str, Any] | None = None,
    ) -> VerifierOutput:
        if not math.isfinite(reward):
            return cls.failed(f"verifier produced a non-finite reward {reward!r}")
        return cls("ok", float(reward), step_rewards, details)

    @classmethod
    def failed(cls, error: str, *, details: dict[str, Any] | None = None) -> VerifierOutput:
        return cls("error", None, None, details, error)

    @classmethod
    def timed_out(cls, error: str) -> VerifierOutput:
        return cls("timeout", None, None, None, error)


class Verifier(Protocol):
    """The interface the scorer calls. Implementations must be thread-safe."""

    name: str
    kind: Literal["builtin", "remote", "custom"]
    description: str
    needs_reference: bool
    step_rewards: bool

    def score_batch(
        self, inputs: Sequence[VerifierInput], *, job_id: str | None, step: int | None
    ) -> list[VerifierOutput]: ...

    def start(self) -> None:
        """Acquire what the verifier needs (workers, connections) before the first batch."""

    def close(self) -> None: ...


class FunctionVerifier:
    """A verifier made of a pure per-item function `fn(input) -> VerifierOutput`.

    An exception in `fn` becomes an error for that item only.
    """

    kind: Literal["builtin", "remote", "custom"] = "builtin"

    def __init__(
        self,
        name: str,
        fn: Callable[[VerifierInput], VerifierOutput],
        *,
        description: str,
        needs_reference: bool,
        step_rewards: bool = False,
    ):
        self.name = name
        self.description = description
        self.needs_reference = needs_reference
        self.step_rewards = step_rewards
        self._fn = fn

    def score_batch(
        self, inputs: Sequence[VerifierInput], *, job_id: str | None, step: int | None
    ) -> list[VerifierOutput]:
        return [self._score_one(item) for item in inputs]

    def _score_one(self, item: VerifierInput) -> VerifierOutput:
        if self.needs_reference and item.reference is None:
            return missing_reference(self.name)
        try:
            return self._fn(item)
        except Exception as exc:
            return VerifierOutput.failed(f"{type(exc).__name__}: {exc}")

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None


def missing_reference(name: str) -> VerifierOutput:
    return VerifierOutput.failed(f"verifier {name!r} needs the item's 'reference'")


_BOXED = "\\boxed{"


def last_boxed(text: str) -> tuple[int, int] | None:
    """Span `(start, end)` of the last `\\boxed{...}` in `text` (braces balanced), or None.

    `text[start:end]` is the whole `\\boxed{...}`; the content is `text[start + 7:end - 1]`.
    One right-to-left scan, linear in `len(text)`: the closing braces not yet matched
    wait on a stack, each `{` takes the nearest one, and the first matched `{` that ends
    a `\\boxed{` is the last balanced box.
    """
    closing: list[int] = []
    for pos in range(len(text) - 1, -1, -1):
        char = text[pos]
        if char == "}":
            closing.append(pos)
        elif char == "{" and closing:
            end = closing.pop()
            start = pos - len(_BOXED) + 1
            if start >= 0 and text.startswith(_BOXED, start):
                return start, end + 1
    return None


def boxed_content(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` in `text`, or None."""
    span = last_boxed(text)
    if span is None:
        return None
    start, end = span
    return text[start + len(_BOXED) : end - 1]
