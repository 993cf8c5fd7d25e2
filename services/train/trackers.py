"""Experiment trackers: where metric records go besides ``metrics.jsonl``.

Optional and off by default (``output.tensorboard``, ``output.wandb``). Each
tracker receives the same records as the run directory, one per step, and
keeps only the numeric values. TensorBoard writes event files under
``output.dir/tensorboard``; Weights & Biases logs under ``output.dir/wandb``
and honours ``WANDB_MODE`` (``offline`` needs no network). Their packages are
the ``tracking`` extra: a missing one is a clear error at start-up, not a
silent no-op.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TrackerUnavailable(RuntimeError):
    """A tracker was asked for but its package is not installed."""


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


class TensorBoardTracker:
    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise TrackerUnavailable(
                "output.tensorboard is on but the tensorboard package is missing; "
                "pip install 'grpo-service[tracking]' or set output.tensorboard: false"
            ) from error
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _numeric(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as error:
            raise TrackerUnavailable(
                "output.wandb is on but the wandb package is missing; "
                "pip install 'grpo-service[tracking]' or set output.wandb: false"
            ) from error
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project="grpo-service", name=name, dir=str(run_dir), config=config, reinit=True
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_numeric(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_trackers(
    run_dir: Path, *, tensorboard: bool, wandb: bool, name: str, config: dict[str, Any]
) -> list[Tracker]:
    """The trackers the spec's ``output`` section turns on."""
    trackers: list[Tracker] = []
    if tensorboard:
        trackers.append(TensorBoardTracker(run_dir))
    if wandb:
        trackers.append(WandbTracker(run_dir, name, config))
    return trackers
