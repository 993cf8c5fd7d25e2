"""Running the reward service: `RewardServer` (uvicorn on a background thread, for the
driver, tests and benchmarks) and `serve()` (blocking, for `grpo reward serve`).

Both are the shared HTTP edge's servers (`httpedge.server`: a TCP_NODELAY socket, port 0
picks a free port) around `create_app(settings)`; `start()` returns the real URL.
"""

from __future__ import annotations

from pydantic import ValidationError

import httpedge
from reward.app import create_app
from reward.settings import RewardSettings


class RewardServer(httpedge.ThreadedServer):
    """The reward service on a background thread: `url = server.start()`, `server.stop()`
    (which also closes the verifiers and their worker pool)."""

    def __init__(self, settings: RewardSettings | None = None):
        self.settings = settings or RewardSettings()
        super().__init__(
            lambda port: create_app(self.settings),
            host=self.settings.host,
            port=self.settings.port,
            log_level=self.settings.log_level,
            name="reward service",
        )


def serve(host: str | None = None, port: int | None = None) -> None:
    """Run the service until interrupted. Settings come from `GRPO_REWARD_*`; `host`/`port`
    win. Settings that cannot work end the process with their message."""
    overrides = {
        key: value for key, value in {"host": host, "port": port}.items() if value is not None
    }
    try:
        settings = RewardSettings(**overrides)
    except ValidationError as error:
        raise SystemExit(f"reward service: invalid settings: {error}") from None
    httpedge.serve(
        lambda port: create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        name="reward service",
    )
