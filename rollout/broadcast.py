"""Weight sync by broadcast: the whole protocol, the sender's half and the receivers'.

The learner's rank 0 (:class:`BroadcastSender`) and every vLLM worker of every
engine (:class:`BroadcastReceiver`, driven by :mod:`rollout.worker_extension`)
form a ``torch.distributed`` process group made for weight sync only: it is
built directly on a ``TCPStore`` that the sender owns (``PrefixStore`` per
group, never the default group), so it is independent of vLLM's own groups and
of any learner FSDP group. The backend follows the device: gloo for CPU
tensors, NCCL for CUDA tensors; the code is the same.

One update, in order, every rank taking part:

1. rank 0 broadcasts a :class:`Header` (version; name, dtype, shape, bucket
   and byte offset of every tensor; bucket sizes) as JSON bytes;
2. every receiver checks it against its model (:func:`rollout.weights.validate_update`,
   plus the version it was told to expect) and the group **agrees**: an
   all-reduce of refusal flags, then the lowest refusing rank's reason to
   everyone. One refusal refuses the update everywhere, before any tensor
   moves (:class:`~rollout.weights.WeightUpdateError`);
3. the tensors move in fixed-size flattened buckets (``bucket_bytes``; a
   tensor larger than that has a bucket of its own): rank 0 packs each bucket
   and broadcasts it asynchronously while it packs the next; receivers
   broadcast into preallocated buffers (kept while the layout stays the same);
4. the group agrees again that every bucket arrived, so a transfer that broke
   half way changes no engine; the receivers then load views into their
   buffers (no copy, no safetensors).

Every collective has the group's timeout: a rank that is gone makes the others
raise :class:`WeightSyncError` instead of hanging. A group is opened for a
fixed membership (``world_size``); when the pool's engines change, the
transport opens a fresh group under a new prefix on the same store.
:class:`ActorSenderLink` is how the driver reaches a sender that lives in a Ray
actor.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from rollout.weights import (
    CheckpointSpec,
    TensorSpec,
    WeightUpdateError,
    dtype_code,
    serialize_weights,
    validate_update,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 16 << 20
DEFAULT_TIMEOUT_S = 120.0
_ALIGN = 64  # byte alignment of each tensor inside a bucket


class WeightSyncError(RuntimeError):
    """A broadcast could not complete (a rank gone or too slow); no engine loaded it."""


# ---------------------------------------------------------------------- header


@dataclass(frozen=True)
class Slot:
    """Where one tensor travels: its bucket and byte offset there."""

    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    bucket: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Header:
    """What rank 0 announces before any tensor moves."""

    version: int
    slots: tuple[Slot, ...]
    buckets: tuple[int, ...]  # bytes per bucket

    def encode(self) -> bytes:
        return json.dumps(
            {
                "version": self.version,
                "buckets": list(self.buckets),
                "slots": [[s.name, s.dtype, list(s.shape), s.bucket, s.offset] for s in self.slots],
            }
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Header:
        import torch

        raw = json.loads(data)
        slots = []
        for name, dtype, shape, bucket, offset in raw["slots"]:
            size = getattr(torch, dtype).itemsize
            for dim in shape:
                size *= dim
            slots.append(Slot(name, dtype, tuple(shape), bucket, offset, size))
        return cls(raw["version"], tuple(slots), tuple(raw["buckets"]))

    @property
    def layout(self) -> tuple:
        """Everything but the version: equal layouts can reuse the same buffers."""
        return self.slots, self.buckets

    def specs(self) -> dict[str, TensorSpec]:
        """The header in :mod:`rollout.weights` terms, for :func:`validate_update`."""
        return {s.name: TensorSpec(dtype_code(s.dtype), s.shape) for s in self.slots}


def plan(named: list[tuple[str, torch.Tensor]], version: int, bucket_bytes: int) -> Header:
    """Lay ``named`` out in buckets of about ``bucket_bytes``, in the given order."""
    slots, buckets, used = [], [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        offset = -(-used // _ALIGN) * _ALIGN
        if not buckets or (used and offset + nbytes > bucket_bytes):
            buckets.append(0)
            offset = 0
        dtype = str(tensor.dtype).removeprefix("torch.")
        slots.append(Slot(name, dtype, tuple(tensor.shape), len(buckets) - 1, offset, nbytes))
        used = offset + nbytes
        buckets[-1] = used
    return Header(version, tuple(slots), tuple(buckets))


def views(header: Header, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of ``header`` as a view into its bucket buffer (uint8)."""
    import torch

    out = {}
    for s in header.slots:
        flat = buffers[s.bucket][s.offset : s.offset + s.nbytes]
        out[s.name] = flat.view(getattr(torch, s.dtype)).view(s.shape)
    return out


