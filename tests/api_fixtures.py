"""Shared pieces of the job API tests: a separate Ray cluster for the job system, a
running API, and a small arithmetic job.

``ray_cluster`` starts its own head node with ``ray start`` (the dashboard is needed
for Ray's job submission API) in its own short temp dir, with free ports and its own
auth token (Ray 2.60 turns token authentication on for ``ray start``). It never
touches the in-process Ray of ``tests/conftest.py`` or any other Ray on the machine:
at the end it stops exactly the processes of its own temp dir and their children.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from services.api.server import ApiServer
from services.api.settings import ApiSettings
from services.client import JobClient

TOKEN = "api-test-token-" + "x" * 24
RAY_BIN = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayCluster:
    temp_dir: Path
    dashboard_url: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.headers)

    def actors_of(self, ray_job_id: str) -> list:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(self.dashboard_url, headers=self.headers)
        options = ListApiOptions(filters=[("job_id", "=", ray_job_id)], detail=False)
        return client.list(StateResource.ACTORS, options, raise_on_missing_output=False)


def start_ray_cluster() -> RayCluster:
    temp_dir = Path(tempfile.mkdtemp(prefix="grpoapi-", dir="/tmp"))
    token = secrets.token_hex(32)
    dashboard_port = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # The job's entrypoint runs `python`: this interpreter, with the project installed.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        # The machine is shared: let Ray kill our workers only when memory is really gone.
        "RAY_memory_usage_threshold": "0.99",
    }
    command = [
        str(RAY_BIN), "start", "--head", "--num-cpus=6", f"--temp-dir={temp_dir}",
        f"--port={free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        "--object-store-memory=300000000", "--disable-usage-stats",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    cluster = RayCluster(temp_dir, f"http://127.0.0.1:{dashboard_port}", token)
    if result.returncode != 0:
        stop_ray_cluster(cluster)
        raise RuntimeError(f"ray start failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    deadline = time.monotonic() + 60
    while True:
        try:
            cluster.job_client().list_jobs()
            return cluster
        except Exception:
            if time.monotonic() > deadline:
                stop_ray_cluster(cluster)
                raise
            time.sleep(1)


def stop_ray_cluster(cluster: RayCluster) -> None:
    """Stop the processes of this cluster only: those naming its temp dir, and children."""
    marker = str(cluster.temp_dir)
    roots = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in process.info["cmdline"] or ()):
                roots.append(process)
    tree = set(roots)
    for process in roots:
        with contextlib.suppress(psutil.Error):
            tree.update(process.children(recursive=True))
    tree.discard(psutil.Process())
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(list(tree), timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    cluster = start_ray_cluster()
    try:
        yield cluster
    finally:
        stop_ray_cluster(cluster)


def api_settings(state_dir: Path, roots: list[Path], **overrides) -> ApiSettings:
    values = {
        "token": TOKEN,
        "host": "127.0.0.1",
        "port": 0,
        "state_dir": state_dir,
        "allowed_roots": roots,
        "poll_interval_s": 0.5,
        "log_level": "warning",
        **overrides,
    }
    return ApiSettings(**values)


@contextlib.contextmanager
def running_api(settings: ApiSettings) -> Iterator[tuple[ApiServer, JobClient]]:
    server = ApiServer(settings)
    url = server.start()
    client = JobClient(url, TOKEN)
    try:
        yield server, client
    finally:
        client.close()
        server.stop()


def tiny_job(out_dir: Path | str | None, **sections) -> dict:
    """A 2-step arithmetic job on the tiny model (tests/test_training_e2e.py's `job`)."""
    from services.embedded.arithmetic import dataset_dir
    from services.embedded.tiny_model import tiny_model_dir

    data = dataset_dir()
    raw = {
        "name": "api-e2e",
        "seed": 7,
        "model": {"path": str(tiny_model_dir("tiny"))},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "rollout": {"engines": 1, "group_size": 4, "max_tokens": 24, "enforce_eager": True},
        "train": {"steps": 2, "questions_per_step": 4, "lr": 1e-3, "eval_every": 0,
                  "eval_size": 16},
        "checkpoint": {"every": 0},
    }  # fmt: skip
    if out_dir is not None:
        raw["output"] = {"dir": str(out_dir)}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def cache_root() -> Path:
    from services.embedded.tiny_model import cache_root as root

    return root()
