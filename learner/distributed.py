"""A learner as one rank of N: the group it joins, the sharding, the split of a batch.

``DistContext`` says which rank a ``Learner`` is and where its group meets.
This module owns what only a group of N > 1 ranks needs: joining the
``torch.distributed`` group (gloo on CPU, NCCL on GPU, with the collective
timeout), wrapping a model with FSDP2 (every decoder layer, then the root),
the deterministic token-balanced split of a batch over ranks, float
reductions over ranks, and the bytes of model state a rank holds. With one
rank nothing here touches ``torch.distributed``: the learner is the plain
single-process code.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Rank ``rank`` of ``world_size`` learners, meeting at ``master_addr:master_port``."""

    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = "auto"
    """``auto``: NCCL when the learner is on a GPU, gloo on CPU."""
    timeout_s: float = 600.0
    """A collective that waits longer than this raises (``collective_timeout_s``)."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank {self.rank} of world_size {self.world_size}: need world_size ≥ 1 "
                "and 0 ≤ rank < world_size"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def join_group(context: DistContext, device: torch.device) -> None:
    """Initialise the default process group of ``context`` (collective: every rank calls it)."""
    if not context.sharded:
        return
    backend = context.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    log.info(
        "learner rank %d/%d joins %s group at %s:%d",
        context.rank,
        context.world_size,
        backend,
        context.master_addr,
        context.master_port,
    )
    dist.init_process_group(
        backend,
        init_method=f"tcp://{context.master_addr}:{context.master_port}",
        rank=context.rank,
        world_size=context.world_size,
        timeout=datetime.timedelta(seconds=context.timeout_s),
    )


def leave_group(context: DistContext) -> None:
    """Destroy the process group that ``join_group`` made, if any."""
    if context.sharded and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 in place: each decoder layer is a unit, the root holds the rest.

    On a GPU parameters are gathered in bf16 and gradients reduced in fp32; on
    CPU everything stays fp32. Gradients are summed over ranks, not averaged:
    every rank's loss is already divided by the global normalizer.
    """
    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Explicit resharding after forward, the root's included: no-grad passes
    # (reference, old log-probs) would otherwise leave the root's full weights behind.
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules Hugging Face marks as not to be split (the decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layers (_no_split_modules); "
            "FSDP needs them to shard the model layer by layer"
        )
    return layers


def split_by_rank(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of each rank's samples, balanced by tokens, the same on every rank.

    Longest first, each sample goes to the rank with the fewest tokens so far
    (ties to the lower rank); each rank's indices stay in batch order. With one
    rank this is ``[range(len(lengths))]``.
    """
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(index)
        loads[rank] += lengths[index]
    return [sorted(shard) for shard in shards]


def all_reduce_floats(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """``values`` summed (or maxed) over ranks, in float64 (collective)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def merge_over_ranks(part: dict) -> dict:
    """The union of every rank's ``part`` (collective; keys must not overlap)."""
    parts: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {key: value for other in parts for key, value in (other or {}).items()}


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank stores of ``tensors`` (its shard of a DTensor)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def state_bytes(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    reference: torch.nn.Module | None,
) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and reference held by this rank."""
    params = list(policy.parameters())
    moments = [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    return {
        "parameters": local_bytes(params),
        "gradients": local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": local_bytes(moments),
        "reference": local_bytes(reference.parameters()) if reference is not None else 0,
    }
