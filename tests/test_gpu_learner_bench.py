"""bench/gpu_learner.py on a machine without CUDA: it refuses to run unless given
``--allow-cpu``, whose scaled-down smoke run measures the real ``Learner`` on the CPU,
prints its JSON and writes no result file (only a GPU run writes one). On a machine
with a GPU the tests hide it (``torch.cuda.is_available`` reports False), so they run
everywhere."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_learner
from bench.common import RESULTS


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_without_cuda_it_exits_naming_the_smoke_test_flag():
    with pytest.raises(SystemExit, match="--allow-cpu"):
        gpu_learner.main([])


def test_the_cpu_smoke_run_measures_the_learner_and_writes_no_result(capsys):
    result_file = RESULTS / "gpu_learner.json"
    before = result_file.read_bytes() if result_file.exists() else None

    result = gpu_learner.main(["--allow-cpu"])

    assert json.loads(capsys.readouterr().out) == result
    assert result["smoke_test_on_cpu"] and result["peak_gpu_memory_gib"] is None
    assert result["samples_per_step"] == 8 and result["tokens_per_s"] > 0
    assert all(result["state_bytes"][k] > 0 for k in ("gradients", "optimizer", "reference"))
    agreement = result["logprobs_bf16_vs_fp32"]
    assert agreement["tokens"] > 0  # fp32 on both sides on the CPU: identical
    assert agreement["mean_abs_diff"] == agreement["max_abs_diff"] == 0.0
    assert (result_file.read_bytes() if result_file.exists() else None) == before
