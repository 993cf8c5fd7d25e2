"""The whole system on the embedded default: real vLLM engine actors, the reward service
over HTTP, the learner actor, real Ray.

- Two real steps: every trained parameter changes, the engines' weights version
  advances, and the metrics hold every key DESIGN.md documents; the same with two
  learner ranks (FSDP2 over gloo), whose engines serve what the group trained.
- Exact resume (sync mode, two learner ranks): 4 steps straight against 2 steps, a
  SIGKILL of the driver process, and a resume for the last 2: identical per-step
  losses, identical final weights and the same groups.jsonl. One rank's resume runs
  the same driver code; its learner checkpoints are proven exact by replay in
  tests/test_learner.py, and between one rank and two in tests/test_learner_group.py.
- Exact resume with LoRA (one learner rank, `model.lora` rank 8 on all linear
  modules): 3 steps straight against 2 steps, a SIGKILL and a resume for the last: the
  same per-step losses, the same adapter in final/adapter/ (PEFT's files), the same
  merged final/ model and groups.jsonl, and the resumed engines serve the checkpoint's
  adapter (weights version 3, log-probs that match the learner's).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from services.embedded.arithmetic import base_model_dir, dataset_dir
from services.spec import validate_spec
from services.train.data import DataCursor
from services.train.run import TrainingRun, load_spec_questions
from services.train.run_dir import RunDirectory

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

DOCUMENTED_METRICS = (
    "step", "reward/mean", "reward/std", "reward/unscorable_frac",
    "reward/zero_variance_groups_frac", "loss/policy", "loss/kl", "loss/clip_frac_low",
    "loss/clip_frac_high", "train/grad_norm", "train/lr", "rollout/response_len_mean",
    "rollout/truncated_frac", "rollout/tokens_per_s", "async/stale_dropped", "time/step_s",
    "time/generate_s", "time/reward_s", "time/logprob_s", "time/train_s",
    "time/weight_sync_s", "weights_version",
)  # fmt: skip


def job(out_dir: Path, **sections) -> dict:
    data = dataset_dir()
    raw = {
        "name": "e2e",
        "seed": 7,
        # The warmed-up base model (cached after its first build, ~90 s): a random
        # model scores 0 everywhere, which gives zero advantages and no update at all.
        "model": {"path": str(base_model_dir())},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "rollout": {"engines": 1, "group_size": 4, "max_tokens": 24, "enforce_eager": True},
        "train": {"steps": 2, "questions_per_step": 4, "lr": 1e-3, "eval_every": 0,
                  "eval_size": 16},
        "checkpoint": {"every": 0},
        "output": {"dir": str(out_dir)},
    }  # fmt: skip
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def test_two_real_steps_train_every_parameter_and_advance_the_engines(ray_session, tmp_path):
    spec = validate_spec(job(tmp_path / "run"))
    versions: list[list[int]] = []
    run = TrainingRun(
        spec, on_step=lambda step, m: versions.append(run.parts.pool.weights_versions())
    )
    result = run.run()

    assert result.status == "succeeded" and result.steps_done == 2
    assert versions == [[0], [1], [2]]  # eval before training, then one version per step
    initial = load_file(Path(spec.model.path) / "model.safetensors")
    final = load_file(result.run_dir / "final" / "model.safetensors")
    unchanged = [name for name, tensor in initial.items() if final[name].equal(tensor)]
    assert unchanged == []
    steps = [r for r in result.metrics if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        missing = [key for key in DOCUMENTED_METRICS if key not in record]
        assert missing == []
    assert "eval/accuracy" in result.metrics[0] and "eval/accuracy" in steps[-1]
    assert steps[-1]["train/inference_logprob_abs_diff"] < 1e-4  # engine and learner agree
    for name in ("config.json", "metrics.jsonl", "samples.jsonl", "curves.png"):
        assert (result.run_dir / name).exists(), name
    assert (result.run_dir / "checkpoints" / "step_2" / "driver_state.json").exists()
    # when each part was ready, the parts having started together
    startup = json.loads((result.run_dir / "placement.json").read_text())["startup_s"]
    assert {"before_parts", "ray", "reward", "learner", "engines"} <= set(startup)
    assert all(startup[part] >= startup["ray"] for part in ("reward", "learner", "engines"))
    (phases,) = startup["engine_phases"]
    assert set(phases) == {"import", "create", "warm_up"}


def test_two_learner_ranks_train_every_parameter_and_the_engines_serve_it(ray_session, tmp_path):
    raw = job(tmp_path / "run", cluster={"learner": {"replicas": 2}}, data={"eval": None})
    spec = validate_spec(raw)
    versions: list[list[int]] = []
    run = TrainingRun(
        spec, on_step=lambda step, m: versions.append(run.parts.pool.weights_versions())
    )
    result = run.run()

    assert result.status == "succeeded" and versions == [[1], [2]]
    initial = load_file(Path(spec.model.path) / "model.safetensors")
    final = load_file(result.run_dir / "final" / "model.safetensors")
    assert [name for name, tensor in initial.items() if final[name].equal(tensor)] == []
    steps = [r for r in result.metrics if r["step"] > 0]
    assert all(r["train/inference_logprob_abs_diff"] < 1e-4 for r in steps)


def test_a_trl_style_function_reading_a_dataset_column_trains_like_the_math_verifier(
    ray_session, tmp_path, monkeypatch
):
    """The same seed, rewards and losses with the built-in math verifier and with a TRL
    function that reads the `answer` column through data.metadata_fields."""
    custom = {"answer_math": "tests.reward_custom_verifiers:math_of_answer_column"}
    monkeypatch.setenv("GRPO_REWARD_CUSTOM_VERIFIERS", json.dumps(custom))
    common = {"train": {"steps": 3, "eval_every": 0}}
    builtin = job(tmp_path / "math", data={"eval": None}, **common)
    trl = job(
        tmp_path / "trl",
        data={"eval": None, "metadata_fields": ["answer"]},
        reward={"verifiers": [{"name": "answer_math"}], "eval_verifier": "answer_math"},
        **common,
    )
    keys = ("reward/mean", "reward/std", "loss/policy", "loss/kl", "train/grad_norm")
    runs = [TrainingRun(validate_spec(raw)).run().metrics for raw in (builtin, trl)]
    rows = [[tuple(r[k] for k in keys) for r in metrics if r["step"] > 0] for metrics in runs]
    assert len(rows[0]) == 3 and rows[0] == rows[1]
    assert any(row[0] > 0 for row in rows[0])  # some rewards were earned, not all zero


def test_broadcast_and_object_store_train_identically_in_async_mode(ray_session, tmp_path):
    """The transport moves the same bytes: same seed, same rewards and losses step for step
    (async mode, where the next step's generation is in flight during each update)."""
    keys = ("reward/mean", "loss/policy", "loss/kl", "train/grad_norm", "weights_version")
    rows = []
    for transport in ("broadcast", "object_store"):
        raw = job(tmp_path / transport, train={"steps": 3, "mode": "async"},
                  data={"eval": None}, cluster={"weight_transport": transport})  # fmt: skip
        metrics = TrainingRun(validate_spec(raw)).run().metrics
        rows.append([tuple(r[k] for k in keys) for r in metrics if r["step"] > 0])
    assert len(rows[0]) == 3 and rows[0] == rows[1]


def run_driver(spec_file: Path, log_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.driver", "--spec", str(spec_file)],
        stdout=open(log_file, "ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def write_spec(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(raw))
    return path


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/policy"], r["loss/kl"]) for r in records if r["step"] > 0]


def digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def file_digests(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in directory.iterdir()
    }


def straight_and_resumed(tmp_path: Path, kill_after: int, **sections) -> tuple[Path, Path]:
    """The job of ``sections`` run by the driver straight through, and again with its
    driver SIGKILLed once the step-``kill_after`` checkpoint is in place, then resumed
    (``checkpoint.resume: auto``); the two runs' directories."""
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = run_driver(write_spec(tmp_path / "a.json", job(straight_dir, **sections)),
                          tmp_path / "straight.log")  # fmt: skip
    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    spec_file = write_spec(tmp_path / "b.json", job(resumed_dir, **sections))
    first = run_driver(spec_file, tmp_path / "resumed.log")
    checkpoint = resumed_dir / "checkpoints" / f"step_{kill_after}" / "driver_state.json"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert checkpoint.exists(), (tmp_path / "resumed.log").read_text()[-3000:]
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL  # killed, not finished
    second = run_driver(spec_file, tmp_path / "resumed.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    return straight_dir, resumed_dir


def assert_resumed_exactly(resumed_dir: Path, straight_dir: Path, steps: int) -> None:
    assert [s for s, _, _ in losses(resumed_dir)] == list(range(1, steps + 1))
    assert losses(resumed_dir) == losses(straight_dir)
    assert digest(resumed_dir / "final") == digest(straight_dir / "final")
    # every group once, as in the straight run: the killed driver's groups.jsonl lines past
    # its checkpoint were cut on resume
    assert RunDirectory(resumed_dir).read_groups() == RunDirectory(straight_dir).read_groups()


def test_resume_after_killing_the_driver_of_two_learner_ranks_is_exact(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    straight_dir, resumed_dir = straight_and_resumed(
        tmp_path,
        kill_after=2,
        train={"steps": 4, "eval_every": 0},
        data={"eval": None},
        checkpoint={"every": 2, "keep_last": 3},
        cluster={"ray_address": address, "learner": {"replicas": 2}},
    )
    assert_resumed_exactly(resumed_dir, straight_dir, steps=4)


def test_resume_after_killing_the_driver_is_exact_with_lora(ray_session, tmp_path):
    """Killed after step 2's checkpoint, so step 3 needs all the checkpoint holds: the
    adapter, its optimizer moments and schedule, the data cursor, and the engines serving
    that adapter again before they sample."""
    address = ray_session.get_runtime_context().gcs_address
    lora = {"rank": 8, "alpha": 16, "target_modules": "all-linear"}
    straight_dir, resumed_dir = straight_and_resumed(
        tmp_path,
        kill_after=2,
        model={"lora": lora},
        train={"steps": 3, "eval_every": 0},
        data={"eval": None},
        checkpoint={"every": 2},
        cluster={"ray_address": address},
    )
    assert_resumed_exactly(resumed_dir, straight_dir, steps=3)
    runs = [
        [r for r in RunDirectory(run).read_metrics() if r["step"] > 0]
        for run in (resumed_dir, straight_dir)
    ]
    # the premise: some step before the kill trained, so the checkpoint's adapter is not
    # the initial one (lora_B zero), which the base model would serve just as well
    assert any(r["train/grad_norm"] > 0 for r in runs[1][:2])
    # the resumed driver's engines sampled step 3 with the checkpoint's adapter: the
    # weights version runs on, and their log-probs match the learner's
    assert [r["weights_version"] for r in runs[0]] == [r["weights_version"] for r in runs[1]]
    assert [r["weights_version"] for r in runs[0]] == [1, 2, 3]
    assert all(r["train/inference_logprob_abs_diff"] <= 1e-5 for r in runs[0])
    # final/adapter/ in PEFT's format: the same files byte for byte, but for the config's
    # target_modules, which PEFT writes from a set (in an order that varies by process)
    adapters = [run / "final" / "adapter" for run in (resumed_dir, straight_dir)]
    files = [file_digests(adapter) for adapter in adapters]
    configs = [json.loads((adapter / "adapter_config.json").read_text()) for adapter in adapters]
    for digests, config in zip(files, configs, strict=True):
        del digests["adapter_config.json"]
        config["target_modules"] = sorted(config["target_modules"])
    assert "adapter_model.safetensors" in files[0] and files[0] == files[1]
    assert configs[0] == configs[1] and (configs[0]["r"], configs[0]["lora_alpha"]) == (8, 16)
    tensors = load_file(adapters[0] / "adapter_model.safetensors")
    assert tensors and all("lora_" in name for name in tensors)  # the adapter only


def test_async_mode_overlaps_and_drops_rollouts_past_max_staleness(ray_session, tmp_path):
    """With max_staleness 0 the pipeline's one-step lag is visible: step 2 trains on
    rollouts sampled before step 1's update, so they are dropped and counted; step 3's
    were sampled after it and train again."""
    raw = job(tmp_path / "run", train={"steps": 3, "mode": "async", "max_staleness": 0},
              data={"eval": None})  # fmt: skip
    result = TrainingRun(validate_spec(raw)).run()
    steps = [r for r in result.metrics if r["step"] > 0]
    completions = 4 * 4  # questions_per_step × group_size
    assert [r["async/stale_dropped"] for r in steps] == [0, completions, 0]
    assert [r["weights_version"] for r in steps] == [1, 1, 2]


def test_an_async_run_stopped_and_resumed_trains_every_question_once(ray_session, tmp_path):
    """Async mode takes step 3's questions while step 2 trains; the checkpoint of a run
    stopped after step 2 resumes before them, so the resumed run takes them again: the
    steps' dataset rows are the data order's, each once, with no step lost."""
    raw = job(tmp_path / "run", train={"steps": 4, "mode": "async"}, data={"eval": None})
    spec = validate_spec(raw)

    def stop_after_two(step: int, metrics: dict) -> None:
        stopped.stop_signalled = step == 2  # as SIGTERM does

    stopped = TrainingRun(spec, on_step=stop_after_two)
    assert stopped.run().status == "cancelled" and stopped.step == 2
    resumed = TrainingRun(spec).run()
    assert resumed.status == "succeeded" and [r["step"] for r in resumed.metrics] == [1, 2, 3, 4]

    groups = RunDirectory(resumed.run_dir).read_groups()
    assert [g["step"] for g in groups] == [step for step in (1, 2, 3, 4) for _ in range(4)]
    rows = [int(g["group_id"].rsplit("-d", 1)[1]) for g in groups]
    order = DataCursor(load_spec_questions(spec, spec.data.train), spec.seed).next_batch(16, 1)
    assert rows == [q.index for q in order]
