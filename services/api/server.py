"""Running the job API: ``ApiServer`` (uvicorn on a background thread, for tests and
embedding) and ``serve()`` (blocking, for ``grpo serve``).

Both are the shared HTTP edge's servers (``httpedge.server``), which bind the socket
first: with port 0 the real port is known before the app is built, and the drivers are
told the right URL to report to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.types import ASGIApp

import httpedge
from services.api.app import create_app
from services.api.settings import ApiSettings

log = logging.getLogger(__name__)


def _app_builder(settings: ApiSettings) -> Callable[[int], ASGIApp]:
    def build(port: int) -> ASGIApp:
        log.info("drivers report to %s", settings.driver_url(port))
        return create_app(settings, driver_url=settings.driver_url(port))

    return build


class ApiServer(httpedge.ThreadedServer):
    """The job API on a background thread: ``url = server.start()``, ``server.stop()``;
    ``url`` is the address drivers report to."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        super().__init__(
            _app_builder(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            name="job API",
        )

    def start(self, timeout_s: float = 60.0) -> str:
        super().start(timeout_s)
        self.url = self.settings.driver_url(self.port)
        return self.url


def serve(settings: ApiSettings) -> None:
    """Serve until interrupted."""
    httpedge.serve(
        _app_builder(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        name="job API",
    )
