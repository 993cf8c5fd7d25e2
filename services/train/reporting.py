"""Where a running driver reports its progress: nowhere, or the job API over HTTP.

The driver calls a ``Reporter`` at each state change, metrics record and
checkpoint, and asks it whether a cancellation was requested. ``NullReporter``
serves ``grpo train``; ``HttpReporter`` serves jobs submitted through the job
API, which passes its URL, the job id and the run number in the environment (so
nothing assumes a shared filesystem between the API and the driver):

- ``GRPO_JOB_API_URL`` — the API's base URL, as the driver reaches it;
- ``GRPO_JOB_ID``, ``GRPO_JOB_RUN`` — which job and run this driver is;

and the run's bearer token for the ``/report`` routes in a file that the driver reads
and deletes (``services.driver --token-file``): the environment of a Ray job is shown
to anyone who can list jobs.

A report that cannot be delivered is retried with capped backoff, then logged and
dropped: training never stops because the API is away (the API reconciles with Ray's
view of the job). While the API is unreachable, metrics and checkpoint reports are
tried once each, so an outage does not slow every step; state reports always retry.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0
ENV_URL, ENV_JOB, ENV_RUN = ("GRPO_JOB_API_URL", "GRPO_JOB_ID", "GRPO_JOB_RUN")


class Reporter:
    """The interface; every method is a no-op here."""

    def state(self, state: str, *, error: str | None = None) -> None:
        """The job moved to ``state`` (RUNNING, SUCCEEDED, CANCELLED, FAILED)."""

    def metrics(self, record: dict[str, Any]) -> None:
        """One metrics record (one step)."""

    def checkpoint(self, step: int, path: str, *, final: bool = False) -> None:
        """A checkpoint (or the final model) was written at ``path``."""

    def cancel_requested(self) -> bool:
        """Whether the job's owner asked it to stop."""
        return False


class NullReporter(Reporter):
    """Reports nothing: a job run directly with ``grpo train``."""


class HttpReporter(Reporter):
    """Reports to the job API's driver routes with the run's token."""

    def __init__(
        self,
        url: str,
        job_id: str,
        token: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        import httpx

        self.base = f"{url.rstrip('/')}/v1/jobs/{job_id}/report"
        self.retries = retries
        self.backoff_s = backoff_s
        self._cancel = False
        self._unreachable = False
        self._http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s)

    def state(self, state: str, *, error: str | None = None) -> None:
        body = {"state": state, "error": error[-20_000:] if error else None}
        # A final state matters most: give the API more time (about a minute) to answer.
        retries = self.retries if state == "RUNNING" else self.retries * 3
        self._send("POST", "/state", body, retries=retries)

    def metrics(self, record: dict[str, Any]) -> None:
        values = {key: _number(value) for key, value in record.items() if key != "step"}
        self._send("POST", "/metrics", {"step": int(record["step"]), "values": values})

    def checkpoint(self, step: int, path: str, *, final: bool = False) -> None:
        self._send("POST", "/checkpoints", {"step": step, "path": path, "final": final})

    def cancel_requested(self) -> bool:
        if not self._cancel:
            self._send("GET", "/cancel", None, retries=0)
        return self._cancel

    def close(self) -> None:
        self._http.close()

    def _send(
        self, method: str, path: str, body: dict | None, *, retries: int | None = None
    ) -> None:
        import httpx

        if retries is None:
            retries = 0 if self._unreachable else self.retries
        for attempt in range(1 + retries):
            try:
                response = self._http.request(method, self.base + path, json=body)
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"
                self._unreachable = True
            else:
                self._unreachable = False
                if response.status_code == 200:
                    self._cancel = self._cancel or bool(response.json().get("cancel_requested"))
                    return
                problem = f"HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code < 500 and response.status_code != 429:
                    break  # the API refused it; retrying will not help
            if attempt < retries:
                time.sleep(min(self.backoff_s * 2**attempt, MAX_BACKOFF_S))
        log.warning("job API did not take %s %s: %s", method, path, problem)


def _number(value: Any) -> int | float | None:
    """JSON has no NaN or infinity: send those (and non-numbers) as null."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def reporter_from_env(token: str | None) -> Reporter:
    """The reporter the environment asks for (the job API sets it) with the run's
    ``token``; else a null one."""
    url, job_id = (os.environ.get(name) for name in (ENV_URL, ENV_JOB))
    if url and job_id and token:
        log.info(
            "reporting to the job API at %s as %s (run %s)",
            url,
            job_id,
            os.environ.get(ENV_RUN, "?"),
        )
        return HttpReporter(url, job_id, token)
    return NullReporter()
