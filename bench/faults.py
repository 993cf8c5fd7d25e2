"""The fault suite: each fault injected once into real training runs; every group accounted for.

Every run is the embedded default's job as the job API starts it — ``python -m
services.driver --spec FILE`` — on the arithmetic task's warmed-up tiny model, CPU vLLM,
against one Ray cluster on this machine that the suite starts (``ray start``, the nodes
of ``tests/test_multinode.py``) and stops: 6 steps of 4 questions × 4 completions, two
learner ranks (FSDP2 over gloo), a checkpoint every 2 steps, no evaluation. The runs
score with ``math`` plus ``bench.fault_hooks.scoring_signal`` at weight 0 (the same
rewards; it tells the suite when the reward service is scoring).

0. ``baseline``: undisturbed.
1. ``processes``: SIGKILL of the engine's actor while it generates step 2, of the
   reward service's actor while it scores step 3, and of the driver once step 5 is
   recorded (the last checkpoint is step 4); then the same command again, which resumes.
2. ``reward_http``: ``reward.url`` is a :class:`FaultyRewardProxy` in front of a real
   reward service; it answers 500 to every request of step 2, hangs past
   ``reward.timeout_s`` on step 3 and answers garbage on step 5.
3. ``two_nodes``: a worker node joins; the learner ranks run on the head, the engine and
   the reward service on the worker. A learner rank is killed during step 3's update,
   which must fail the run with an error naming the rank, and the same command resumes
   it (from step 2); then every process of the worker node is killed while the engine
   generates step 5, and a fresh worker node joins (as a cluster manager would replace
   it).

For each fault: what the driver logged, whether the run finished, the groups lost,
duplicated or unexpected (:func:`count_groups`, from ``groups.jsonl`` against the
baseline's, over the steps the fault touched), and whether the final weights equal the
baseline's where they should (everything but the reward service's HTTP faults, which
leave their steps without an update). Writes ``bench/results/faults.json`` and the table
in docs/reliability.md. Not in ``make bench``'s default list:

    python -m bench.run_all --only faults        (or: python bench/faults.py)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import (  # noqa: E402
    DOCS,
    REPO,
    LoadTracker,
    load_text,
    loadavg,
    machine_info,
    update_summary,
    write_result,
)
from bench.fault_hooks import SIGNAL_DIR_ENV  # noqa: E402

log = logging.getLogger("bench.faults")

STEPS = 6
CHECKPOINT_EVERY = 2
DRIVER_TIMEOUT_S = 600
HEAD_RESOURCES = {"learner_node": 2}
WORKER_RESOURCES = {"rollout_node": 1}
CUSTOM_VERIFIERS = {"scoring_signal": "bench.fault_hooks:scoring_signal"}
VERIFIERS = [{"name": "math", "weight": 1.0}, {"name": "scoring_signal", "weight": 0.0}]
ORPHAN_GRACE_S = 10.0
"""How long Ray may take to stop a killed driver's actors before leftovers count."""
REWARD_TIMEOUT_S = 5.0
"""``reward.timeout_s`` of the HTTP-fault run: the hanging step costs 4 attempts of it."""
HTTP_FAULT_VERBS = {"500": "answered 500 to", "hang": "hung on", "garbage": "answered garbage to"}
TABLE_BEGIN, TABLE_END = "<!-- faults table: begin -->", "<!-- faults table: end -->"


# ------------------------------------------------------------------- accounting


