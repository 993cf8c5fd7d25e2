"""Rollout: vLLM engines that sample groups of completions and take new weights.

- :class:`RolloutConfig` — the job spec's ``rollout`` section.
- :class:`GroupRequest`, :class:`SamplingSpec`, :class:`RolloutRecord` — data in and out.
- :class:`RolloutEngine` — one vLLM engine, a plain class (no Ray).
- :class:`RolloutPool` — N engines in Ray actors: spreading, weight sync, health.
- :func:`serialize_weights` — the weight-update byte format (safetensors).
- :mod:`rollout.lora` — LoRA adapters as weight updates (``lora=`` of the engine and pool).
- :class:`ObjectStoreTransport`, :class:`BroadcastTransport` — how updates travel;
  :class:`BroadcastSender` (the learner's half of a broadcast), :class:`ActorSenderLink`
  (the driver's handle on it), :class:`WeightSyncError`.

Importing this package imports neither vLLM nor Ray: the engine and the pool
load them when they are used. It never imports ``learner``, ``reward`` or
``services``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rollout.config import RolloutConfig
from rollout.records import GroupRequest, RolloutRecord, SamplingSpec
from rollout.weights import WeightUpdateError, deserialize_weights, serialize_weights

if TYPE_CHECKING:
    from rollout.broadcast import ActorSenderLink, BroadcastSender, WeightSyncError
    from rollout.engine import RolloutEngine
    from rollout.pool import EngineFailure, GenerationHandle, RolloutPool
    from rollout.transport import BroadcastTransport, ObjectStoreTransport, WeightTransport

_LAZY = {
    "RolloutEngine": "rollout.engine",
    "RolloutPool": "rollout.pool",
    "GenerationHandle": "rollout.pool",
    "EngineFailure": "rollout.pool",
    "WeightTransport": "rollout.transport",
    "ObjectStoreTransport": "rollout.transport",
    "BroadcastTransport": "rollout.transport",
    "BroadcastSender": "rollout.broadcast",
    "ActorSenderLink": "rollout.broadcast",
    "WeightSyncError": "rollout.broadcast",
}

__all__ = [
    "ActorSenderLink",
    "BroadcastSender",
    "BroadcastTransport",
    "EngineFailure",
    "GenerationHandle",
    "GroupRequest",
    "ObjectStoreTransport",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutPool",
    "RolloutRecord",
    "SamplingSpec",
    "WeightSyncError",
    "WeightTransport",
    "WeightUpdateError",
    "deserialize_weights",
    "serialize_weights",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
