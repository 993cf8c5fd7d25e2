"""Where a running driver reports its progress: nowhere, or the job API over HTTP.

The driver calls a ``Reporter`` at each state change, metrics record and
checkpoint, and asks it whether a cancellation was requested. ``NullReporter``
serves ``grpo train``; ``HttpReporter`` serves jobs submitted through the job
API, which passes its URL, the job id and a per-job token in the environment
(so nothing assumes a shared filesystem between the API and the driver).
"""

from __future__ import annotations

from typing import Any


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


def reporter_from_env() -> Reporter:
    """The reporter the environment asks for (the job API sets it); else a null one."""
    return NullReporter()