def count_groups(
    baseline: Iterable[dict[str, Any]],
    observed: Iterable[dict[str, Any]],
    steps: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Groups of ``observed`` (``groups.jsonl`` rows) against ``baseline``'s, over ``steps``
    (all when None), keyed by ``(step, group_id)``: ``lost`` (in the baseline, not
    recorded), ``duplicated`` (recorded more than once: the copies), ``unexpected`` (not
    in the baseline), ``outcomes`` (counted), ``outcomes_changed`` (against the baseline)."""
    wanted = None if steps is None else set(steps)

    def pick(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if wanted is None or r["step"] in wanted]

    base_rows, seen_rows = pick(baseline), pick(observed)
    base = {(r["step"], r["group_id"]): r["outcome"] for r in base_rows}
    seen = Counter((r["step"], r["group_id"]) for r in seen_rows)
    outcome = {(r["step"], r["group_id"]): r["outcome"] for r in seen_rows}
    return {
        "groups": len(base),
        "lost": sum(1 for key in base if key not in seen),
        "duplicated": sum(count - 1 for count in seen.values()),
        "unexpected": sum(1 for key in seen if key not in base),
        "outcomes": dict(Counter(r["outcome"] for r in seen_rows)),
        "outcomes_changed": sum(1 for key in base if key in outcome and outcome[key] != base[key]),
    }


# --------------------------------------------------------- a reward service that fails


class FaultyRewardProxy:
    """A reward service that forwards every request to a real one (``upstream``) except the
    ``/v1/score`` requests of the steps in ``faults``, retries included: ``"500"`` answers
    500, ``"hang"`` answers nothing for ``hang_s`` (then closes the connection),
    ``"garbage"`` answers 200 with bytes that are not the protocol. ``answers`` counts the
    requests per ``(step, what was done)``. Use it as a context manager; ``url`` is its
    base URL on 127.0.0.1."""

    def __init__(self, upstream: str, faults: dict[int, str], *, hang_s: float = 10.0) -> None:
        unknown = set(faults.values()) - set(HTTP_FAULT_VERBS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; use 500, hang or garbage")
        self.upstream = upstream.rstrip("/")
        self.faults = dict(faults)
        self.hang_s = hang_s
        self.answers: Counter[tuple[int | None, str]] = Counter()
        self.first_answered: dict[tuple[int | None, str], float] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyRewardProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        """The status and body to send, or None to send nothing (a hang)."""
        step = _step_of(body) if path == "/v1/score" else None
        fault = self.faults.get(step) if step is not None else None
        with self._lock:
            self.answers[(step, fault or "forwarded")] += 1
            self.first_answered.setdefault((step, fault or "forwarded"), time.monotonic())
        if fault == "500":
            return 500, b'{"detail": "injected fault: 500"}'
        if fault == "hang":
            time.sleep(self.hang_s)
            return None
        if fault == "garbage":
            return 200, b"\x00 not a score response \xff"
        return _forward(self.upstream, method, path, body)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                self._reply(proxy.answer("GET", self.path, b""))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._reply(proxy.answer("POST", self.path, body))

            def _reply(self, answer: tuple[int, bytes] | None) -> None:
                if answer is None:
                    self.close_connection = True
                    return
                status, data = answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _step_of(body: bytes) -> int | None:
    try:
        step = json.loads(body).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _forward(upstream: str, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    import httpx

    headers = {"Content-Type": "application/json"} if body else {}
    response = httpx.request(method, upstream + path, content=body, headers=headers, timeout=60)
    return response.status_code, response.content


# ------------------------------------------------------------------- the cluster


class Cluster:
    """The suite's Ray cluster on this machine: a head node and, when asked, worker nodes
    (``tests/test_multinode.py``'s ``RayNode``: token authentication, own temp dirs and
    ports). ``stop`` stops exactly what it started."""

    def __init__(self) -> None:
        from tests.test_multinode import RayNode, _free_port

        self._node, self._port = RayNode, _free_port
        self.root = Path(tempfile.mkdtemp(prefix="grpo-faults-", dir="/tmp"))
        drop = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")
        self.env = {k: v for k, v in os.environ.items() if k not in drop}
        self.env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_USAGE_STATS_ENABLED="0",
            RAY_worker_niceness="0",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        self.nodes: list[Any] = []
        self.address = ""

    def start_head(self) -> None:
        port = self._port()
        head = self._node(
            "head",
            self.root,
            [
                "--head", "--port", str(port),
                "--ray-client-server-port", str(self._port()),
                "--include-dashboard", "false",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self._port()),
                "--resources", json.dumps(HEAD_RESOURCES),
            ],
            self.env,
        )  # fmt: skip
        self.nodes.append(head)
        head.start()
        ip = head.node_ip()
        head.wait_listening(ip, port)
        head.wait_started()
        self.address = f"{ip}:{port}"

    def add_worker(self, name: str) -> Any:
        args = ["--address", self.address, "--resources", json.dumps(WORKER_RESOURCES)]
        worker = self._node(name, self.root, args, self.env)
        self.nodes.append(worker)
        worker.start()
        worker.wait_started()
        return worker

    @property
    def head(self) -> Any:
        return self.nodes[0]

    def stop(self) -> None:
        from tests.test_multinode import _stop

        _stop(self.nodes[::-1], self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def processes_under(roots: Iterable[int]) -> list[Any]:
    """The live descendants of the processes ``roots``."""
    import psutil

    found = []
    for pid in roots:
        try:
            found += psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
    return found


def _title(process: Any) -> str:
    """A process's title (Ray names a busy actor's process ``ray::Class.method``)."""
    try:
        return Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return ""


def wait_for_title(node: Any, title: str, alive: Callable[[], bool], timeout_s: float) -> Any:
    """The first process of ``node`` whose title starts with ``title`` (e.g.
    ``ray::EngineActor.generate``: that actor is generating right now)."""
    actor = title.split(".")[0]
    deadline = time.monotonic() + timeout_s
    candidates: list[Any] = []
    refreshed = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() - refreshed > 0.5:
            if not alive():
                raise RuntimeError(f"the driver exited while waiting for {title}")
            candidates = [
                p for p in processes_under([node.proc.pid]) if _title(p).startswith(actor)
            ]
            refreshed = time.monotonic()
        for process in candidates:
            if _title(process).startswith(title):
                return process
        time.sleep(0.002)
    raise TimeoutError(f"no process titled {title} within {timeout_s} s")


# ---------------------------------------------------------------------- the runs


@dataclass
class Run:
    """One training job of the suite: its spec, run directory, driver launches and log."""

    name: str
    root: Path
    spec: dict[str, Any]
    env: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    exit_codes: list[int] = field(default_factory=list)
    injections: list[dict[str, Any]] = field(default_factory=list)
    drivers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def launch(self) -> subprocess.Popen:
        spec_file = self.root / f"{self.name}.json"
        spec_file.write_text(json.dumps(self.spec))
        with open(self.log, "ab") as out:
            driver = subprocess.Popen(
                [sys.executable, "-m", "services.driver", "--spec", str(spec_file)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        self.drivers.append(driver)
        return driver

    def kill_drivers(self) -> None:
        """SIGKILL whatever driver of this run still runs (after the suite gave up on it)."""
        for driver in self.drivers:
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=60)

    def wait_exit(self, driver: subprocess.Popen) -> int:
        try:
            code = driver.wait(timeout=DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            driver.kill()
            code = driver.wait(timeout=60)
        self.exit_codes.append(code)
        self.ended = time.monotonic()
        return code

    def wait_step(self, driver: subprocess.Popen, step: int) -> None:
        """Until ``metrics.jsonl`` records ``step``."""
        deadline = time.monotonic() + DRIVER_TIMEOUT_S
        while step not in {r.get("step") for r in self.metrics()}:
            if driver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: step {step} never came:\n{self.tail()}")
            time.sleep(0.05)

    def note(self, fault: str, step: int, done: str, when: float | None = None) -> None:
        """Record an injection: what was done, at which step and second of the run (``when``,
        a ``time.monotonic()``; default now)."""
        at = round((when or time.monotonic()) - self.started, 1)
        self.injections.append({"fault": fault, "step": step, "injected": done, "at_s": at})
        log.info("%s: %s (step %d, %.1f s)", self.name, done, step, at)

    def metrics(self) -> list[dict[str, Any]]:
        return _rows(self.dir / "metrics.jsonl")

    def groups(self) -> list[dict[str, Any]]:
        return _rows(self.dir / "groups.jsonl")

    def digest(self) -> str | None:
        final = self.dir / "final" / "model.safetensors"
        return hashlib.sha256(final.read_bytes()).hexdigest() if final.exists() else None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "wall_s": round((self.ended or time.monotonic()) - self.started, 1),
            "driver_exit_codes": self.exit_codes,
            "finished": self.finished,
            "steps": [r["step"] for r in self.metrics()],
            "final_sha256": self.digest(),
        }

    @property
    def finished(self) -> bool:
        return bool(self.exit_codes) and self.exit_codes[-1] == 0 and self.digest() is not None


def _rows(path: Path) -> list[dict[str, Any]]:
    from services.train.run_dir import _read_lines

    return _read_lines(path)


def job_spec(out_dir: Path, address: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The suite's job (see the module docstring); ``sections`` update its sections."""
    from services.embedded.arithmetic import base_model_dir, dataset_dir

    raw: dict[str, Any] = {
        "name": "faults",
        "seed": 7,
        "model": {"path": str(base_model_dir())},
        "data": {"train": str(dataset_dir() / "train.jsonl"), "eval": None},
        "rollout": {"engines": 1, "group_size": 4, "max_tokens": 24, "enforce_eager": True},
        "reward": {"verifiers": VERIFIERS},
        "train": {"steps": STEPS, "questions_per_step": 4, "lr": 1e-3, "eval_every": 0},
        "checkpoint": {"every": CHECKPOINT_EVERY, "keep_last": 3},
        "output": {"dir": str(out_dir)},
        "cluster": {"ray_address": address, "learner": {"replicas": 2}},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


class Suite:
    """The cluster, the runs' common environment, and the runs made so far."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.signal_dir = cluster.root / "signal"
        self.signal_dir.mkdir()
        self.env = {
            **cluster.env,
            "PYTHONUNBUFFERED": "1",
            "GRPO_REWARD_CUSTOM_VERIFIERS": json.dumps(CUSTOM_VERIFIERS),
            SIGNAL_DIR_ENV: str(self.signal_dir),
        }
        self.runs: list[Run] = []

    def new_run(self, name: str, **sections: dict[str, Any]) -> Run:
        out = self.cluster.root / name
        run = Run(
            name, self.cluster.root, job_spec(out, self.cluster.address, **sections), self.env
        )
        self.runs.append(run)
        return run

    def kill_while_scoring(self, run: Run, step: int) -> None:
        """Arm ``scoring_signal`` and SIGKILL the reward actor once it is scoring."""
        scoring = self.signal_dir / "scoring"
        scoring.unlink(missing_ok=True)
        (self.signal_dir / "arm").write_text("")
        deadline = time.monotonic() + DRIVER_TIMEOUT_S
        while not scoring.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the reward service never scored an armed batch")
            time.sleep(0.002)
        pid = int(scoring.read_text())
        os.kill(pid, signal.SIGKILL)
        run.note("reward_actor_sigkill", step, f"SIGKILL pid {pid} (the reward actor, scoring)")


def baseline_run(suite: Suite) -> Run:
    run = suite.new_run("baseline")
    if run.wait_exit(run.launch()) != 0:
        raise RuntimeError(f"the baseline failed:\n{run.tail()}")
    return run


def processes_run(suite: Suite) -> Run:
    """Engine SIGKILL at step 2, reward actor SIGKILL at step 3, driver SIGKILL after step 5."""
    run = suite.new_run("processes")
    head = suite.cluster.head
    driver = run.launch()
    run.wait_step(driver, 1)
    engine = wait_for_title(head, "ray::EngineActor.generate", _alive(driver), DRIVER_TIMEOUT_S)
    run.note("engine_sigkill", 2, sigkill(engine))
    run.wait_step(driver, 2)
    before = processes_under([head.proc.pid])
    suite.kill_while_scoring(run, 3)
    run.wait_step(driver, 3)
    run.injections[-1]["orphans"] = reap_orphans(before, suite.cluster)
    run.wait_step(driver, 5)
    before = processes_under([head.proc.pid])
    driver.send_signal(signal.SIGKILL)
    run.note("driver_sigkill", 5, f"SIGKILL of the driver (pid {driver.pid}) after step 5")
    run.wait_exit(driver)
    time.sleep(ORPHAN_GRACE_S)
    run.injections[-1]["orphans"] = reap_orphans(before, suite.cluster)
    run.wait_exit(run.launch())
    return run


def reward_http_run(suite: Suite) -> Run:
    """``reward.url`` through a proxy that answers 500 (step 2), hangs (3), garbage (5)."""
    from reward import RewardServer, RewardSettings

    faults = {2: "500", 3: "hang", 5: "garbage"}
    settings = RewardSettings(
        host="127.0.0.1", port=0, workers=1, log_level="warning", custom_verifiers=CUSTOM_VERIFIERS
    )
    upstream = RewardServer(settings)
    try:
        with FaultyRewardProxy(upstream.start(), faults, hang_s=REWARD_TIMEOUT_S + 2) as proxy:
            reward = {"url": proxy.url, "token_env": None, "timeout_s": REWARD_TIMEOUT_S}
            run = suite.new_run("reward_http", reward=reward)
            run.wait_exit(run.launch())
    finally:
        upstream.stop()
    for step, fault in faults.items():
        count, first = proxy.answers[(step, fault)], proxy.first_answered.get((step, fault))
        done = f"the reward service {HTTP_FAULT_VERBS[fault]} {count} requests of the step"
        run.note(f"reward_{fault}", step, done, when=first)
    return run


def two_nodes_run(suite: Suite) -> Run:
    """Learner-rank SIGKILL during step 3's update (the run fails; the same command
    resumes it), then loss of the worker node while it generates step 5."""
    cluster = suite.cluster
    worker = cluster.add_worker("worker")
    placed = {
        "learner": {"replicas": 2, "resources": {"learner_node": 1}},
        "engines": {"resources": {"rollout_node": 0.5}},
        "reward": {"resources": {"rollout_node": 0.25}},
    }
    run = suite.new_run("two_nodes", cluster=placed)
    driver = run.launch()
    run.wait_step(driver, 2)
    rank = wait_for_title(cluster.head, "ray::LearnerRank.train_step", _alive(driver), 300)
    run.note("learner_rank_sigkill", 3, sigkill(rank))
    run.injections[-1]["first_launch_exit_code"] = run.wait_exit(driver)
    run.injections[-1]["error"] = _error_line(run.log)
    driver = run.launch()
    run.wait_step(driver, 4)
    wait_for_title(worker, "ray::EngineActor.generate", _alive(driver), DRIVER_TIMEOUT_S)
    worker.remember_processes()
    for process in worker.seen:
        _kill_quietly(process)
    run.note("worker_node_loss", 5, f"SIGKILL of the worker node's {len(worker.seen)} processes")
    cluster.add_worker("worker-2")
    run.wait_exit(driver)
    return run


def sigkill(process: Any) -> str:
    """SIGKILL ``process``; says whom (its title, read first)."""
    title = _title(process)
    process.kill()
    return f"SIGKILL pid {process.pid} ({title})"


def reap_orphans(before: list[Any], cluster: Cluster) -> list[str]:
    """Kill the processes of ``before`` that still run but left the nodes' process trees
    (what a killed process left behind), and name them."""
    nodes = {p.pid for p in processes_under(n.proc.pid for n in cluster.nodes)}
    orphans = [p for p in before if p.pid not in nodes and p.is_running()]
    names = [f"{_title(p) or p.name()} (pid {p.pid})" for p in orphans]
    for process in orphans:
        _kill_quietly(process)
    return names


def _alive(driver: subprocess.Popen) -> Callable[[], bool]:
    return lambda: driver.poll() is None


def _kill_quietly(process: Any) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        process.kill()


def _error_line(log_file: Path) -> str | None:
    """The last line of the driver's log naming an error (the run's failure)."""
    lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if "Error" in ln]
    return lines[-1].strip()[:300] if lines else None


# --------------------------------------------------------------------- reporting


@dataclass(frozen=True)
class Fault:
    """What the suite expects of one fault, and where to look for what happened."""

    description: str
    steps: tuple[int, ...]
    """The steps whose groups it touches (those counted against the baseline)."""
    weights_equal: bool
    """Whether the final weights should equal the baseline's."""
    evidence: str
    """A pattern of the driver's log lines that say what happened."""


