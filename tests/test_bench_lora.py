"""The LoRA parts of bench/weight_sync.py and bench/learner_scaling.py, without running them:
their options, and how a run's rows merge into the result file (rows of other models
and parts stay; LoRA rows go under ``lora``, beside the full weights they compare with).
bench/run_all.py runs learner_scaling only when asked."""

from __future__ import annotations

import argparse

import pytest

from bench import learner_scaling, run_all, weight_sync
from bench.common import merge_rows, names


def test_names_and_merge_rows_keep_what_a_run_did_not_measure():
    assert names("demo,,20m, 100m") == ["demo", "20m", "100m"]
    result = {"models": {"tiny": 1, "demo": 2}, "other": True}
    merge_rows(result, "models", {"demo": 3})
    merge_rows(result, "lora", {"demo": 4})
    assert result == {"models": {"tiny": 1, "demo": 3}, "lora": {"demo": 4}, "other": True}


def test_weight_sync_takes_parts_and_refuses_unknown_ones():
    assert names(weight_sync.parse_args([]).parts) == ["full", "lora"]
    args = weight_sync.parse_args(["--parts", "lora", "--lora-rank", "16"])
    assert names(args.parts) == ["lora"] and args.lora_rank == 16
    with pytest.raises(SystemExit):
        weight_sync.parse_args(["--parts", "adapter"])


def _row(seconds: float, **extra) -> dict:
    return {
        "payload_mb": 8.0,
        "object_store": {"seconds": 2 * seconds},
        "broadcast": {"seconds": seconds},
        "load_during": {"min": 1.0, "max": 2.0, "other_processes_cores_mean": {}},
        **extra,
    }


def test_weight_sync_puts_lora_rows_under_lora_beside_the_full_weights():
    args = argparse.Namespace(bucket_mb=16)
    old = {"models": {"tiny": _row(0.05), "demo": _row(1.0)}, "kept": "yes"}
    adapter = _row(0.02, adapter_bytes=80_000, adapter_seconds={"object_store": 0.04})
    adapter["adapter_seconds"]["broadcast"] = 0.02
    measured = {"full": {"demo": _row(0.1, measured_at="now")}, "lora": {"demo": adapter}}

    result = weight_sync.merged_result(old, measured, args, {"cpu_count": 2})

    assert result["kept"] == "yes" and set(result["models"]) == {"tiny", "demo"}
    assert result["models"]["demo"]["broadcast"]["seconds"] == 0.1
    row = result["lora"]["demo"]
    assert row["full_bytes"] == 8_000_000 and row["full_measured_at"] == "now"
    assert row["full_seconds"] == {"object_store": 0.2, "broadcast": 0.1}
    assert row["bytes_ratio_full_over_adapter"] == 100.0
    assert row["seconds_ratio_full_over_adapter"] == {"object_store": 5.0, "broadcast": 5.0}
    assert "adapter_bytes" not in result["models"]["demo"]


def test_learner_scaling_parts_have_their_own_default_models():
    args = learner_scaling.parse_args([])
    assert names(args.parts) == ["scaling", "lora"]
    assert learner_scaling.part_models(args, "scaling") == ["small", "20m"]
    assert learner_scaling.part_models(args, "lora") == ["20m", "100m"]
    args = learner_scaling.parse_args(["--parts", "lora", "--models", "100m"])
    assert learner_scaling.part_models(args, "lora") == ["100m"]
    with pytest.raises(SystemExit):
        learner_scaling.parse_args(["--parts", ""])


def test_run_all_runs_learner_scaling_only_when_asked():
    assert "learner_scaling" in run_all.BENCHMARKS and "learner_scaling" in run_all.OPTIONAL
