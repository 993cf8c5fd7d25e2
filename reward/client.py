"""`RewardClient`: what the training driver uses to score completions over HTTP.

It splits a list of items into requests of at most `max_batch`, retries transient
failures (connection errors, timeouts, 408, 429, 5xx) with exponential backoff, raises
`RewardClientError` with the service's message on any other 4xx, and checks that every
answer has one result per item, in order. A result that breaks the protocol on its
own (a NaN step reward, a step past the completion) makes only its item unscorable
(`reward.protocol.checked_results`). Non-`ok` results carry `reward=None`;
`rewards_and_steps` turns them into NaN for the GRPO math. Messages and logs show the
service's URL without its credentials or query (`reward.urls.redact_url`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from reward.errors import RewardClientError
from reward.protocol import (
    Item,
    Result,
    ScoreRequest,
    StepReward,
    VerifiersResponse,
    checked_results,
)
from reward.urls import redact_url

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429}


class RewardClient:
    """Client of a reward service at `url` (e.g. `http://127.0.0.1:8000`)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_batch: int = 256,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_in_flight: int = 4,
    ):
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.shown_url = redact_url(self.url)
        self.max_batch = max_batch
        self.retries = retries
        self.backoff_s = backoff_s
        limits = httpx.Limits(
            max_connections=max_in_flight, max_keepalive_connections=max_in_flight
        )
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, limits=limits
        )
        self._threads = cf.ThreadPoolExecutor(max_in_flight, thread_name_prefix="reward-client")

    def score(
        self,
        items: Sequence[Item | Mapping[str, Any]],
        *,
        job_id: str | None = None,
        step: int | None = None,
    ) -> list[Result]:
        """Results for `items`, in order. Requests of at most `max_batch` items go out up to
        `max_in_flight` at a time, so the service's workers never wait for the next batch."""
        parsed = [item if isinstance(item, Item) else Item.model_validate(item) for item in items]
        batches = [parsed[i : i + self.max_batch] for i in range(0, len(parsed), self.max_batch)]
        if len(batches) == 1:
            return self._score_batch(batches[0], job_id, step)
        answers = self._threads.map(lambda batch: self._score_batch(batch, job_id, step), batches)
        return [result for answer in answers for result in answer]

    def _score_batch(self, batch: list[Item], job_id: str | None, step: int | None) -> list[Result]:
        request = ScoreRequest(items=batch, job_id=job_id, step=step)
        body = request.model_dump_json(exclude_none=True).encode()
        headers = {"Content-Type": "application/json"}
        response = self._request("POST", "/v1/score", content=body, headers=headers)
        return self._results(response, batch)

    def verifiers(self) -> VerifiersResponse:
        return VerifiersResponse.model_validate(self._request("GET", "/v1/verifiers").json())

    def health(self) -> bool:
        """Whether the service answers `/healthz` (one attempt, no retries)."""
        try:
            return self._http.get("/healthz").is_success
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "reward service %s: %s; retry %d in %.1fs",
                    self.shown_url,
                    problem,
                    attempt,
                    delay,
                )
                time.sleep(delay)
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.is_success:
                return response
            problem = f"{method} {path} answered {response.status_code}: {_detail(response)}"
            if response.status_code not in _RETRY_STATUS and response.status_code < 500:
                raise RewardClientError(
                    f"reward service {self.shown_url}: {problem}", response.status_code
                )
        raise RewardClientError(
            f"reward service {self.shown_url} failed after {self.retries + 1} attempt(s): {problem}"
        )

    def _results(self, response: httpx.Response, batch: Sequence[Item]) -> list[Result]:
        try:
            return checked_results(response.json(), batch)
        except ValueError as exc:  # not JSON, or not one result per item in order
            raise RewardClientError(
                f"reward service {self.shown_url} sent an invalid answer: {exc}"
            ) from None


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:500]


def rewards_and_steps(
    results: Sequence[Result],
) -> tuple[list[float], list[list[StepReward] | None]]:
    """Per result: the reward (NaN unless ok) and the step rewards (None unless ok)."""
    rewards = [r.reward if r.status == "ok" and r.reward is not None else math.nan for r in results]
    steps = [r.step_rewards if r.status == "ok" else None for r in results]
    return rewards, steps
