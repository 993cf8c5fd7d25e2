"""The training package without engines: light imports, placement policy, the loop's
shape, metadata columns and the sampling pipeline's order (with a stand-in pool)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rollout import RolloutConfig, RolloutRecord
from services.spec import Resources, load_spec
from services.train.data import DataError, load_questions
from services.train.parts import cpu_engine_env, cpu_share, engine_placement, learner_cpu_env

REPO = Path(__file__).resolve().parents[1]


def loaded_after(statement: str) -> list[str]:
    """Heavy modules in ``sys.modules`` after running ``statement`` in a fresh interpreter."""
    probe = (
        f"import sys; {statement}; print([m for m in ('torch', 'ray', 'vllm') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    return json.loads(out.stdout.strip().replace("'", '"'))


def test_the_job_spec_and_the_job_api_import_no_heavy_framework():
    assert loaded_after("import services.spec") == []
    assert [m for m in loaded_after("import services.api.app") if m != "ray"] == []


def test_the_loop_is_one_screen_without_ray():
    tree = ast.parse((REPO / "services" / "train" / "loop.py").read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert functions and all(n.end_lineno - n.lineno + 1 <= 60 for n in functions)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "ray" not in names and "remote" not in attributes


def test_cpu_engine_env_gives_each_engine_its_own_cores():
    assert cpu_engine_env(0, 1, [0, 1], bind=True) == {
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0",
    }
    assert cpu_engine_env(1, 1, [0, 1], bind=True)["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert cpu_engine_env(1, 2, [0, 1, 2, 3], bind=True)["VLLM_CPU_OMP_THREADS_BIND"] == "2,3"
    # more threads than cores: wrap around, never bind a core twice
    wrapped = cpu_engine_env(0, 4, [0, 1], bind=True)
    assert wrapped == {"OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "0,1"}
    assert cpu_engine_env(0, 2, [0, 1], bind=False) == {
        "OMP_NUM_THREADS": "2",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }


def test_engine_placement_puts_the_specs_resources_over_the_defaults(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1})
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    config = RolloutConfig(engines=2)
    options = engine_placement(config, Resources(num_gpus=0, resources={"rollout": 1}))
    first, second = options(0), options(1)
    assert first["num_cpus"] == 0.5 and first["num_gpus"] == 0
    assert first["resources"] == {"rollout": 1}
    env = first["runtime_env"]["env_vars"]
    assert env["VLLM_LOGGING_LEVEL"] == "WARNING" and env["OMP_NUM_THREADS"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert second["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    gpu = engine_placement(config, Resources(num_gpus=1))(0)
    assert gpu["num_gpus"] == 1 and "OMP_NUM_THREADS" not in gpu["runtime_env"]["env_vars"]


def test_cpu_engines_run_vllms_engine_core_in_their_own_process(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1})
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    config = RolloutConfig(engines=1)
    env = engine_placement(config, Resources(num_gpus=0))(0)["runtime_env"]["env_vars"]
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "LD_PRELOAD" not in env  # measured slower in process (bench/engine_runtime.py)
    gpu = engine_placement(config, Resources(num_gpus=1))(0)["runtime_env"]["env_vars"]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu  # vLLM's own default on GPUs
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the driver's setting wins
    env = engine_placement(config, Resources(num_gpus=0))(0)["runtime_env"]["env_vars"]
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def demo_spec(*overrides: str):
    return load_spec(REPO / "examples" / "arithmetic" / "process.yaml", list(overrides))


def test_async_on_cpu_splits_the_cores_and_sync_shares_them(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1, 2, 3})
    monkeypatch.setattr("services.train.parts.cluster_has_gpus", lambda: False)
    split = cpu_share(demo_spec("train.mode=async"))
    assert (split.engine_cores, split.learner_threads, split.split) == ([0, 1], 2, True)
    assert cpu_share(demo_spec()) == type(split)([0, 1, 2, 3], 4, False)
    ranks = cpu_share(demo_spec("train.mode=async", "cluster.learner.replicas=2"))
    assert ranks.engine_cores == [0, 1] and ranks.learner_threads == 1
    for told in ("rollout.threads=1", "cluster.learner.threads=3", "cluster.learner.num_gpus=1"):
        assert not cpu_share(demo_spec("train.mode=async", told)).split, told
    told = cpu_share(demo_spec("train.mode=async", "cluster.learner.threads=3"))
    assert told.learner_threads == 3
    options = engine_placement(RolloutConfig(engines=1), Resources(num_gpus=0), split.engine_cores)
    env = options(0)["runtime_env"]["env_vars"]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1" and env["OMP_NUM_THREADS"] == "2"
    monkeypatch.setattr("services.train.parts.cluster_has_gpus", lambda: True)
    assert not cpu_share(demo_spec("train.mode=async")).split


def test_the_learner_spins_briefly_unless_the_driver_says_otherwise(monkeypatch):
    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(key, raising=False)
    assert learner_cpu_env() == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "100000"}
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert learner_cpu_env()["GOMP_SPINCOUNT"] == "0"
    engine = engine_placement(RolloutConfig(engines=1), Resources(num_gpus=0))(0)
    assert "GOMP_SPINCOUNT" not in engine["runtime_env"]["env_vars"]  # engines stay passive


def write_rows(tmp_path, rows) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_metadata_fields_reach_each_question(tmp_path):
    rows = [{"q": "1+1", "a": "2", "solution": "2", "level": i} for i in range(3)]
    path = write_rows(tmp_path, rows)
    named = load_questions(path, prompt_field="q", answer_field="a", metadata_fields=["level"])
    assert [dict(q.metadata) for q in named] == [{"level": 0}, {"level": 1}, {"level": 2}]
    every = load_questions(path, prompt_field="q", answer_field="a", metadata_fields="all")
    assert dict(every[0].metadata) == {"a": "2", "solution": "2", "level": 0}
    plain = load_questions(path, prompt_field="q", answer_field="a")
    assert dict(plain[0].metadata) == {}


def test_metadata_fields_refuse_missing_columns_by_name(tmp_path):
    path = write_rows(tmp_path, [{"q": "1+1", "a": "2"}])
    with pytest.raises(DataError, match=r"no column\(s\) \['solution'\].*data.metadata_fields"):
        load_questions(path, prompt_field="q", answer_field="a", metadata_fields=["solution"])


def test_metadata_fields_refuse_values_that_are_not_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist([{"q": "1+1", "a": "2", "blob": b"\x00\x01"}])
    pq.write_table(table, path)
    with pytest.raises(DataError, match="row 0: a data.metadata_fields column is not JSON"):
        load_questions(path, prompt_field="q", answer_field="a", metadata_fields=["blob"])


# ---------------------------------------------------------------- sampling pipeline


class StandInPool:
    """Records submissions; every group is two records sampled at ``version``."""

    def __init__(self) -> None:
        self.version = 0
        self.submitted: list[list[str]] = []

    def submit(self, requests, sampling):
        self.submitted.append([r.group_id for r in requests])
        version = self.version
        return [
            [
                RolloutRecord(r.group_id, i, [1], [2, 3], [-0.1, -0.2], "x", "stop", version)
                for i in range(2)
            ]
            for r in requests
        ]

    def collect(self, handle):
        return handle


class StandInReward:
    """Scores every item 1.0, or fails the items of the steps in ``failing``."""

    name = "the stand-in reward source"

    def __init__(self, failing=()) -> None:
        self.failing = set(failing)

    def score(self, items, *, job_id, step):
        from reward.protocol import Result

        if step in self.failing:
            return [Result(id=i.id, status="error", error="401 wrong token") for i in items]
        return [Result(id=item.id, status="ok", reward=1.0) for item in items]


def pipeline(mode: str, steps: int = 3, max_staleness: int = 1, failing=(), **train):
    from services.spec import validate_spec
    from services.train.data import DataCursor, Question
    from services.train.sampling import SamplingPipeline

    spec = validate_spec(
        {
            "model": {"path": "m"},
            "data": {"train": "t"},
            "rollout": {"group_size": 2},
            "train": {
                "steps": steps,
                "questions_per_step": 2,
                "mode": mode,
                "max_staleness": max_staleness,
                "eval_every": 0,
                **train,
            },
        }
    )
    cursor = DataCursor([Question(f"q{i}", "1", i) for i in range(10)], seed=0)
    pool = StandInPool()
    return SamplingPipeline(spec, pool, StandInReward(failing), cursor), pool, cursor


def test_sync_mode_submits_each_step_when_asked_and_async_one_step_ahead():
    sync, sync_pool, sync_cursor = pipeline("sync")
    lagged, async_pool, async_cursor = pipeline("async")
    for step in (1, 2, 3):
        sync.next_batch(step, version=step - 1)
        assert len(sync_pool.submitted) == step
        lagged.next_batch(step, version=step - 1)
        assert len(async_pool.submitted) == min(step + 1, 3)  # never past the last step
        # a checkpoint after this step resumes before the look-ahead's questions
        assert async_cursor.resume_state(step) == sync_cursor.resume_state(step)
    # the same groups, ids and dataset order in both modes
    assert sync_pool.submitted == async_pool.submitted
    assert [i.rsplit("-d", 1)[0] for i in sync_pool.submitted[0]] == ["s1-a0-q0", "s1-a0-q1"]
    assert sync_cursor.state() == async_cursor.state()


def test_groups_past_max_staleness_are_dropped_and_counted():
    lagged, pool, _ = pipeline("async", max_staleness=0)
    _, first = lagged.next_batch(1, version=0)
    pool.version = 1
    batch, second = lagged.next_batch(2, version=1)  # sampled at version 0: one behind
    assert first["async/stale_dropped"] == 0
    assert second["async/stale_dropped"] == 4 and batch.groups == []  # 2 groups of 2
    assert second["reward/unscorable_frac"] == 0.0


def test_a_reward_source_that_scores_nothing_fails_the_run_and_says_why():
    from services.train.parts import RewardSourceError

    lagged, _, _ = pipeline("sync", steps=6, failing={1, 2, 3, 4}, max_unscorable_steps=2)
    for step in (1, 2):  # two failed steps are tolerated
        _, metrics = lagged.next_batch(step, version=0)
        assert metrics["reward/unscorable_frac"] == 1.0
    with pytest.raises(RewardSourceError, match=r"stand-in reward source.*401 wrong token"):
        lagged.next_batch(3, version=0)


def test_a_good_step_resets_the_count_of_failed_steps():
    lagged, _, _ = pipeline("sync", steps=6, failing={1, 3}, max_unscorable_steps=1)
    for step in range(1, 6):
        lagged.next_batch(step, version=0)  # never two failed steps in a row
    assert lagged.guard.failed_steps == 0


def test_metadata_columns_that_collide_with_call_keywords_are_refused(tmp_path):
    path = write_rows(tmp_path, [{"q": "1+1", "a": "2", "completions": "x"}])
    for wanted in (["completions"], "all"):
        with pytest.raises(DataError, match=r"\['completions'\] of data.metadata_fields would"):
            load_questions(path, prompt_field="q", answer_field="a", metadata_fields=wanted)


@pytest.mark.ray
def test_a_learner_the_cluster_cannot_place_fails_within_its_start_timeout(ray_session):
    """An impossible GPU request fails the run, naming the field, instead of leaving it
    RUNNING forever (issue 17)."""
    import time

    from services.spec import validate_spec
    from services.train.parts import launch_learner

    learner = {"num_gpus": 1024, "start_timeout_s": 1}
    spec = validate_spec({"model": {"path": "m"}, "data": {"train": "t"},
                          "train": {"eval_every": 0}, "cluster": {"learner": learner}})  # fmt: skip
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not place .*start_timeout_s=1 "):
        launch_learner(spec, spec.learner_config())
    assert time.monotonic() - started < 30
