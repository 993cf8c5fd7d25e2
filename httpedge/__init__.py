"""The HTTP edge shared by the reward service and the job API.

It owns what every HTTP service of the project does the same way: bearer-token auth
with a constant-time compare (`auth`), the request-body limit and UTF-8 check
(`body`), error bodies and the 422 answer to invalid requests (`errors`), request
timing and the one WARNING line per refused request (`observe`), and uvicorn on a
TCP_NODELAY socket, blocking or on a background thread (`server`).

It imports only fastapi, starlette, uvicorn, pydantic and the standard library, never
`reward`, `services`, `learner` or `rollout`: both services import it, it imports
neither. Messages that name a setting get its name from the caller.
"""

from __future__ import annotations

from httpedge.auth import (
    Credentials,
    bearer_auth,
    bearer_scheme,
    presented_token,
    same_secret,
    unauthorized,
)
from httpedge.body import BodyLimitMiddleware
from httpedge.errors import ErrorBody, add_validation_handler, error_response
from httpedge.observe import ObserveMiddleware, route_template
from httpedge.server import ThreadedServer, http_url, listen_socket, serve

__all__ = [
    "BodyLimitMiddleware",
    "Credentials",
    "ErrorBody",
    "ObserveMiddleware",
    "ThreadedServer",
    "add_validation_handler",
    "bearer_auth",
    "bearer_scheme",
    "error_response",
    "http_url",
    "listen_socket",
    "presented_token",
    "route_template",
    "same_secret",
    "serve",
    "unauthorized",
]