# ----------------------------------------------------------------------- group


def node_address() -> str:
    """This node's address as Ray knows it, else loopback (single-machine use)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def _local_address(peer: str, port: int) -> str:
    """The local address that routes to ``peer``: the interface gloo must bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((peer, port))
        return probe.getsockname()[0]


def _store(host: str, port: int, timeout_s: float, *, master: bool) -> Any:
    from torch.distributed import TCPStore

    return TCPStore(
        host, port, is_master=master, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )


class _Group:
    """One rank of one weight-sync process group, and the protocol steps both halves share."""

    def __init__(
        self, store: Any, spec: dict[str, Any], rank: int, device: torch.device, bind: str
    ) -> None:
        from torch.distributed import PrefixStore

        self.spec, self.rank, self.device = spec, rank, device
        self.world = spec["world_size"]
        timeout = timedelta(seconds=spec["timeout_s"])
        prefixed = PrefixStore(spec["prefix"], store)
        with self.guard("joining the group"):
            self.pg = _process_group(prefixed, rank, self.world, timeout, device, bind)

    @contextmanager
    def guard(self, stage: str):
        """Turn a failed or timed-out collective into a :class:`WeightSyncError`."""
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, WeightSyncError):
                raise
            raise WeightSyncError(
                f"weight broadcast failed while {stage} (group {self.spec['prefix']!r}, "
                f"rank {self.rank} of {self.world}, timeout {self.spec['timeout_s']} s): {exc}. "
                "A rank is gone or stalled: the learner's sender or an engine worker; "
                "the pool replaces dead engines and re-forms the group"
            ) from exc

    def bytes_from(self, root: int, data: bytes | None) -> bytes:
        """Broadcast a byte string from ``root`` (length first, then the bytes)."""
        import torch

        length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        length = length.to(self.device)
        self.pg.broadcast(length, root).wait()
        n = int(length.item())
        if data is not None:
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            payload = torch.empty(n, dtype=torch.uint8, device=self.device)
        if n:
            self.pg.broadcast(payload, root).wait()
        return bytes(payload.cpu().numpy())

    def agree(self, refusal: str | None, what: str) -> None:
        """All ranks learn whether any refused; if one did, all raise its reason."""
        import torch

        flags = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(refusal is not None)
        self.pg.allreduce(flags).wait()
        refusing = flags.nonzero().flatten().tolist()
        if not refusing:
            return
        first = refusing[0]
        reason = self.bytes_from(first, refusal.encode() if self.rank == first else None)
        raise WeightUpdateError(f"{what} refused by rank {first}: {reason.decode()}")

    def start(self, buffers: list[torch.Tensor], fill=None) -> list[Any]:
        """Start broadcasting every bucket from rank 0; ``fill(i)`` packs bucket i first."""
        works = []
        for index, buffer in enumerate(buffers):
            if fill is not None:
                fill(index)
            works.append(self.pg.broadcast(buffer, 0))
        return works

    @staticmethod
    def finish(works: list[Any]) -> None:
        for work in works:
            work.wait()


def _process_group(store, rank, world, timeout, device, bind):
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(store, rank, world, options)
    from torch.distributed import ProcessGroupGloo

    options = ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [ProcessGroupGloo.create_device(hostname=bind)]
    return ProcessGroupGloo(store, rank, world, options)


