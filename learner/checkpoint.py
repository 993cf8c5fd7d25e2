"""A learner's checkpoint, the same format for one rank and for N.

The caller makes the directory (and renames it into place once every rank
has returned). In it:

- ``state/``: policy and optimizer state written with
  ``torch.distributed.checkpoint`` — every rank writes its own shard, in
  parallel. Tensors are keyed by parameter name, so a checkpoint written by
  N ranks loads into M ranks (DCP reshards on load), one rank included.
  Frozen parameters are left out: with LoRA that is the whole base model, so
  ``state/`` holds the adapter and its optimizer state only.
- ``learner_state.pt``: the schedule, the step count and the RNG state,
  written by rank 0 and read by every rank.

The reference model and a LoRA policy's base are not saved: they are the
initial weights, loaded again from the model directory.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

STATE_DIR = "state"
EXTRA_FILE = "learner_state.pt"


def save(
    out_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    steps_done: int,
    *,
    rank: int,
    sharded: bool,
) -> None:
    """Write model and optimizer shards, and from rank 0 the rest (collective if sharded)."""
    out = Path(out_dir)
    with _single_process(not sharded):
        dcp.save(_live_state(model, optimizer), checkpoint_id=out / STATE_DIR, no_dist=not sharded)
    if rank == 0:
        extra = {
            "scheduler": scheduler.state_dict(),
            "steps_done": steps_done,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(extra, out / EXTRA_FILE)


def load(
    in_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    sharded: bool,
) -> int:
    """Restore all that ``save`` wrote, in place; return the steps done (collective if sharded)."""
    source = Path(in_dir)
    if not (source / STATE_DIR / ".metadata").is_file():
        raise FileNotFoundError(
            f"{source} holds no learner checkpoint ({STATE_DIR}/.metadata is missing); "
            "give a directory written by Learner.save_checkpoint"
        )
    state = _live_state(model, optimizer)
    with _single_process(not sharded):
        dcp.load(state, checkpoint_id=source / STATE_DIR, no_dist=not sharded)
    options = StateDictOptions(strict=not _has_frozen(model))
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    extra = torch.load(source / EXTRA_FILE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng_cpu"])
    if extra["rng_cuda"]:
        torch.cuda.set_rng_state_all(extra["rng_cuda"])
    return extra["steps_done"]


def _live_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state to save or load into; without the frozen tensors, if there are any."""
    model_state = get_model_state_dict(model)
    if _has_frozen(model):
        # Names of trainable parameters only: a frozen tensor's tied alias (lm_head) goes too.
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        model_state = {name: t for name, t in model_state.items() if name in trainable}
    return {"model": model_state, "optimizer": get_optimizer_state_dict(model, optimizer)}


def _has_frozen(model: torch.nn.Module) -> bool:
    """Whether some parameters are frozen (a LoRA policy's base; full fine-tuning has none)."""
    return any(not param.requires_grad for param in model.parameters())


@contextlib.contextmanager
def _single_process(quiet: bool) -> Iterator[None]:
    """Silence DCP's warning that one process means no process group: that is the intent."""
    with warnings.catch_warnings():
        if quiet:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