FAULTS = {
    "engine_sigkill": Fault(
        "SIGKILL of the engine's actor mid-generation",
        (2,), True, r"engine \d+ (failed|did not answer)|replacement for engine",
    ),
    "reward_actor_sigkill": Fault(
        "SIGKILL of the reward service's actor mid-scoring",
        (3,), True, r"reward service .*(retry 1|died; starting)|step 3: .*unscorable",
    ),
    "driver_sigkill": Fault(
        "SIGKILL of the driver, then the same command again",
        (5, 6), True, r"resumed from|dropping a torn",
    ),
    "reward_500": Fault(
        "the reward service answers 500 for one step", (2,), False,
        r"answered 500.*retry 1|step 2: .*unscorable",
    ),
    "reward_hang": Fault(
        "the reward service hangs for one step", (3,), False,
        r"(Timeout|timed out).*retry 1|step 3: .*unscorable",
    ),
    "reward_garbage": Fault(
        "the reward service answers garbage for one step", (5,), False,
        r"step 5: .*unscorable",
    ),
    "worker_node_loss": Fault(
        "loss of the worker node (engine and reward service on it)",
        (5,), True, r"engine \d+ (failed|did not answer)|replacement for engine|died; starting",
    ),
    "learner_rank_sigkill": Fault(
        "SIGKILL of a learner rank (2 ranks), then the same command again",
        (3, 4), True, r"resumed from",
    ),
}  # fmt: skip


