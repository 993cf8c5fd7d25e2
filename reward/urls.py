"""How a URL appears in messages and logs: without its secrets.

Credentials (``user:password@``) and query strings (``?key=…``) in a URL are secrets:
an error that quotes a reward service's URL ends up in a job's error, the job API and
logs. ``redact_url`` hides them; the reward client, the remote verifiers and the job
API (through ``services.reward_urls``) show URLs only through it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` with its credentials (``user:password@``) and query string replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
