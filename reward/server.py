"""Running the reward service: `RewardServer` (uvicorn in a background thread, for the
driver, tests and benchmarks) and `serve()` (blocking, for `grpo reward serve`).

Both listen on a socket made here with TCP_NODELAY set: Linux copies the option to the
accepted connections, so no response waits on Nagle's algorithm and a delayed ACK (about
40 ms per request on loopback). Port 0 picks a free port; `start()` reports the real one.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from reward.app import create_app
from reward.settings import RewardSettings

logger = logging.getLogger(__name__)


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


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(settings: RewardSettings) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings),
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


class RewardServer:
    """The reward service on a background thread: `url = server.start()`, `server.stop()`."""

    def __init__(self, settings: RewardSettings | None = None):
        self.settings = settings or RewardSettings()
        self.url: str | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def start(self, timeout_s: float = 120.0) -> str:
        """Start listening; returns the base URL (with the real port if port was 0)."""
        if self._thread is not None:
            raise RuntimeError("RewardServer already started")
        self._server = _uvicorn_server(self.settings)
        self._socket = listen_socket(self.settings.host, self.settings.port)
        port = self._socket.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="reward-server",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("reward service failed to start; see the log above")
            time.sleep(0.02)
        self.url = _url(self.settings.host, port)
        logger.info("reward service listening on %s", self.url)
        return self.url

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving, close the verifiers (worker pool) and release the port."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("reward service thread did not stop within %.0f s", timeout_s)
        if self._socket is not None:
            self._socket.close()
        self._server, self._thread, self._socket = None, None, None

    def __enter__(self) -> RewardServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(host: str | None = None, port: int | None = None) -> None:
    """Run the service until interrupted (Ctrl-C returns normally; SIGTERM ends the process
    after a graceful shutdown). Settings come from `GRPO_REWARD_*`; `host`/`port` win."""
    overrides = {
        key: value for key, value in {"host": host, "port": port}.items() if value is not None
    }
    settings = RewardSettings(**overrides)
    server = _uvicorn_server(settings)
    sock = listen_socket(settings.host, settings.port)
    logger.info("reward service on %s", _url(settings.host, sock.getsockname()[1]))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn re-raises Ctrl-C after its graceful shutdown; the shutdown is done.
        logger.info("reward service stopped")
    finally:
        sock.close()
