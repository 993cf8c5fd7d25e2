"""Exceptions of the reward service and its client.

The app maps the request errors to HTTP status codes (`reward.app`); their messages are
written for the caller: they name the limit, the field or the valid choices.
"""

from __future__ import annotations


class RewardError(Exception):
    """Base class of everything the `reward` package raises on purpose."""


class ConfigurationError(RewardError):
    """The service's settings cannot work (raised at startup, never per request)."""


class RequestError(RewardError):
    """A request the service refuses as a whole; `status_code` is the HTTP answer."""

    status_code = 400


class UnknownVerifierError(RequestError):
    """An item names a verifier the service does not have."""

    status_code = 422


class TooManyItemsError(RequestError):
    """A request holds more items than `max_items`."""

    status_code = 413


class BatchFailedError(RewardError):
    """Some items of an OpenRLHF-format batch could not be scored (that format has no
    per-item status, so the whole batch fails rather than report a fake reward)."""

    def __init__(self, failed: list[dict[str, object]]):
        self.failed = failed
        indices = [entry["index"] for entry in failed]
        super().__init__(f"{len(failed)} item(s) could not be scored: indices {indices}")


class RewardClientError(RewardError):
    """The reward service refused a request (4xx) or stayed unreachable after retries."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code
