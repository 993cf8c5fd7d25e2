"""How a weight update reaches the engines: one interface, two transports.

The pool drives every update the same way (:meth:`RolloutPool.update_weights`):

1. ``staged = transport.stage(update)`` once per update (validate, publish);
2. ``transport.load(actor, staged, version)`` per engine, which returns a Ray
   reference that resolves to the engine's new version once it has loaded;
3. ``transport.dispatched(staged)`` after every engine was asked (a transport
   whose sender must run concurrently with the receivers starts it here);
4. for an engine that has to be replaced, ``transport.restore(staged, version)``
   gives the keyword arguments with which a fresh engine loads the current
   weights *before* it serves.

- :class:`ObjectStoreTransport` (default, CPU and GPU): the update is safetensors
  bytes (:mod:`rollout.weights`); the pool puts them into the Ray object store
  once and hands every engine the same ``ObjectRef``. Replacements load from
  the same reference, which the pool keeps until the next update.
- :class:`NcclTransport` (GPUs; untested until a GPU run proves it): tensors go
  from the learner's GPU to every engine's GPU by NCCL broadcast, through
  vLLM 0.32's weight-transfer API (``init_weight_transfer_engine``,
  ``start_weight_update``/``update_weights``/``finish_weight_update``). See
  docs/rollout.md for the learner's half.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rollout.weights import CheckpointSpec, read_header, validate_update

logger = logging.getLogger(__name__)


class WeightTransport(ABC):
    """Moves weight updates from the learner side into the pool's engines."""

    name: str = "abstract"

    def engine_options(self) -> dict[str, Any]:
        """Extra ``vllm.LLM`` keyword arguments the engines need for this transport."""
        return {}

    @abstractmethod
    def stage(self, update: Any, spec: CheckpointSpec | None) -> Any:
        """Validate ``update`` (against ``spec`` when known) and make it sendable.

        Raises :class:`rollout.weights.WeightUpdateError` for a malformed update."""

    @abstractmethod
    def load(self, actor: Any, staged: Any, version: int) -> Any:
        """Start loading ``staged`` into one engine actor; return its Ray reference."""

    def dispatched(self, staged: Any) -> None:  # noqa: B027 - optional hook
        """Called once every engine has been asked to load ``staged``."""

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

    def load(self, actor: Any, staged: Any, version: int) -> Any:
        return actor.load_weights.remote(staged, version)

    def restore(self, staged: Any, version: int) -> dict[str, Any]:
        return {"weights": staged, "weights_version": version}


@dataclass(frozen=True)
class NcclUpdate:
    """One NCCL update: what the engines must expect, and how to make the learner send.

    ``update_info`` is vLLM's ``NCCLWeightTransferUpdateInfo`` as a dict
    (``names``, ``dtype_names``, ``shapes``, in the learner's send order; the
    learner gets it from ``WeightSource.metadata()``). ``send`` starts the
    learner's broadcast and returns when it is done (e.g.
    ``lambda: ray.get(learner.send_weights.remote())``)."""

    update_info: dict[str, Any]
    send: Callable[[], None]


class NcclTransport(WeightTransport):
    """NCCL broadcast from the learner (rank 0) to every engine (ranks 1..N).

    Untested: this machine has no GPU. Set up once with :meth:`connect`, then pass
    :class:`NcclUpdate` objects to ``RolloutPool.update_weights``. An engine cannot
    rejoin the NCCL group on its own, so a replacement engine needs a fresh
    :meth:`connect` (with every engine and the learner): :meth:`restore` refuses,
    and the pool reports the failure instead of replacing the engine.
    """

    name = "nccl"

    def __init__(
        self,
        master_address: str,
        master_port: int,
        *,
        packed: bool = True,
        packed_buffer_size_bytes: int | None = None,
        packed_num_buffers: int | None = None,
    ) -> None:
        self.master_address = master_address
        self.master_port = master_port
        self.packed = packed
        self.packed_buffer_size_bytes = packed_buffer_size_bytes
        self.packed_num_buffers = packed_num_buffers

    def engine_options(self) -> dict[str, Any]:
        return {"weight_transfer_config": {"backend": "nccl"}}

    def trainer_init_info(self, num_engines: int, tensor_parallel: int = 1) -> dict[str, Any]:
        """Keyword arguments of vLLM's ``NCCLTrainerInitInfo`` for the learner (rank 0)."""
        info: dict[str, Any] = {
            "master_address": self.master_address,
            "master_port": self.master_port,
            "world_size": 1 + num_engines * tensor_parallel,
            "packed": self.packed,
            "rank": 0,
        }
        return info | self._buffers()

    def engine_init_infos(self, num_engines: int, tensor_parallel: int = 1) -> list[dict]:
        """``init_weight_transfer_engine`` payloads, one per engine (distinct ranks)."""
        world = 1 + num_engines * tensor_parallel
        return [
            {
                "master_address": self.master_address,
                "master_port": self.master_port,
                "rank_offset": 1 + i * tensor_parallel,
                "world_size": world,
                "packed": self.packed,
            }
            | self._buffers()
            for i in range(num_engines)
        ]

    def connect(self, actors: Sequence[Any], open_trainer: Callable[[], None]) -> None:
        """Rendezvous: every engine joins the group while ``open_trainer`` opens rank 0."""
        import ray

        infos = self.engine_init_infos(len(actors))
        refs = [a.init_weight_transfer.remote(info) for a, info in zip(actors, infos, strict=True)]
        open_trainer()
        ray.get(refs)

    def stage(self, update: Any, spec: CheckpointSpec | None) -> Any:
        if not isinstance(update, NcclUpdate):
            raise TypeError(f"NcclTransport sends NcclUpdate objects, got {type(update).__name__}")
        names = update.update_info.get("names", [])
        if spec is not None:
            from rollout.weights import TensorSpec

            header = {
                n: TensorSpec(_dtype_code(d), tuple(s))
                for n, d, s in zip(
                    names,
                    update.update_info["dtype_names"],
                    update.update_info["shapes"],
                    strict=True,
                )
            }
            validate_update(header, spec)
        return update

    def load(self, actor: Any, staged: Any, version: int) -> Any:
        return actor.receive_weights.remote(staged.update_info, version)

    def dispatched(self, staged: Any) -> None:
        staged.send()

    def restore(self, staged: Any, version: int) -> dict[str, Any]:
        raise RuntimeError(
            "an engine failed while using the NCCL transport; a replacement cannot join the "
            "existing NCCL group: shut the pool down and start again (or use the object-store "
            "transport, which restores engines on its own)"
        )

    def _buffers(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.packed_buffer_size_bytes is not None:
            out["packed_buffer_size_bytes"] = self.packed_buffer_size_bytes
        if self.packed_num_buffers is not None:
            out["packed_num_buffers"] = self.packed_num_buffers
        return out


_DTYPE_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def _dtype_code(torch_name: str) -> str:
    return _DTYPE_CODES.get(torch_name, torch_name.upper())
