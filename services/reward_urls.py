"""Where a job's reward requests, and the reward token with them, may go.

``reward.url`` of a job spec must be an absolute ``http://`` or ``https://`` URL whose
host is a plain host name or IP address. The job API admits a submitted spec only when
``reward.url`` has the *origin* (scheme, host and port) of an entry of
``GRPO_API_ALLOWED_REWARD_URLS``, and writes that entry into the run's spec as
``reward.token_url``; the driver sends the reward token only to URLs of that origin
(``may_send_token``). Origins are compared as parsed tuples, never as string
prefixes: ``http://rm.internal.evil.com`` does not match ``http://rm.internal``.
Credentials and query strings in a URL are secrets: ``redact_url`` (``reward.urls``,
so that the reward client uses the same one) hides them wherever a URL is shown or
logged.

Pure functions on strings, imported by the spec, the job API and the driver.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from reward.urls import redact_url

__all__ = ["check_url", "matching_entry", "may_send_token", "origin", "redact_url"]

DEFAULT_PORTS = {"http": 80, "https": 443}
# A DNS name or IPv4 address, or a bracketed IPv6 address: nothing that two URL parsers
# could read differently (no percent-escapes, backslashes or spaces).
_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")

Origin = tuple[str, str, int]


def origin(url: str) -> Origin:
    """``(scheme, host, port)`` of an absolute http(s) URL; ValueError says what is wrong."""
    shown = redact_url(url)
    if any(char.isspace() or not char.isprintable() or char == "\\" for char in url):
        raise ValueError(f"{shown!r} contains spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise ValueError(f"{shown!r} is not a valid URL: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.netloc:
        raise ValueError(f"{shown!r} is not an absolute http:// or https:// URL")
    host_port = parts.netloc.rpartition("@")[2]
    if host_port.startswith("["):
        host = host_port[: host_port.find("]") + 1]
    else:
        host = host_port.partition(":")[0]
    if not _HOST.fullmatch(host.lower()):
        raise ValueError(f"{shown!r}: {host!r} is not a host name or IP address")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown!r} has an invalid port") from None
    return scheme, host.lower(), DEFAULT_PORTS[scheme] if port is None else port


def check_url(url: str) -> str:
    """``url`` itself when ``origin`` accepts it (for field validators)."""
    origin(url)
    return url


def matching_entry(url: str, allowed: Sequence[str]) -> str | None:
    """The first entry of ``allowed`` with the origin of ``url``, or None."""
    wanted = origin(url)
    return next((entry for entry in allowed if origin(entry) == wanted), None)


def may_send_token(url: str, token_url: str | None) -> bool:
    """Whether the reward token may go with a request to ``url``.

    ``token_url`` is the spec's ``reward.token_url``: the job API sets it to the
    allowlist entry that admitted the job, and then only URLs of that origin get the
    token. None (a local ``grpo train``, whose user wrote the spec) trusts ``url``.
    """
    return token_url is None or origin(url) == origin(token_url)
