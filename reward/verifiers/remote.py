"""The `remote` verifier: a user's scoring service called over HTTP.

The service speaks either our protocol v1 (`POST /v1/score`) or OpenRLHF's remote
reward-model format (`POST /get_reward`). Calls retry with exponential backoff on
connection errors, timeouts, 408, 429 and 5xx, and never on other 4xx. Any failure
(an unreachable service, a non-JSON answer, the wrong number of scores) makes the
affected items `error` (or `timeout`); a failure is never a reward of 0. A v1 result
that breaks the protocol on its own (a NaN step reward, a step past the completion)
fails its item only (`reward.protocol.checked_results`). The host was checked against
the allowlist when the settings were validated; messages show the URL without its
credentials or query (`reward.urls.redact_url`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any, Literal

import httpx

from reward.errors import ConfigurationError
from reward.protocol import checked_results
from reward.settings import RemoteVerifierSettings
from reward.urls import redact_url
from reward.verifiers.base import VerifierInput, VerifierOutput, missing_reference

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429}
_SNIPPET = 200


class _CallFailed(Exception):
    def __init__(self, message: str, *, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


def _snippet(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "…"


class RemoteVerifier:
    """Scores items by calling the service described by a `RemoteVerifierSettings`."""

    kind: Literal["remote"] = "remote"

    def __init__(self, name: str, config: RemoteVerifierSettings):
        self.name = name
        self.config = config
        self.needs_reference = config.needs_reference
        self.step_rewards = config.format == "v1"
        self.shown_url = redact_url(config.endpoint)
        self.description = config.description or f"remote service at {self.shown_url}"
        headers = {}
        if config.token_env:
            token = os.environ.get(config.token_env)
            if not token:
                raise ConfigurationError(
                    f"remote verifier {name!r}: environment variable {config.token_env} "
                    "(its token_env) is not set"
                )
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            timeout=httpx.Timeout(config.timeout_s), headers=headers, follow_redirects=False
        )

    def start(self) -> None:
        return None

    def close(self) -> None:
        self._http.close()

    def score_batch(
        self, inputs: Sequence[VerifierInput], *, job_id: str | None, step: int | None
    ) -> list[VerifierOutput]:
        outputs: list[VerifierOutput] = [missing_reference(self.name)] * len(inputs)
        positions = [
            i
            for i, item in enumerate(inputs)
            if item.reference is not None or not self.needs_reference
        ]
        size = self.config.max_batch
        for first in range(0, len(positions), size):
            chunk = positions[first : first + size]
            results = self._score_chunk([inputs[i] for i in chunk], job_id, step)
            for position, output in zip(chunk, results, strict=True):
                outputs[position] = output
        return outputs

    def _score_chunk(
        self, items: list[VerifierInput], job_id: str | None, step: int | None
    ) -> list[VerifierOutput]:
        try:
            if self.config.format == "v1":
                return self._parse_v1(self._post(self._v1_payload(items, job_id, step)), items)
            return self._parse_openrlhf(self._post(self._openrlhf_payload(items)), items)
        except _CallFailed as exc:
            message = f"remote verifier {self.name!r}: {exc}"
            logger.warning("%s", message)
            if exc.timeout:
                return [VerifierOutput.timed_out(message)] * len(items)
            return [VerifierOutput.failed(message)] * len(items)

    @staticmethod
    def _v1_payload(
        items: list[VerifierInput], job_id: str | None, step: int | None
    ) -> dict[str, Any]:
        payload_items = []
        for item in items:
            entry: dict[str, Any] = {"id": item.id, "prompt": item.prompt}
            entry["completion"] = item.completion
            if item.reference is not None:
                entry["reference"] = item.reference
            if item.metadata:
                entry["metadata"] = dict(item.metadata)
            payload_items.append(entry)
        payload: dict[str, Any] = {"items": payload_items}
        if job_id is not None:
            payload["job_id"] = job_id
        if step is not None:
            payload["step"] = step
        return payload

    @staticmethod
    def _openrlhf_payload(items: list[VerifierInput]) -> dict[str, Any]:
        return {
            "query": [item.prompt + item.completion for item in items],
            "prompts": [item.prompt for item in items],
            "labels": [item.reference if item.reference is not None else "" for item in items],
        }

    def _post(self, payload: dict[str, Any]) -> httpx.Response:
        """POST with bounded retries; returns a 2xx response or raises `_CallFailed`."""
        url = self.shown_url
        attempts = self.config.retries + 1
        failure = _CallFailed("no attempt made")
        for attempt in range(attempts):
            if attempt:
                delay = self.config.backoff_s * 2 ** (attempt - 1)
                logger.info(
                    "remote verifier %r: retry %d in %.2fs (%s)", self.name, attempt, delay, failure
                )
                time.sleep(delay)
            try:
                response = self._http.post(self.config.endpoint, json=payload)
            except httpx.TimeoutException:
                failure = _CallFailed(
                    f"no answer from {url} within {self.config.timeout_s:g} s "
                    f"({attempt + 1} attempt(s))",
                    timeout=True,
                )
                continue
            except httpx.TransportError as exc:
                failure = _CallFailed(f"cannot reach {url}: {type(exc).__name__}: {exc}")
                continue
            if response.is_success:
                return response
            failure = _CallFailed(
                f"{url} answered {response.status_code} after {attempt + 1} attempt(s): "
                f"{_snippet(response)}"
            )
            if response.status_code not in _RETRY_STATUS and response.status_code < 500:
                raise failure
        raise failure

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise _CallFailed(
                f"answered non-JSON ({response.headers.get('content-type')}): {_snippet(response)}"
            ) from exc

    def _parse_v1(
        self, response: httpx.Response, items: list[VerifierInput]
    ) -> list[VerifierOutput]:
        try:
            results = checked_results(self._json(response), items)
        except ValueError as exc:
            raise _CallFailed(f"answered JSON that is not a v1 score response: {exc}") from None
        outputs = []
        for result in results:
            steps = (
                [(s.end, s.reward) for s in result.step_rewards] if result.step_rewards else None
            )
            if result.status == "ok" and result.reward is not None:
                outputs.append(
                    VerifierOutput.ok(result.reward, step_rewards=steps, details=result.details)
                )
            else:
                message = f"remote verifier {self.name!r}: {result.error or result.status}"
                outputs.append(VerifierOutput(result.status, None, None, result.details, message))
        return outputs

    def _parse_openrlhf(
        self, response: httpx.Response, items: list[VerifierInput]
    ) -> list[VerifierOutput]:
        body = self._json(response)
        rewards = body.get("rewards") if isinstance(body, dict) else None
        if not isinstance(rewards, list):
            raise _CallFailed("answered JSON without a 'rewards' list")
        if len(rewards) != len(items):
            raise _CallFailed(f"returned {len(rewards)} reward(s) for {len(items)} item(s)")
        outputs = []
        for value in rewards:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                outputs.append(
                    VerifierOutput.failed(
                        f"remote verifier {self.name!r} returned reward {value!r}"
                    )
                )
            else:
                outputs.append(VerifierOutput.ok(float(value)))
        return outputs
