"""Bearer-token auth: an HTTP bearer security scheme (so the OpenAPI document declares
it) and a dependency that compares the presented token in constant time.

401 answers carry `WWW-Authenticate: Bearer` and a message that says which token the
route takes; tokens are never logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

Credentials = HTTPAuthorizationCredentials | None


def bearer_scheme(name: str, description: str) -> HTTPBearer:
    """A bearer scheme named `name` in OpenAPI; a request without one gets None, not 403."""
    return HTTPBearer(scheme_name=name, description=description, auto_error=False)


def unauthorized(reason: str) -> HTTPException:
    return HTTPException(status_code=401, detail=reason, headers={"WWW-Authenticate": "Bearer"})


def presented_token(credentials: Credentials, who: str) -> str:
    """The bearer token of the request; 401 naming `who` (the token to send) if none."""
    if credentials is None:
        raise unauthorized(f"missing bearer token: send 'Authorization: Bearer <token>' with {who}")
    return credentials.credentials


def same_secret(given: str, expected: SecretStr) -> bool:
    """Constant-time equality of a presented secret and the expected one."""
    return hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


def bearer_auth(token: SecretStr, scheme: HTTPBearer, who: str) -> Callable[..., None]:
    """A dependency that requires `Authorization: Bearer <token>`."""

    def require_token(credentials: Credentials = Depends(scheme)) -> None:  # noqa: B008
        if not same_secret(presented_token(credentials, who), token):
            raise unauthorized(f"wrong bearer token: this route takes {who}")

    return require_token
