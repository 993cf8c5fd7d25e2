"""The reward service: scores completions over HTTP with pluggable verifiers.

Public names: `create_app`, `RewardSettings`, `RewardServer`, `RewardClient`,
`RewardScorer`, the protocol models (`ScoreRequest`, `Item`, ...), and `serve`. They are
imported lazily (PEP 562), so that `import reward.protocol` or a math worker process
does not pay for FastAPI and uvicorn. This package never imports `learner`, `rollout`
or `services`.

Modules: `protocol` (wire format), `settings`, `scorer` (the work), `app` and `routers`
(HTTP), `server` (uvicorn), `client`, `metrics`, `errors`, `urls` (URLs without
their secrets, for messages) and `verifiers/`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "create_app": "reward.app",
    "RewardSettings": "reward.settings",
    "RemoteVerifierSettings": "reward.settings",
    "RewardServer": "reward.server",
    "serve": "reward.server",
    "RewardClient": "reward.client",
    "rewards_and_steps": "reward.client",
    "RewardScorer": "reward.scorer",
    "RewardError": "reward.errors",
    "RewardClientError": "reward.errors",
    "ConfigurationError": "reward.errors",
    "Item": "reward.protocol",
    "VerifierRef": "reward.protocol",
    "ScoreRequest": "reward.protocol",
    "ScoreResponse": "reward.protocol",
    "Result": "reward.protocol",
    "StepReward": "reward.protocol",
    "VerifierInfo": "reward.protocol",
    "VerifiersResponse": "reward.protocol",
    "OpenRLHFRequest": "reward.protocol",
    "OpenRLHFResponse": "reward.protocol",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reward' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from reward.app import create_app as create_app
    from reward.client import RewardClient as RewardClient
    from reward.client import rewards_and_steps as rewards_and_steps
    from reward.errors import ConfigurationError as ConfigurationError
    from reward.errors import RewardClientError as RewardClientError
    from reward.errors import RewardError as RewardError
    from reward.protocol import Item as Item
    from reward.protocol import OpenRLHFRequest as OpenRLHFRequest
    from reward.protocol import OpenRLHFResponse as OpenRLHFResponse
    from reward.protocol import Result as Result
    from reward.protocol import ScoreRequest as ScoreRequest
    from reward.protocol import ScoreResponse as ScoreResponse
    from reward.protocol import StepReward as StepReward
    from reward.protocol import VerifierInfo as VerifierInfo
    from reward.protocol import VerifierRef as VerifierRef
    from reward.protocol import VerifiersResponse as VerifiersResponse
    from reward.scorer import RewardScorer as RewardScorer
    from reward.server import RewardServer as RewardServer
    from reward.server import serve as serve
    from reward.settings import RemoteVerifierSettings as RemoteVerifierSettings
    from reward.settings import RewardSettings as RewardSettings
