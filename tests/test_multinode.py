"""A real two-node Ray cluster on this machine, and a training job placed across it.

The head and a worker are separate Ray nodes started with ``ray start`` (each with its
own ``--temp-dir``, ports and small object store, and its own custom resource: the head
``{"learner_node": 1}``, the worker ``{"rollout_node": 1}``), with token authentication
on (``RAY_AUTH_MODE=token`` and a fresh ``RAY_AUTH_TOKEN``, never ``~/.ray/auth_token``).
The training driver runs as its own process, ``python -m services.driver --spec FILE``,
against the head's address; the spec places the learner on the head and the engine and
the reward service on the worker through ``cluster.*.resources``. Weights cross nodes
through Ray's object store, rewards over HTTP to the worker node's address.

``ray stop`` would stop every Ray instance on the machine, other tests' included, so
the fixture stops exactly the processes it started: each ``ray start --block`` (which
shuts its node down on SIGTERM), then whatever is left of their process groups, their
descendants, and any process whose command line names the fixture's own temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from services.embedded.arithmetic import dataset_dir
from services.embedded.tiny_model import tiny_model_dir

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
HEAD_RESOURCES = {"learner_node": 1}
WORKER_RESOURCES = {"rollout_node": 1}
OBJECT_STORE_BYTES = 128 * 1024**2
START_TIMEOUT_S = 120
DRIVER_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports that default to fixed numbers and would clash with other nodes here."""
    return [
        "--dashboard-agent-listen-port", str(_free_port()),
        "--dashboard-agent-grpc-port", str(_free_port()),
        "--metrics-export-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()),
    ]  # fmt: skip


@dataclass
class RayNode:
    """One ``ray start --block`` process and the Ray node it runs."""

    name: str
    root: Path
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    seen: list[psutil.Process] = field(default_factory=list)

    @property
    def temp_dir(self) -> Path:
        return self.root / self.name

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def start(self) -> None:
        command = [
            str(RAY), "start", "--block", "--disable-usage-stats",
            "--log-style", "record", "--log-color", "false", "--include-log-monitor", "false",
            "--temp-dir", str(self.temp_dir),
            "--num-cpus", "2", "--object-store-memory", str(OBJECT_STORE_BYTES),
            *_node_ports(), *self.args,
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=REPO,
            )  # fmt: skip

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {self.name} did not start:\n{self.tail()}")
            time.sleep(0.2)

    def node_id(self) -> str:
        raylet_log = self.temp_dir / "session_latest" / "logs" / "raylet.out"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if raylet_log.exists():
                found = re.search(r"node_id=([0-9a-f]{56})", raylet_log.read_text())
                if found:
                    return found.group(1)
            time.sleep(0.2)
        raise RuntimeError(f"no node id in {raylet_log}")

    def node_ip(self) -> str:
        """The node's IP as Ray chose it (printed before the node's processes start)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            found = re.search(r"Local node IP: (\S+)", self.log.read_text(errors="replace"))
            if found:
                return found.group(1)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no node IP in the log of {self.name}:\n{self.tail()}")
            time.sleep(0.1)

    def wait_listening(self, host: str, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection((host, port), 1):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} does not listen on {port}:\n{self.tail()}")
            time.sleep(0.1)

    def remember_processes(self) -> None:
        """Record the node's process tree before it is asked to stop."""
        if self.proc is None:
            return
        try:
            root = psutil.Process(self.proc.pid)
            self.seen = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            self.seen = []

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class TwoNodeCluster:
    """What tests need to use the cluster: its address and the environment with the token."""

    address: str
    env: dict[str, str]
    head_node_id: str
    worker_node_id: str
    head: RayNode
    worker: RayNode


def _stop(nodes: list[RayNode], root: Path) -> None:
    """Stop exactly what the fixture started (never ``ray stop``: it stops every instance)."""
    for node in nodes:
        node.remember_processes()
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down
    for node in nodes:
        if node.proc is None:
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=45)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)  # its own session, from Popen
    leftovers = [p for node in nodes for p in node.seen]
    marker = str(root)
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []):
            leftovers.append(proc)
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()  # psutil checks the pid's start time: a reused pid is left alone
    psutil.wait_procs(leftovers, timeout=10)