def _allocate(buckets: Iterable[int], device: torch.device) -> list[torch.Tensor]:
    import torch

    return [torch.empty(n, dtype=torch.uint8, device=device) for n in buckets]


# ---------------------------------------------------------------------- sender


class BroadcastSender:
    """Rank 0: owns the store, opens groups, sends updates (lives in the learner process).

    ``host`` is the address engines connect to (default: this Ray node's), ``port``
    0 picks a free one. ``device`` is where buckets live: ``cuda`` makes the group
    NCCL. The bucket buffers are kept between updates (one copy of the weights on
    ``device``) and hold the last version sent, which :meth:`snapshot` serves to a
    replacement engine.
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int = 0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        device: str = "cpu",
    ) -> None:
        import torch

        if bucket_bytes < 1 or timeout_s <= 0:
            raise ValueError("bucket_bytes must be at least 1 and timeout_s positive")
        self.host = host or node_address()
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        self._store = _store(self.host, port, timeout_s, master=True)
        self.port = self._store.port
        self._group: _Group | None = None
        self._header: Header | None = None
        self._buffers: list[torch.Tensor] = []
        self._packed: int | None = None  # version whose tensors the buffers hold

    @property
    def endpoint(self) -> dict[str, Any]:
        """Where receivers connect, and the timeout they use."""
        return {"host": self.host, "port": self.port, "timeout_s": self.timeout_s}

    def open(self, prefix: str, world_size: int) -> None:
        """Open a fresh group of ``world_size`` ranks (this one is 0); returns once all joined."""
        self._group = None  # the previous group is abandoned whatever happens
        spec = {**self.endpoint, "prefix": prefix, "world_size": world_size}
        start = time.perf_counter()
        self._group = _Group(self._store, spec, 0, self.device, self.host)
        logger.info(
            "weight-sync group %r of %d ranks open in %.2f s",
            prefix,
            world_size,
            time.perf_counter() - start,
        )

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> dict:
        """Broadcast ``(name, tensor)`` pairs as ``version``; all-or-nothing.

        Raises :class:`WeightUpdateError` if any receiver refused the header (no
        tensor moved) and :class:`WeightSyncError` if the transfer failed."""
        group = self._group
        if group is None:
            raise WeightSyncError("no weight-sync group is open: call open() first")
        start = time.perf_counter()
        named = list(named_tensors)
        header = plan(named, version, self.bucket_bytes)
        try:
            with group.guard("sending the header"):
                group.bytes_from(0, header.encode())
                group.agree(None, f"weights version {version}")
            self._prepare(header)
            fill = _packer(named, header, self._buffers)
            with group.guard("sending the tensors"):
                works = group.start(self._buffers, fill)
                self._packed = version  # complete even if the transfer fails: snapshot() serves it
                group.finish(works)
                group.agree(None, f"weights version {version}")
        except WeightSyncError:
            self._group = None
            raise
        seconds = time.perf_counter() - start
        size = sum(header.buckets)
        logger.info("sent weights version %d (%.1f MB) in %.3f s", version, size / 1e6, seconds)
        return {
            "version": version,
            "bytes": size,
            "buckets": len(header.buckets),
            "seconds": seconds,
        }

    def snapshot(self, version: int) -> bytes:
        """Safetensors bytes of the last version sent (a replacement engine loads them)."""
        if self._header is None or self._packed != version:
            raise WeightSyncError(
                f"the sender holds weights version {self._packed}, not {version}: "
                "send that version again before replacing an engine"
            )
        cpu = [b.cpu() for b in self._buffers]
        return serialize_weights(views(self._header, cpu).items())

    def _prepare(self, header: Header) -> None:
        if self._header is None or self._header.layout != header.layout:
            self._buffers = _allocate(header.buckets, self.device)
        self._header, self._packed = header, None


def _packer(named: list, header: Header, buffers: list[torch.Tensor]):
    """``fill(i)``: copy the tensors of bucket ``i`` into its buffer."""
    targets = views(header, buffers)
    by_bucket: list[list] = [[] for _ in buffers]
    for (name, tensor), slot in zip(named, header.slots, strict=True):
        by_bucket[slot.bucket].append((targets[name], tensor))

    def fill(bucket: int) -> None:
        for target, tensor in by_bucket[bucket]:
            target.copy_(tensor)

    return fill


# -------------------------------------------------------------------- receiver


class BroadcastReceiver:
    """One engine worker's rank in a weight-sync group (lives in vLLM's worker process)."""

    def __init__(self, spec: dict[str, Any], rank: int, device: torch.device) -> None:
        try:
            bind = _local_address(spec["host"], spec["port"])
            self._store = _store(spec["host"], spec["port"], spec["timeout_s"], master=False)
        except (OSError, RuntimeError) as exc:
            raise WeightSyncError(
                f"cannot reach the learner's weight-sync store at {spec['host']}:{spec['port']} "
                f"within {spec['timeout_s']} s: {exc}; is the learner running, and is that "
                "address reachable from this node?"
            ) from exc
        self._group = _Group(self._store, spec, rank, device, bind)
        self._layout: tuple | None = None
        self._buffers: list[torch.Tensor] = []

    def receive(self, spec: CheckpointSpec, version: int) -> list[tuple[str, torch.Tensor]]:
        """Take one update; return the ``(name, view)`` pairs to load, in send order.

        Raises :class:`WeightUpdateError` when any rank refused the header and
        :class:`WeightSyncError` when the transfer failed; either way nothing is
        returned to load."""
        group = self._group
        with group.guard("receiving the header"):
            header = Header.decode(group.bytes_from(0, None))
            names, refusal = _check(header, spec, version)
            group.agree(refusal, f"weights version {header.version}")
        if self._layout != header.layout:
            self._buffers = _allocate(header.buckets, group.device)
            self._layout = header.layout
        with group.guard("receiving the tensors"):
            group.finish(group.start(self._buffers))
            group.agree(None, f"weights version {version}")
        tensors = views(header, self._buffers)
        return [(name, tensors[name]) for name in names]


def _check(header: Header, spec: CheckpointSpec, version: int) -> tuple[list[str], str | None]:
    """The names to load, or the reason this rank refuses the header."""
    if header.version != version:
        return [], f"the engine expects weights version {version}, the sender sent {header.version}"
    try:
        return validate_update(header.specs(), spec), None
    except WeightUpdateError as exc:
        return [], str(exc)


# ------------------------------------------------------------ driver's handle


class SenderLink(Protocol):
    """How the broadcast transport reaches the sender; each call returns a Ray ``ObjectRef``.

    Calls must run in the order they are made (a Ray actor's default)."""

    endpoint: dict[str, Any]

    def open(self, prefix: str, world_size: int) -> Any: ...

    def send(self, version: int) -> Any: ...

    def snapshot(self, version: int) -> Any: ...


class ActorSenderLink:
    """A :class:`SenderLink` to a Ray actor that holds a :class:`BroadcastSender`.

    The actor (a learner actor, composed outside ``rollout``) has four methods:
    ``weight_sender_endpoint()`` → ``sender.endpoint``; ``open_weight_group(prefix,
    world_size)`` → ``sender.open(...)``; ``send_weights(version)`` →
    ``sender.send(named_weights(), version)``; ``weights_snapshot(version)`` →
    ``sender.snapshot(version)``."""

    def __init__(self, actor: Any, *, timeout_s: float = 60.0) -> None:
        import ray

        self.actor = actor
        self.endpoint = ray.get(actor.weight_sender_endpoint.remote(), timeout=timeout_s)

    def open(self, prefix: str, world_size: int) -> Any:
        return self.actor.open_weight_group.remote(prefix, world_size)

    def send(self, version: int) -> Any:
        return self.actor.send_weights.remote(version)

    def snapshot(self, version: int) -> Any:
        return self.actor.weights_snapshot.remote(version)
