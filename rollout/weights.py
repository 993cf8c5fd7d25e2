"""The weight-update byte format and its validation (pure: torch and safetensors only).

A weight update travels as one **safetensors** file held in memory: the
tensors of the policy in Hugging Face naming (``model.layers.0.self_attn.q_proj.weight``,
...), every one contiguous, with no shared storage. Any producer can make it
(``safetensors.torch.save(state_dict)`` after cloning tied tensors is enough);
:func:`serialize_weights` is the reference implementation.

Before an engine touches its model, the update is checked against the model
directory the engine was started from (:func:`checkpoint_spec`): every name must
be a parameter of that checkpoint, with the same shape and a floating dtype,
and the update must be complete. A complete update matters because vLLM
reloads weights layer by layer: a layer that received only part of its
tensors would be rebuilt with the rest uninitialised. ``lm_head.weight`` may be
absent (or present and then ignored) when the model ties it to the input
embeddings.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TIED_HEAD = "lm_head.weight"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_DTYPE_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
_MAX_LISTED = 5


class WeightUpdateError(ValueError):
    """A weight update was refused before any engine changed its weights."""


@dataclass(frozen=True)
class TensorSpec:
    """Dtype (safetensors code, e.g. ``F32``) and shape of one tensor."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointSpec:
    """What a valid update for one model looks like.

    ``subject`` and ``naming`` word the refusals: what the update is checked
    against, and what names it should carry (a LoRA adapter's spec,
    :func:`rollout.lora.adapter_spec`, has its own)."""

    tensors: dict[str, TensorSpec]
    tied_embeddings: bool
    subject: str = "model"
    naming: str = "Hugging Face parameter names of the model"


def dtype_code(torch_name: str) -> str:
    """The safetensors code of a torch dtype name (``"float32"`` → ``"F32"``)."""
    return _DTYPE_CODES.get(torch_name, torch_name.upper())


def serialize_weights(named_tensors: Mapping[str, torch.Tensor] | Iterable) -> bytes:
    """Safetensors bytes of ``(name, tensor)`` pairs (or a mapping), ready to send.

    Tensors are detached, moved to CPU, made contiguous and cloned whenever two
    names share storage (tied embeddings), which ``safetensors`` refuses
    otherwise.
    """
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in items:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    from safetensors.torch import save

    return save(out)


def deserialize_weights(payload: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a payload made by :func:`serialize_weights`."""
    from safetensors.torch import load

    return load(payload)


def read_header(payload: bytes | memoryview) -> dict[str, TensorSpec]:
    """Names, dtypes and shapes of a safetensors payload, without reading the data."""
    view = memoryview(payload)
    if len(view) < 8:
        raise WeightUpdateError(
            f"weight update is {len(view)} bytes, too short to be safetensors; "
            "serialize it with rollout.serialize_weights or safetensors.torch.save"
        )
    (size,) = struct.unpack("<Q", view[:8])
    if size > len(view) - 8:
        raise WeightUpdateError(
            f"weight update header claims {size} bytes but the payload has {len(view) - 8}; "
            "the payload is truncated or not safetensors"
        )
    try:
        header = json.loads(bytes(view[8 : 8 + size]))
    except ValueError as exc:
        raise WeightUpdateError(f"weight update header is not valid JSON: {exc}") from exc
    header.pop("__metadata__", None)
    return {
        name: TensorSpec(entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()
    }


def checkpoint_spec(model_dir: str | Path) -> CheckpointSpec:
    """The tensors of the safetensors checkpoint in ``model_dir`` (headers only)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir} holds no *.safetensors files; weight updates are validated "
            "against the checkpoint, so save the model with safe_serialization=True"
        )
    tensors: dict[str, TensorSpec] = {}
    for path in files:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            tensors.update(read_header(struct.pack("<Q", size) + handle.read(size)))
    config = json.loads((model_dir / "config.json").read_text())
    text_config = config.get("text_config", config)
    tied = bool(text_config.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    return CheckpointSpec(tensors=tensors, tied_embeddings=tied)


def validate_update(header: Mapping[str, TensorSpec], spec: CheckpointSpec) -> list[str]:
    """Check an update against a checkpoint; return the names to load.

    Raises :class:`WeightUpdateError` naming the first offending tensors. The
    returned names leave out ``lm_head.weight`` when the embeddings are tied
    (loading it would write the shared tensor twice).
    """
    expected = dict(spec.tensors)
    if spec.tied_embeddings:
        expected.pop(TIED_HEAD, None)
    names = [n for n in header if not (spec.tied_embeddings and n == TIED_HEAD)]
    unknown = [n for n in names if n not in expected]
    if unknown:
        raise WeightUpdateError(
            f"weight update has {len(unknown)} tensor(s) the {spec.subject} does not have: "
            f"{_listed(unknown)}; send {spec.naming} ({_listed(sorted(expected))})"
        )
    bad_shape = [
        f"{n} {list(header[n].shape)} (expected: {list(expected[n].shape)})"
        for n in names
        if header[n].shape != expected[n].shape
    ]
    if bad_shape:
        raise WeightUpdateError(
            f"weight update has {len(bad_shape)} tensor(s) of the wrong shape: {_listed(bad_shape)}"
        )
    not_float = [f"{n} ({header[n].dtype})" for n in names if header[n].dtype not in _FLOAT_DTYPES]
    if not_float:
        raise WeightUpdateError(
            f"weight update has non-floating tensors: {_listed(not_float)}; "
            "send the model's floating-point weights"
        )
    missing = sorted(set(expected) - set(names))
    if missing:
        raise WeightUpdateError(
            f"weight update is incomplete: {len(missing)} of {len(expected)} tensors are "
            f"missing ({_listed(missing)}); send every parameter of the {spec.subject}"
        )
    return names


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")