def evidence(log_file: Path, pattern: str, limit: int = 4) -> list[str]:
    """The first distinct log lines matching ``pattern``, without timestamps and URLs."""
    found: list[str] = []
    for line in log_file.read_text(errors="replace").splitlines():
        if not re.search(pattern, line):
            continue
        text = re.sub(r"^\S+ \S+ (INFO|WARNING|ERROR) ", "", line.strip())
        text = re.sub(r"https?://\S+", "<url>", text)
        text = re.sub(r"\b[0-9a-f]{16,}\b", "…", text)
        text = re.sub(r"/\S+/(checkpoints/step_\d+)", r"\1", text)[:200]
        if text not in found:
            found.append(text)
        if len(found) == limit:
            break
    return found


def fault_result(injection: dict[str, Any], run: Run, baseline: Run) -> dict[str, Any]:
    fault = FAULTS[injection["fault"]]
    equal = run.digest() is not None and run.digest() == baseline.digest()
    step_s = {r["step"]: r.get("time/step_s") for r in run.metrics()}
    result = {
        **injection,
        "description": fault.description,
        "run": run.name,
        "what_happened": evidence(run.log, fault.evidence),
        "run_finished": run.finished,
        "groups_counted_steps": list(fault.steps),
        "groups": count_groups(baseline.groups(), run.groups(), fault.steps),
        "weights_should_equal_baseline": fault.weights_equal,
        "final_weights_equal_baseline": equal,
        "losses_equal_baseline": _losses(run) == _losses(baseline),
        "step_s": step_s.get(injection["step"]),
    }
    result["as_expected"] = _as_expected(result)
    return result


