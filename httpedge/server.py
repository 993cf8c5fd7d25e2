"""Serving an app with uvicorn: `ThreadedServer` (a background thread, for embedding and
tests) and `serve()` (blocking, for the CLI).

Both listen on a socket made here first, with TCP_NODELAY set: Linux copies the option
to accepted connections, so no answer waits on Nagle's algorithm and a delayed ACK
(about 40 ms per request on loopback). Binding first also means that with port 0 the
real port is known before the app is built: `build_app(port)` gets it (the job API
tells its drivers where to report).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp

logger = logging.getLogger(__name__)

AppBuilder = Callable[[int], ASGIApp]


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket with TCP_NODELAY (inherited by accepted sockets)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn(app: ASGIApp, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    return uvicorn.Server(config)


class ThreadedServer:
    """An app on a background thread: `url = server.start()`, `server.stop()`; also a
    context manager. `port` is the real port once started."""

    def __init__(
        self, build_app: AppBuilder, *, host: str, port: int, log_level: str, name: str
    ) -> None:
        self.build_app = build_app
        self.host, self.port = host, port
        self.log_level, self.name = log_level, name
        self.url: str | None = None
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def app(self) -> ASGIApp | None:
        return self.server.config.app if self.server else None

    def start(self, timeout_s: float = 120.0) -> str:
        """Listen, build the app, serve; returns the base URL once the app is up."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        self._socket = listen_socket(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        try:
            self.server = _uvicorn(self.build_app(self.port), self.log_level)
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, name=self.name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} failed to start; see the log above")
            time.sleep(0.02)
        self.url = http_url(self.host, self.port)
        logger.info("%s listening on %s", self.name, self.url)
        return self.url

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving (the app's lifespan closes what it holds) and release the port."""
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("%s thread did not stop within %.0f s", self.name, timeout_s)
        if self._socket is not None:
            self._socket.close()
        self.server, self._thread, self._socket = None, None, None

    def __enter__(self) -> ThreadedServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(build_app: AppBuilder, *, host: str, port: int, log_level: str, name: str) -> None:
    """Serve until interrupted: Ctrl-C returns normally, SIGTERM ends the process after a
    graceful shutdown."""
    sock = listen_socket(host, port)
    try:
        server = _uvicorn(build_app(sock.getsockname()[1]), log_level)
        logger.info("%s listening on %s", name, http_url(host, sock.getsockname()[1]))
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn re-raises Ctrl-C after its graceful shutdown; the shutdown is done.
        logger.info("%s stopped", name)
    finally:
        sock.close()
