"""Request observation: every answer timed and reported, every refusal logged once.

`ObserveMiddleware` hands `(scope, status, seconds)` of each HTTP answer to the app's
`observe` callback (its metrics), and logs each refused request (status >= 400) once,
at WARNING, with its method, route and the `detail` of its answer: a client that retries
and then gives up (OpenRLHF ends its run after five failures) leaves the reason in the
service's log. Routes are logged by template (`/openrlhf/{path_token}/get_reward`), so
a secret in a path never reaches the log; characters that are not printable (a newline
in a field name) are escaped, so a request cannot forge log lines. An exception that
escapes the app is logged by the server, not here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

Observer = Callable[[Scope, int, float], None]

_KEPT_BYTES = 2048


def route_template(scope: Scope) -> str | None:
    """The path template of the route that took the request, or None (no route matched)."""
    return getattr(scope.get("route"), "path", None)


class ObserveMiddleware:
    """Reports each answer to `observe` and logs refused requests on `logger`."""

    def __init__(self, app: ASGIApp, *, observe: Observer, logger: logging.Logger) -> None:
        self.app = app
        self.observe = observe
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        answered = False
        body = bytearray()

        async def watch(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            elif message["type"] == "http.response.body" and status >= 400:
                body.extend(message.get("body", b"")[: _KEPT_BYTES - len(body)])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.observe(scope, status, time.perf_counter() - started)
        if answered and status >= 400:
            self._log_refusal(scope, status, bytes(body))

    def _log_refusal(self, scope: Scope, status: int, body: bytes) -> None:
        route = route_template(scope) or scope["path"][:200]
        self.logger.warning(
            "refused %s %s with %d: %s",
            scope["method"], _printable(route), status, _printable(_reason(body)),
        )  # fmt: skip


def _printable(text: str) -> str:
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def _reason(body: bytes) -> str:
    """The `detail` of a JSON error body, else the start of the body as text."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = detail if isinstance(detail, str) else body.decode("utf-8", "replace")
    return text[:500] or "(no body)"
