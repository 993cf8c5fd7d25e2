"""The request-body gate: 413 for bodies over the limit, 422 for bodies that are not UTF-8.

Every body the services take is JSON, and JSON is UTF-8 (RFC 8259), so a body that does
not decode is refused here with a message, before FastAPI would answer it with an
undocumented 400. The limit is checked by Content-Length and by bytes received (a
chunked body has no Content-Length); the body read here is replayed to the app.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from httpedge.errors import error_response


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` (413, naming `setting` and `env`) or not UTF-8 (422)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, setting: str, env: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting
        self.env = env

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, send, f"Content-Length {int(length)}")
            return
        body = await self._read(scope, receive, send)
        if body is None:
            return
        problem = utf8_problem(body)
        if problem is not None:
            errors = [{"loc": ["body"], "msg": problem, "type": "json_invalid"}]
            await error_response(422, f"invalid request: {problem}", errors)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None when the client left or the body was refused as too large."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, send, f"more than {self.max_bytes} bytes")
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope: Scope, send: Send, what: str) -> None:
        detail = (
            f"request body too large: {what}, over {self.setting}={self.max_bytes} "
            f"({self.env}); send a smaller body"
        )
        response = error_response(413, detail)
        response.headers["Connection"] = "close"
        await response(scope, _disconnected, send)


def utf8_problem(body: bytes) -> str | None:
    """Why `body` is not UTF-8, or None if it is."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = body[error.start : error.start + 1].hex()
        return (
            f"the body is not valid UTF-8 (byte 0x{byte} at offset {error.start}); "
            "send JSON encoded as UTF-8"
        )
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}