def _losses(run: Run) -> list[tuple[int, Any, Any]]:
    return [(r["step"], r.get("loss/policy"), r.get("loss/kl")) for r in run.metrics()]


def _as_expected(result: dict[str, Any]) -> bool:
    groups = result["groups"]
    accounted = groups["lost"] == groups["duplicated"] == groups["unexpected"] == 0
    weights = result["final_weights_equal_baseline"] or not result["weights_should_equal_baseline"]
    failed_clearly = "first_launch_exit_code" not in result or (
        result["first_launch_exit_code"] != 0
        and re.search(r"learner rank \d+ of \d+ died", result.get("error") or "") is not None
    )
    return accounted and weights and failed_clearly and result["run_finished"]


def markdown_table(faults: list[dict[str, Any]]) -> str:
    rows = [
        "| fault | run, step | what happened (driver log) | finished | groups lost / duplicated"
        " | final weights = baseline |",
        "|---|---|---|---|---|---|",
    ]
    for r in faults:
        groups = r["groups"]
        weights = "yes" if r["final_weights_equal_baseline"] else "no"
        if not r["weights_should_equal_baseline"]:
            weights += " (not expected: the step had no update)"
        happened = "; ".join(_cut(line) for line in r["what_happened"][:3]) or "nothing logged"
        if r.get("error"):
            happened = f"first launch failed: {r['error']}; then {happened}"
        rows.append(
            f"| {r['description']} | {r['run']}, {r['step']} | {happened.replace('|', '/')} "
            f"| {'yes' if r['run_finished'] else 'NO'} | {groups['lost']} / {groups['duplicated']}"
            f" | {weights} |"
        )
    return "\n".join(rows)