@pytest.fixture(scope="session")
def ray_two_nodes() -> Iterator[TwoNodeCluster]:
    """A head node and a worker node (separate ``ray start`` processes), token auth on."""
    root = Path(tempfile.mkdtemp(prefix="grpo-ray-", dir="/tmp"))  # short: socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
    )
    gcs_port = _free_port()
    head = RayNode(
        "head",
        root,
        [
            "--head", "--port", str(gcs_port),
            "--ray-client-server-port", str(_free_port()),
            "--include-dashboard", "false",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(_free_port()),
            "--resources", json.dumps(HEAD_RESOURCES),
        ],
        env,
    )  # fmt: skip
    worker = RayNode(
        "worker", root, ["--resources", json.dumps(WORKER_RESOURCES)], env
    )  # the --address is set once the head has said its IP
    nodes = [head]
    try:
        head.start()
        head_ip = head.node_ip()
        head.wait_listening(head_ip, gcs_port)  # the worker only needs the head's GCS
        address = f"{head_ip}:{gcs_port}"
        worker.args = ["--address", address, *worker.args]
        nodes.append(worker)
        worker.start()
        head.wait_started()
        worker.wait_started()
        yield TwoNodeCluster(address, env, head.node_id(), worker.node_id(), head, worker)
    finally:
        _stop(nodes[::-1], root)
        shutil.rmtree(root, ignore_errors=True)


def job_spec(out_dir: Path, address: str) -> dict:
    data = dataset_dir()
    return {
        "name": "multinode",
        "seed": 7,
        "model": {"path": str(tiny_model_dir("tiny"))},
        "data": {"train": str(data / "train.jsonl")},
        "rollout": {"engines": 1, "group_size": 4, "max_tokens": 24, "enforce_eager": True},
        "train": {"steps": 2, "questions_per_step": 4, "lr": 1e-3, "eval_every": 0},
        "checkpoint": {"every": 0},
        "output": {"dir": str(out_dir)},
        "cluster": {
            "ray_address": address,
            "learner": {"resources": {"learner_node": 1}},
            "engines": {"resources": {"rollout_node": 0.5}},
            "reward": {"resources": {"rollout_node": 0.25}},
        },
    }


def _connect_with_wrong_token(cluster: TwoNodeCluster) -> subprocess.Popen:
    env = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    code = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print('IN')"
    return subprocess.Popen(
        [sys.executable, "-c", code, cluster.address],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip


def test_a_job_runs_across_two_ray_nodes_placed_by_custom_resources(ray_two_nodes, tmp_path):
    cluster = ray_two_nodes
    spec_file = tmp_path / "job.json"
    run_dir = tmp_path / "run"
    spec_file.write_text(json.dumps(job_spec(run_dir, cluster.address)))
    log_file = tmp_path / "driver.log"
    with open(log_file, "wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "services.driver", "--spec", str(spec_file)],
            env={**cluster.env, "PYTHONUNBUFFERED": "1"},
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    intruder = _connect_with_wrong_token(cluster)  # runs while the driver starts its engine
    try:
        code = driver.wait(timeout=DRIVER_TIMEOUT_S)
        intruder_out, _ = intruder.communicate(timeout=120)
    finally:
        for proc in (driver, intruder):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    driver_log = log_file.read_text(errors="replace")
    assert code == 0, driver_log[-4000:]

    # token authentication is on: a client with another token is turned away
    assert intruder.returncode != 0 and "IN" not in intruder_out.splitlines()
    assert "token" in intruder_out.lower(), intruder_out[-2000:]

    placement = json.loads((run_dir / "placement.json").read_text())
    assert placement["learner"] == cluster.head_node_id
    assert placement["engines"] == [cluster.worker_node_id]
    assert placement["reward"] == cluster.worker_node_id
    assert set(placement["nodes"]) == {cluster.head_node_id, cluster.worker_node_id}

    # the reward service on the worker node listens on that node's address, and the
    # driver (on the head's node) reached it with the run's token: every step was scored
    worker_ip = placement["nodes"][cluster.worker_node_id]
    reward_host = urlsplit(placement["reward_url"]).hostname
    assert reward_host == worker_ip and reward_host != "127.0.0.1"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["reward/unscorable_frac"] == 0.0 for r in steps)
    assert steps[-1]["weights_version"] == 2  # weights crossed to the worker's engine twice
    assert (run_dir / "final" / "model.safetensors").exists()
