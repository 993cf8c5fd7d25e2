"""Running the job API: ``ApiServer`` (uvicorn on a background thread, for tests and
embedding) and ``serve()`` (blocking, for ``grpo serve``).

Both bind the socket first, so that with port 0 the real port is known before the app
is built and the drivers are told the right URL to report to.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from reward.server import listen_socket
from services.api.app import create_app
from services.api.settings import ApiSettings

log = logging.getLogger(__name__)


def _server(settings: ApiSettings, port: int) -> uvicorn.Server:
    app = create_app(settings, driver_url=settings.driver_url(port))
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


class ApiServer:
    """The job API on a background thread: ``url = server.start()``, ``server.stop()``."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.url: str | None = None
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket = None

    @property
    def app(self):
        return self.server.config.app if self.server else None

    def start(self, timeout_s: float = 60.0) -> str:
        self._socket = listen_socket(self.settings.host, self.settings.port)
        port = self._socket.getsockname()[1]
        self.server = _server(self.settings, port)
        self._thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [self._socket]},
            daemon=True,
            name="grpo-api",
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the job API failed to start; see the log above")
            time.sleep(0.02)
        self.url = self.settings.driver_url(port)
        return self.url

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._socket is not None:
            self._socket.close()
        self._thread, self._socket = None, None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(settings: ApiSettings) -> None:
    """Serve until interrupted."""
    sock = listen_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    server = _server(settings, port)
    log.info(
        "job API on %s (drivers report to %s)", f"{settings.host}:{port}", settings.driver_url(port)
    )
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        log.info("job API stopped")
    finally:
        sock.close()
