"""How a weight update reaches the engines: one interface, two transports.

The pool drives every update the same way (:meth:`RolloutPool.update_weights`):

1. ``staged = transport.stage(update, spec)`` once per update (validate, publish);
2. ``transport.load(actors, staged, version)`` starts loading into those engine
   actors together and returns one Ray reference per actor, each resolving to
   the engine's new version once it has loaded (the pool calls it again with a
   single actor to retry one engine);
3. ``transport.finish(staged)`` once every engine has answered: the transport
   settles its own side of the update;
4. for an engine that has to be replaced, ``transport.restore(staged, version)``
   gives the keyword arguments with which a fresh engine loads the current
   weights *before* it serves.

- :class:`ObjectStoreTransport` (default, CPU and GPU): the update is safetensors
  bytes (:mod:`rollout.weights`); the pool puts them into the Ray object store
  once and hands every engine the same ``ObjectRef``. Replacements load from
  the same reference, which the pool keeps until the next update.
- :class:`BroadcastTransport`: the learner's rank 0 broadcasts the tensors to
  every engine worker over a weight-sync process group (gloo on CPU, NCCL on
  GPU; :mod:`rollout.broadcast`). The update argument is ``None``: the sender
  holds the weights, and the transport asks it to send through a
  :class:`rollout.broadcast.SenderLink`.
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rollout.broadcast import SenderLink
from rollout.weights import CheckpointSpec, WeightUpdateError, read_header, validate_update

logger = logging.getLogger(__name__)


class WeightTransport(ABC):
    """Moves weight updates from the learner side into the pool's engines."""

    name: str = "abstract"

    @abstractmethod
    def stage(self, update: Any, spec: CheckpointSpec | None) -> Any:
        """Validate ``update`` (against ``spec`` when known) and make it sendable.

        Raises :class:`rollout.weights.WeightUpdateError` for a malformed update."""

    @abstractmethod
    def load(self, actors: Sequence[Any], staged: Any, version: int) -> list[Any]:
        """Start loading ``staged`` into these engine actors; one Ray reference each."""

    def finish(self, staged: Any) -> None:  # noqa: B027 - optional hook
        """Called once every engine has loaded (or refused) ``staged``."""

    @abstractmethod
    def restore(self, staged: Any, version: int) -> dict[str, Any]:
        """Constructor keyword arguments that start a replacement engine at ``version``."""


class ObjectStoreTransport(WeightTransport):
    """Safetensors bytes through the Ray object store (one ``ray.put`` per update)."""

    name = "object_store"

    def stage(self, update: Any, spec: CheckpointSpec | None) -> Any:
        import ray

        if isinstance(update, ray.ObjectRef):
            return update  # validated by each engine before it changes anything
        if not isinstance(update, bytes | bytearray | memoryview):
            raise TypeError(
                "ObjectStoreTransport sends safetensors bytes or a Ray ObjectRef to them, "
                f"got {type(update).__name__}; serialize with rollout.serialize_weights"
            )
        if spec is not None:
            validate_update(read_header(update), spec)
        return ray.put(bytes(update))

    def load(self, actors: Sequence[Any], staged: Any, version: int) -> list[Any]:
        return [actor.load_weights.remote(staged, version) for actor in actors]

    def restore(self, staged: Any, version: int) -> dict[str, Any]:
        return {"weights": staged, "weights_version": version}


@dataclass
class _Broadcast:
    """One broadcast update: the sender's calls of each ``load`` attempt, in order."""

    attempts: list[list[Any]] = field(default_factory=list)
    members: list[Any] = field(default_factory=list)


class BroadcastTransport(WeightTransport):
    """The learner's sender broadcasts to every engine worker (``rollout.broadcast``).

    ``sender`` reaches the learner's :class:`~rollout.broadcast.BroadcastSender`
    (e.g. :class:`~rollout.broadcast.ActorSenderLink`). ``workers_per_engine`` is
    each engine's vLLM world size (its tensor-parallel size): every worker is a
    rank of its own. A group is opened for the engines of a ``load`` call and
    kept while the same engines take updates successfully; a replaced engine, a
    retry or a failed update makes the next ``load`` open a fresh group (new
    prefix, same store). Before the sender starts, the transport waits (up to
    ``ready_timeout_s``) until every engine has finished the calls queued before
    the update, so the sender's timeout only counts the transfer itself.

    A replacement engine loads the current version through the object store:
    the sender keeps the last version it sent and serves it as safetensors bytes
    (``SenderLink.snapshot``); the replacement joins the group at the next update.
    """

    name = "broadcast"

    def __init__(
        self, sender: SenderLink, *, workers_per_engine: int = 1, ready_timeout_s: float = 600.0
    ) -> None:
        if workers_per_engine < 1:
            raise ValueError(f"workers_per_engine must be at least 1, got {workers_per_engine}")
        self.sender = sender
        self.workers_per_engine = workers_per_engine
        self.ready_timeout_s = ready_timeout_s
        self._members: list[Any] | None = None  # engines of the group in good standing
        self.groups_opened = 0

    def stage(self, update: Any, spec: CheckpointSpec | None) -> Any:
        if update is not None:
            raise TypeError(
                "BroadcastTransport takes the weights from the learner's sender: pass None "
                f"as the update, not {type(update).__name__}"
            )
        return _Broadcast()

    def load(self, actors: Sequence[Any], staged: Any, version: int) -> list[Any]:
        import ray

        actors = list(actors)
        group = self._new_group(len(actors)) if actors != self._members else None
        self._members = None  # in good standing again only once finish() saw it work
        staged.members = actors
        idle = [actor.get_weights_version.remote() for actor in actors]
        ray.wait(idle, num_returns=len(idle), timeout=self.ready_timeout_s)
        calls = []
        if group is not None:
            calls.append(self.sender.open(group["prefix"], group["world_size"]))
        refs = [
            actor.load_broadcast.remote(version, self._rank_of(group, i))
            for i, actor in enumerate(actors)
        ]
        calls.append(self.sender.send(version))
        staged.attempts.append(calls)
        return refs

    def finish(self, staged: Any) -> None:
        # The engines' outcome is the update's (the pool has it); the sender's calls
        # only decide whether the last group stays in good standing.
        timeout = self.sender.endpoint["timeout_s"]
        failed: list[Exception] = []
        for attempt in staged.attempts:
            errors = [_error(ref, timeout) for ref in attempt]
            failed = [e for e in errors if e is not None and not isinstance(e, WeightUpdateError)]
            for error in failed:
                logger.warning("the learner's weight sender failed: %s", error)
        if not failed:
            self._members = staged.members

    def restore(self, staged: Any, version: int) -> dict[str, Any]:
        return {"weights": self.sender.snapshot(version), "weights_version": version}

    def _new_group(self, engines: int) -> dict[str, Any]:
        self.groups_opened += 1
        return {
            **self.sender.endpoint,
            "prefix": f"grpo-weights/{uuid.uuid4().hex[:12]}",
            "world_size": 1 + engines * self.workers_per_engine,
            "workers_per_engine": self.workers_per_engine,
        }

    def _rank_of(self, group: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
        if group is None:
            return None
        return {**group, "rank_offset": 1 + index * self.workers_per_engine}


def _error(ref: Any, timeout_s: float) -> Exception | None:
    """The exception a sender call raised (unwrapped from Ray's), or None."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        ray.get(ref, timeout=timeout_s)
    except RayTaskError as exc:
        return exc.cause if isinstance(exc.cause, Exception) else exc
    except Exception as exc:
        return exc
    return None
