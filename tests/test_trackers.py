"""Experiment trackers write real TensorBoard event files and W&B offline runs."""

from __future__ import annotations

import pytest

from services.train.trackers import TensorBoardTracker, WandbTracker

RECORDS = [
    {"step": 1, "reward/mean": 0.25, "loss/kl": 0.01, "note": "text is skipped"},
    {"step": 2, "reward/mean": 0.5, "loss/kl": 0.02, "eval/accuracy": 0.75},
]


def test_tensorboard_events_hold_every_numeric_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = TensorBoardTracker(tmp_path)
    for record in RECORDS:
        tracker.log(record)
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"reward/mean", "loss/kl", "eval/accuracy"}
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.25), (2, 0.5)]


def test_wandb_offline_run_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = WandbTracker(tmp_path, "t", {"seed": 0})
    for record in RECORDS:
        tracker.log(record)
    tracker.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(runs[0].glob("*.wandb"))


def test_a_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match="output.wandb"):
        WandbTracker(tmp_path, "t", {})
