"""Tasks for the deadline-pool tests. Worker processes import this module, so it stays
light (no FastAPI, no uvicorn)."""

from __future__ import annotations

import signal
import time


def sleep_ignoring_alarm(seconds: float) -> float:
    """A task the in-worker deadline cannot interrupt (like C code that ignores signals)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(seconds)
    return seconds


def sleep_then_return(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