def _cut(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def write_table(table: str, doc: Path = DOCS / "reliability.md") -> None:
    """Replace the table between the markers of docs/reliability.md."""
    text = doc.read_text()
    head, _, rest = text.partition(TABLE_BEGIN)
    _, _, tail = rest.partition(TABLE_END)
    doc.write_text(f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}")


def report(suite: Suite, errors: dict[str, str], wall_s: float, load: dict) -> dict[str, Any]:
    baseline = suite.runs[0]
    faults = [fault_result(i, run, baseline) for run in suite.runs[1:] for i in run.injections]
    baseline_steps = [r["time/step_s"] for r in baseline.metrics() if "time/step_s" in r]
    return {
        "settings": {k: v for k, v in baseline.spec.items() if k not in ("output", "model")},
        "suite_wall_s": round(wall_s, 1),
        "load": load,
        "baseline": {**baseline.summary(), "step_s": baseline_steps},
        "runs": [
            {**run.summary(), "groups": count_groups(baseline.groups(), run.groups())}
            for run in suite.runs[1:]
        ],
        "run_errors": errors,
        "faults": faults,
        "goal": "0 groups lost or duplicated, every run finishes or fails with a clear error, "
        "final weights bit-equal to the baseline's where they should be",
        "goal_met": not errors and all(f["as_expected"] for f in faults),
    }


RUNS = (processes_run, reward_http_run, two_nodes_run)


def run_suite(cluster: Cluster) -> tuple[Suite, dict[str, str]]:
    """The baseline, then each run of :data:`RUNS`; a run that breaks is recorded."""
    cluster.start_head()
    suite, errors = Suite(cluster), {}
    baseline_run(suite)
    for make in RUNS:
        try:
            make(suite)
        except Exception as error:  # record it; the other runs still tell something
            log.exception("%s failed", make.__name__)
            errors[make.__name__] = f"{type(error).__name__}: {error}"[:2000]
            suite.runs[-1].kill_drivers()
    return suite, errors


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started, machine, tracker = time.monotonic(), machine_info(), LoadTracker()
    cluster = Cluster()
    try:
        suite, errors = run_suite(cluster)
        load = {**tracker.summary(), "loadavg_end": loadavg()}
        result = {"machine": machine, **report(suite, errors, time.monotonic() - started, load)}
    finally:
        cluster.stop()
    out = write_result("faults", result)
    write_table(markdown_table(result["faults"]))
    bad = [f["fault"] for f in result["faults"] if not f["as_expected"]]
    update_summary(
        "fault suite (`bench/faults.py`)",
        f"{len(result['faults'])} faults in {result['suite_wall_s']:.0f} s: "
        + ("all as expected" if result["goal_met"] else f"not as expected: {bad or errors}"),
        "0 groups lost or duplicated; resumes bit-exact",
        load_text(load),
    )
    print(f"wrote {out}; goal met: {result['goal_met']} ({result['suite_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
