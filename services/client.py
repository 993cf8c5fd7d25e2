"""A Python client of the job API: one typed method per endpoint (httpx).

``JobClient()`` reads ``GRPO_API_URL`` (default http://127.0.0.1:8080) and
``GRPO_API_TOKEN``. Errors the API answers become ``JobApiError`` with the status code
and the API's message::

    from services.client import JobClient

    with JobClient() as client:
        job = client.submit(spec)          # a JobSpec, or its mapping
        job = client.wait(job.id)          # until SUCCEEDED, FAILED or CANCELLED
        for record in client.iter_metrics(job.id):
            print(record["step"], record.get("reward/mean"))
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from services.api.models import (
    CheckpointInfo,
    CheckpointPage,
    EventPage,
    Job,
    JobPage,
    JobSummary,
    MetricsPage,
    StateChange,
)
from services.api.states import TERMINAL, JobState
from services.spec import JobSpec

DEFAULT_URL = "http://127.0.0.1:8080"


class JobApiError(RuntimeError):
    """The API refused a request: ``status`` and its ``detail``."""

    def __init__(self, status: int, detail: str, errors: list | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.errors = status, detail, errors or []


@dataclass(frozen=True)
class LogChunk:
    data: bytes
    next_offset: int
    complete: bool


class JobClient:
    """The job API over HTTP."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self.url = (url or os.environ.get("GRPO_API_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("GRPO_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            raise _error(response)
        return response

    # --------------------------------------------------------------- routes

    def health(self) -> bool:
        return self._request("GET", "/healthz").json().get("status") == "ok"

    def submit(self, spec: JobSpec | dict[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Queue a job; with an ``idempotency_key``, a retry returns the same job."""
        body = (
            spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, JobSpec) else spec
        )
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.model_validate(
            self._request("POST", "/v1/jobs", json=body, headers=headers).json()
        )

    def list_jobs(
        self, *, state: JobState | str | None = None, limit: int = 50, next: str | None = None
    ) -> JobPage:
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = str(JobState(state))
        if next is not None:
            params["next"] = next
        return JobPage.model_validate(self._request("GET", "/v1/jobs", params=params).json())

    def iter_jobs(self, *, state: JobState | str | None = None) -> Iterator[JobSummary]:
        cursor = None
        while True:
            page = self.list_jobs(state=state, limit=200, next=cursor)
            yield from page.items
            if page.next is None:
                return
            cursor = page.next

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def resume(self, job_id: str) -> Job:
        return Job.model_validate(self._request("POST", f"/v1/jobs/{job_id}/resume").json())

    def metrics(self, job_id: str, *, after_step: int = -1, limit: int = 100) -> MetricsPage:
        params = {"after_step": after_step, "limit": limit}
        response = self._request("GET", f"/v1/jobs/{job_id}/metrics", params=params)
        return MetricsPage.model_validate(response.json())

    def iter_metrics(self, job_id: str, *, after_step: int = -1) -> Iterator[dict[str, Any]]:
        """Every metrics record so far, in step order."""
        while True:
            page = self.metrics(job_id, after_step=after_step, limit=500)
            yield from page.items
            if page.next is None:
                return
            after_step = page.next

    def checkpoints(self, job_id: str) -> list[CheckpointInfo]:
        items, cursor = [], None
        while True:
            params = {"limit": 500, **({"next": cursor} if cursor else {})}
            response = self._request("GET", f"/v1/jobs/{job_id}/checkpoints", params=params)
            page = CheckpointPage.model_validate(response.json())
            items.extend(page.items)
            if page.next is None:
                return items
            cursor = page.next

    def events(self, job_id: str) -> list[StateChange]:
        items, cursor = [], None
        while True:
            params = {"limit": 500, **({"next": cursor} if cursor else {})}
            response = self._request("GET", f"/v1/jobs/{job_id}/events", params=params)
            page = EventPage.model_validate(response.json())
            items.extend(page.items)
            if page.next is None:
                return items
            cursor = page.next

    def logs(self, job_id: str, *, offset: int = 0, run: int | None = None) -> LogChunk:
        """The run's log from byte ``offset`` (the latest run by default)."""
        params: dict[str, Any] = {"offset": offset, **({"run": run} if run else {})}
        response = self._request("GET", f"/v1/jobs/{job_id}/logs", params=params)
        return LogChunk(
            response.content,
            int(response.headers["X-Next-Offset"]),
            response.headers.get("X-Log-Complete") == "true",
        )

    def follow_logs(
        self, job_id: str, *, offset: int = 0, run: int | None = None
    ) -> Iterator[bytes]:
        """The run's log as it grows, until the run is over."""
        params: dict[str, Any] = {
            "offset": offset,
            "follow": "true",
            **({"run": run} if run else {}),
        }
        with self._http.stream(
            "GET", f"/v1/jobs/{job_id}/logs", params=params, timeout=None
        ) as response:
            if response.is_error:
                response.read()
                raise _error(response)
            yield from response.iter_bytes()

    def prometheus(self) -> str:
        return self._request("GET", "/metrics").text

    # -------------------------------------------------------------- helpers

    def wait(
        self,
        job_id: str,
        *,
        states: frozenset[JobState] = TERMINAL,
        timeout_s: float = 3600.0,
        poll_s: float = 1.0,
    ) -> Job:
        """Poll until the job is in one of ``states`` (default: any terminal state)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job.state in states:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout_s:.0f} s")
            time.sleep(poll_s)


def _error(response: httpx.Response) -> JobApiError:
    try:
        body = response.json()
        detail, errors = str(body.get("detail", body)), body.get("errors")
    except ValueError:
        detail, errors = response.text[:1000] or response.reason_phrase, None
    return JobApiError(response.status_code, detail, errors)
