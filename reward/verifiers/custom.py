"""Custom in-process verifiers: user functions with TRL's reward-function signature.

`fn(prompts, completions, **kwargs) -> list[float | None]`, where `kwargs` holds
`reference` (a list) and each metadata field of the items as a list (None where an item
lacks it). A None entry, a non-number, or a non-finite number makes that item `error`;
an exception, or a result of the wrong length, makes the whole batch `error`. Functions
are named by import path ("pkg.mod:fn") in the service's settings only, never in a
request. Each call runs in a thread with a deadline (`custom_timeout_s`); a call that
overruns is reported as `timeout` (Python cannot stop the thread, which finishes alone).
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from reward.errors import ConfigurationError
from reward.verifiers.base import VerifierInput, VerifierOutput

logger = logging.getLogger(__name__)

_RESERVED = {"prompts", "completions", "reference"}


def load_function(name: str, path: str) -> Callable[..., Any]:
    """Import `"pkg.mod:attr.attr"`; raise ConfigurationError with the cause otherwise."""
    module_name, _, attr_path = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            target = getattr(target, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"custom verifier {name!r}: cannot import {path!r}: {exc}"
        ) from exc
    if not callable(target):
        raise ConfigurationError(f"custom verifier {name!r}: {path!r} is not callable")
    return target


class CustomVerifier:
    """A TRL-style reward function called in this process."""

    kind: Literal["custom"] = "custom"
    needs_reference = False
    step_rewards = False

    def __init__(self, name: str, path: str, *, timeout_s: float, threads: cf.ThreadPoolExecutor):
        self.name = name
        self.path = path
        self.fn = load_function(name, path)
        doc = (getattr(self.fn, "__doc__", None) or "").strip()
        self.description = doc.splitlines()[0] if doc else f"custom function {path}"
        self._timeout_s = timeout_s
        self._threads = threads

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def score_batch(
        self, inputs: Sequence[VerifierInput], *, job_id: str | None, step: int | None
    ) -> list[VerifierOutput]:
        if not inputs:
            return []
        prompts = [item.prompt for item in inputs]
        completions = [item.completion for item in inputs]
        kwargs = self._kwargs(inputs)
        future = self._threads.submit(self.fn, prompts, completions, **kwargs)
        try:
            values = future.result(timeout=self._timeout_s)
        except cf.TimeoutError:
            message = f"custom verifier {self.name!r} gave no result within {self._timeout_s:g} s"
            logger.warning("%s", message)
            return [VerifierOutput.timed_out(message)] * len(inputs)
        except Exception as exc:
            logger.warning("custom verifier %r raised", self.name, exc_info=True)
            message = f"custom verifier {self.name!r} raised {type(exc).__name__}: {exc}"
            return [VerifierOutput.failed(message)] * len(inputs)
        if not isinstance(values, list | tuple) or len(values) != len(inputs):
            count = len(values) if isinstance(values, list | tuple) else type(values).__name__
            message = (
                f"custom verifier {self.name!r} returned {count} value(s) for {len(inputs)} item(s)"
            )
            return [VerifierOutput.failed(message)] * len(inputs)
        return [self._output(value) for value in values]

    @staticmethod
    def _kwargs(inputs: Sequence[VerifierInput]) -> dict[str, list[Any]]:
        kwargs: dict[str, list[Any]] = {"reference": [item.reference for item in inputs]}
        keys = sorted({key for item in inputs for key in item.metadata} - _RESERVED)
        for key in keys:
            kwargs[key] = [item.metadata.get(key) for item in inputs]
        return kwargs

    def _output(self, value: Any) -> VerifierOutput:
        if value is None:
            return VerifierOutput.failed(
                f"custom verifier {self.name!r} returned None for this item"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return VerifierOutput.failed(f"custom verifier {self.name!r} returned {value!r}")
        return VerifierOutput.ok(float(value))
