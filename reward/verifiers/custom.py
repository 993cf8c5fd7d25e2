"""Custom in-process verifiers: users' functions, called as TRL or verl would call them.

Style `trl` (`TrlVerifier`) is the convention of TRL's `GRPOTrainer`: one call per
batch, by keyword — `prompts=`, `completions=` (strings, or with `conversational`
one-message chat lists `[{"role": "assistant", "content": text}]`), `completion_ids=`
when every item carries token ids, `reference=`, and every metadata key of the batch as
a keyword list (None where an item lacks it). It returns one value per item. Style
`verl` (`VerlVerifier`) is verl's `compute_score(data_source=, solution_str=,
ground_truth=, extra_info=)`, called per item; it returns a number or a dict whose
`score` is the reward (its other keys go to `details`).

`async def` functions are awaited. A None (TRL's "not applicable"), a non-number or a
non-finite number makes that item `error`, never 0. In style `trl` an exception or a
result of the wrong length fails the batch; in style `verl` a raising item fails alone.
Calls run in threads with a deadline (`custom_timeout_s`, for a whole batch); an
overrun is `timeout` (Python cannot stop the thread, which finishes alone). Functions
are named by import path in the service's settings only, never in a request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import importlib
import inspect
import logging
import math
import numbers
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from reward.errors import ConfigurationError
from reward.settings import CustomVerifierSettings
from reward.verifiers.base import VerifierInput, VerifierOutput

logger = logging.getLogger(__name__)


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


def call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """`fn(**kwargs)`, awaiting the result when `fn` is async (in this worker thread)."""
    value = fn(**kwargs)
    if inspect.isawaitable(value):
        value = asyncio.run(_awaited(value))
    return value


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value


def custom_verifier(
    name: str, config: CustomVerifierSettings, *, timeout_s: float, threads: cf.ThreadPoolExecutor
) -> TrlVerifier | VerlVerifier:
    """The verifier of `config.style` around the function at `config.path`."""
    kind = TrlVerifier if config.style == "trl" else VerlVerifier
    return kind(name, config, timeout_s=timeout_s, threads=threads)


class _CustomVerifier:
    """What both styles share: loading, the description, the deadline, reading a value."""

    kind: Literal["custom"] = "custom"
    needs_reference = False
    step_rewards = False

    def __init__(
        self,
        name: str,
        config: CustomVerifierSettings,
        *,
        timeout_s: float,
        threads: cf.ThreadPoolExecutor,
    ):
        self.name = name
        self.config = config
        self.fn = load_function(name, config.path)
        doc = (getattr(self.fn, "__doc__", None) or "").strip()
        self.description = doc.splitlines()[0] if doc else f"custom function {config.path}"
        self._timeout_s = timeout_s
        self._threads = threads

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _timed_out(self) -> VerifierOutput:
        return VerifierOutput.timed_out(
            f"custom verifier {self.name!r} gave no result within {self._timeout_s:g} s"
        )

    def _raised(self, exc: Exception) -> VerifierOutput:
        return VerifierOutput.failed(
            f"custom verifier {self.name!r} raised {type(exc).__name__}: {exc}"
        )

    def _reward(self, value: Any, details: dict[str, Any] | None = None) -> VerifierOutput:
        if value is None:
            return VerifierOutput.failed(
                f"custom verifier {self.name!r} returned None for this item (not applicable)"
            )
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return VerifierOutput.failed(
                f"custom verifier {self.name!r} returned {value!r}; return a finite number"
            )
        if not math.isfinite(value):
            return VerifierOutput.failed(f"custom verifier {self.name!r} returned {value!r}")
        return VerifierOutput.ok(float(value), details=details)


class TrlVerifier(_CustomVerifier):
    """A TRL reward function: one call per batch, by keyword."""

    def score_batch(
        self, inputs: Sequence[VerifierInput], *, job_id: str | None, step: int | None
    ) -> list[VerifierOutput]:
        if not inputs:
            return []
        future = self._threads.submit(call, self.fn, trl_kwargs(inputs, self.config))
        try:
            values = future.result(timeout=self._timeout_s)
        except cf.TimeoutError:
            logger.warning("custom verifier %r timed out on a batch of %d", self.name, len(inputs))
            return [self._timed_out()] * len(inputs)
        except Exception as exc:
            logger.warning("custom verifier %r raised", self.name, exc_info=exc)
            return [self._raised(exc)] * len(inputs)
        if not isinstance(values, list | tuple) or len(values) != len(inputs):
            count = len(values) if isinstance(values, list | tuple) else type(values).__name__
            message = (
                f"custom verifier {self.name!r} returned {count} value(s) for {len(inputs)} item(s)"
            )
            return [VerifierOutput.failed(message)] * len(inputs)
        return [self._reward(value) for value in values]


def trl_kwargs(inputs: Sequence[VerifierInput], config: CustomVerifierSettings) -> dict[str, Any]:
    """The keyword arguments TRL's trainer would pass for this batch."""
    prompts: list[Any] = [item.prompt for item in inputs]
    completions: list[Any] = [item.completion for item in inputs]
    if config.conversational:
        prompts = [[{"role": "user", "content": text}] for text in prompts]
        completions = [[{"role": "assistant", "content": text}] for text in completions]
    kwargs: dict[str, Any] = {"prompts": prompts, "completions": completions}
    if all(item.completion_ids is not None for item in inputs):
        kwargs["completion_ids"] = [list(item.completion_ids or ()) for item in inputs]
    kwargs["reference"] = [item.reference for item in inputs]
    for key in sorted({key for item in inputs for key in item.metadata}):
        kwargs[key] = [item.metadata.get(key) for item in inputs]
    return kwargs


class VerlVerifier(_CustomVerifier):
    """A verl `compute_score`: one call per item; an item that raises fails alone."""

    def score_batch(
        self, inputs: Sequence[VerifierInput], *, job_id: str | None, step: int | None
    ) -> list[VerifierOutput]:
        futures = [self._threads.submit(call, self.fn, self._kwargs(item)) for item in inputs]
        deadline = time.monotonic() + self._timeout_s
        outputs = [self._collect(future, deadline) for future in futures]
        for future in futures:
            future.cancel()
        failed = [output for output in outputs if output.status != "ok" and output.error]
        if failed:
            logger.warning(
                "custom verifier %r: %d of %d item(s) not scored; first: %s",
                self.name, len(failed), len(outputs), failed[0].error,
            )  # fmt: skip
        return outputs

    def _kwargs(self, item: VerifierInput) -> dict[str, Any]:
        return {
            "data_source": item.metadata.get("data_source", self.config.data_source),
            "solution_str": item.completion,
            "ground_truth": item.reference,
            "extra_info": dict(item.metadata),
        }

    def _collect(self, future: cf.Future, deadline: float) -> VerifierOutput:
        try:
            value = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except cf.TimeoutError:
            return self._timed_out()
        except Exception as exc:
            return self._raised(exc)
        if not isinstance(value, dict):
            return self._reward(value)
        if "score" not in value:
            return VerifierOutput.failed(
                f"custom verifier {self.name!r} returned a dict without 'score': "
                f"{sorted(value)[:10]}"
            )
        details = {str(key): _plain(v) for key, v in value.items() if key != "score"}
        return self._reward(value["score"], details)


def _plain(value: Any) -> Any:
    """`value` as JSON can carry it in `details`: numbers, strings, booleans, None as they
    are (a non-finite or numpy number as a float or its text), anything else as text."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else repr(number)
    return repr(value)
