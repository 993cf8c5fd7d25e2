"""The policy's weights leaving the learner: for the engines and for ``final/``.

Weights leave in Hugging Face naming with tied tensors once (the embedding,
not ``lm_head``). With N ranks each parameter is gathered on its own
(``DTensor.full_tensor``, a collective every rank takes part in) and only
rank 0 keeps it, so no rank ever holds more than its shard plus one full
parameter, and rank 0 alone writes files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch.distributed.tensor import DTensor


def full_weights(model: torch.nn.Module, *, keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` pairs of ``model``; yields nothing where ``keep`` is false.

    Every rank must exhaust the iterator: with a sharded model each step is a
    collective.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        key = id(params[name]) if name in params else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if keep:
            yield name, full.detach()


def to_safetensors(weights: Iterator[tuple[str, torch.Tensor]], dtype: str | None) -> bytes:
    """Serialize ``weights`` (cloned: tied tensors share storage) as safetensors bytes."""
    target = getattr(torch, dtype) if dtype else None
    tensors = {
        name: (t.to(target) if target else t).contiguous().cpu().clone() for name, t in weights
    }
    return safetensors_bytes(tensors)


def save_pretrained(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None,
    *,
    rank: int,
    sharded: bool,
) -> None:
    """Write ``model`` as a Hugging Face directory from rank 0 (collective if sharded)."""
    if sharded:
        state_dict = dict(full_weights(model, keep=rank == 0))
        if rank != 0:
            return
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
