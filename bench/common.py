"""What the benchmarks share: the machine record, load checks, results and runs of `grpo train`.

- ``machine_info()`` — cores, memory, CPU model, load average (recorded in every JSON).
- ``wait_for_quiet()`` — this machine is shared: before a timed section, wait (up to a
  few minutes) for the load average to drop, or for the other processes to go quiet,
  and record whether the measurement still ran under load; ``LoadTracker`` records the
  load and the other processes' CPU use all along.
- ``write_result()`` / ``update_summary()`` — ``bench/results/<name>.json`` and one row
  per benchmark in ``bench/results/summary.md``; ``read_result()`` and ``merge_rows()``
  let a run that measures part of a benchmark keep the rest of its file.
- ``names()`` — the items of a comma-separated option; ``model_dir()`` — the directory of
  a model the benchmarks name (``demo``, or a size of ``services.embedded.tiny_model``).
- ``GrpoRun`` / ``run_grpo_train()`` — ``grpo train`` in a subprocess with ``--set``
  overrides, its run directory in a temporary folder, and the wall-clock time at which
  each ``metrics.jsonl`` line appeared (which separates start-up from steps).

Every ``grpo train`` the suite starts gets ``RAY_ADDRESS=local`` (a fresh local Ray, never
a cluster that someone else started with ``ray start`` on this machine) and
``RAY_worker_niceness=0`` (at Ray's default niceness of 15 the engines and the learner
would yield to any niceness-0 process of the same session, such as the other side of a
comparison, which would then measure the priority instead of the system).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SUMMARY = RESULTS / "summary.md"
DOCS = REPO / "docs"
ARITHMETIC = REPO / "examples" / "arithmetic"
OUTCOME_YAML = ARITHMETIC / "outcome.yaml"
QUIET_LOAD = 3.0
"""1-minute load average above which a measurement counts as taken under load..."""
QUIET_OTHER_CORES = 0.3
"""...unless the other processes use no more than this many cores right now."""

# Settings of every benchmark run of `grpo train`: no evaluation, no mid-run checkpoint.
BENCH_OVERRIDES = ("data.eval=null", "train.eval_every=0", "checkpoint.every=0")


# ------------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    """The machine: platform, cores, memory, CPU model and the load average now."""
    model, mem_kib = "", 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "loadavg": loadavg(),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def other_cores(window_s: float = 3.0) -> dict[str, float]:
    """Cores that processes outside this process tree kept busy over ``window_s``: in all,
    and split by niceness (below 10; 10 or more, e.g. Ray's workers at their default 15)."""
    hz = os.sysconf("SC_CLK_TCK")
    before = _cpu_ticks()
    time.sleep(window_s)
    after, mine = _cpu_ticks(), _own_tree()
    busy = {"nice_lt_10": 0.0, "nice_ge_10": 0.0}
    for pid, (total, nice) in after.items():
        if pid not in mine:
            key = "nice_lt_10" if nice < 10 else "nice_ge_10"
            busy[key] += max(total - before.get(pid, (0, nice))[0], 0) / hz / window_s
    busy["total"] = busy["nice_lt_10"] + busy["nice_ge_10"]
    return {k: round(v, 2) for k, v in busy.items()}


def wait_for_quiet(
    max_load: float = QUIET_LOAD,
    max_other_cores: float = QUIET_OTHER_CORES,
    max_wait_s: float = 240.0,
) -> dict[str, Any]:
    """Wait (at most ``max_wait_s``) until the machine is quiet enough to measure.

    Quiet: the 1-minute load average is at most ``max_load``, or the other processes of
    the machine use at most ``max_other_cores`` right now (the load average lags by a
    minute). Niceness does not help here: the kernel groups processes by session
    (``sched_autogroup``), so another session's niceness-15 processes take an equal
    share of the CPU from a niceness-0 benchmark. Returns what to record; a measurement
    that starts while neither holds is marked ``under_load``. ``BENCH_MAX_WAIT_S`` in
    the environment overrides ``max_wait_s`` (0: never wait); ``BENCH_WAIT_LEDGER`` (a
    file) and ``BENCH_WAIT_BUDGET_S`` cap the waiting of all benchmarks of one suite run.
    """
    max_wait_s = float(os.environ.get("BENCH_MAX_WAIT_S", max_wait_s))
    ledger = os.environ.get("BENCH_WAIT_LEDGER")  # set by run_all: one budget for the suite
    if ledger:
        spent = float(Path(ledger).read_text() or 0) if Path(ledger).exists() else 0.0
        budget = float(os.environ.get("BENCH_WAIT_BUDGET_S", "600"))
        max_wait_s = min(max_wait_s, max(budget - spent, 0.0))
    before = loadavg()
    start = time.monotonic()
    while True:
        others = other_cores()
        quiet = os.getloadavg()[0] <= max_load or others["total"] <= max_other_cores
        if quiet or time.monotonic() - start >= max_wait_s:
            break
        time.sleep(7.0)
    now = loadavg()
    if ledger:
        Path(ledger).write_text(str(spent + time.monotonic() - start))
    record = {
        "loadavg_when_asked": before,
        "waited_s": round(time.monotonic() - start, 1),
        "loadavg_at_start": now,
        "other_cores_at_start": others,
        "quiet_rule": f"loadavg <= {max_load} or other processes use <= {max_other_cores} cores",
        "under_load": not quiet,
    }
    if not quiet:
        print(
            f"  note: load average {now[0]}, other processes use {others['total']} cores after "
            f"waiting {record['waited_s']} s; measuring anyway (recorded as under_load)",
            flush=True,
        )
    return record


class LoadTracker:
    """Watches the machine in a background thread while a benchmark runs.

    Every ``interval`` seconds it records the 1-minute load average and how many cores
    the *other* processes of the machine (everything but this process and its
    descendants: the benchmark's subprocesses, their Ray and engines) kept busy, split
    by niceness (with ``sched_autogroup`` on, as here, niced processes of other
    sessions still take their session's equal share)."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self.other_cores: dict[str, list[float]] = {"nice_lt_10": [], "nice_ge_10": []}
        self._previous = (time.monotonic(), _cpu_ticks())
        self._stop = threading.Event()
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        self.samples.append(round(os.getloadavg()[0], 2))
        now, ticks = time.monotonic(), _cpu_ticks()
        then, before = self._previous
        if now - then >= 0.5:
            mine = _own_tree()
            busy = {"nice_lt_10": 0, "nice_ge_10": 0}
            for pid, (total, nice) in ticks.items():
                if pid in mine:
                    continue
                key = "nice_lt_10" if nice < 10 else "nice_ge_10"
                busy[key] += total - before.get(pid, (0, nice))[0]
            hz = os.sysconf("SC_CLK_TCK")
            for key, value in busy.items():
                self.other_cores[key].append(max(value, 0) / hz / (now - then))
            self._previous = (now, ticks)

    def summary(self) -> dict[str, Any]:
        self._stop.set()
        self.sample()
        return {
            "min": min(self.samples),
            "median": round(statistics.median(self.samples), 2),
            "max": max(self.samples),
            "samples": len(self.samples),
            "other_processes_cores_mean": {
                key: round(mean(values), 2) if values else None
                for key, values in self.other_cores.items()
            },
        }


def _cpu_ticks() -> dict[int, tuple[int, int]]:
    """pid → (user + system clock ticks, niceness) of every process, from /proc."""
    ticks = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[int(entry.name)] = (int(fields[11]) + int(fields[12]), int(fields[16]))
    return ticks


def _own_tree() -> set[int]:
    """This process and its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, frontier = set(), [os.getpid()]
    while frontier:
        pid = frontier.pop()
        tree.add(pid)
        frontier.extend(parents.get(pid, []))
    return tree


# ------------------------------------------------------------------------ results


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    return out


def read_result(name: str) -> dict[str, Any]:
    """``bench/results/<name>.json`` as last written, or ``{}`` when there is none."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def merge_rows(result: dict[str, Any], key: str, rows: dict[str, Any]) -> None:
    """Put ``rows`` into ``result[key]``, replacing rows of the same name, keeping others."""
    result[key] = {**result.get(key, {}), **rows}


def names(text: str) -> list[str]:
    """The items of a comma-separated option: ``"a,,b"`` → ``["a", "b"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def model_dir(name: str) -> Path:
    """``demo``: the arithmetic demo's base model (made when missing); else the
    ``services.embedded.tiny_model`` of that size (``tiny``, ``small``, ``20m``, ``100m``)."""
    if name == "demo":
        ensure_arithmetic_assets()
        return ARITHMETIC / "assets" / "base-model"
    from services.embedded.tiny_model import tiny_model_dir

    return tiny_model_dir(name)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M")


_SUMMARY_HEAD = [
    "# Benchmark summary",
    "",
    "One row per benchmark, rewritten by each run (`make bench`, or a script alone).",
    "Load: the 1-minute load average during the benchmark (min–max) and the cores that",
    "other people's processes on this shared 2-core machine kept busy on average while it",
    "ran. Details and caveats: docs/benchmarks.md.",
    "",
    "| benchmark | result | target | load | when (UTC) |",
    "|---|---|---|---|---|",
]


def update_summary(key: str, result: str, target: str, load: str) -> None:
    """Replace (or add) the row of ``key`` in ``bench/results/summary.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: dict[str, str] = {}
    if SUMMARY.exists():
        for line in SUMMARY.read_text().splitlines():
            if line.startswith("| ") and not line.startswith(("| benchmark ", "|---")):
                name = line.split("|")[1].strip()
                rows[name] = line
    when = utc_now()
    clean = [s.replace("|", "/") for s in (key, result, target, load)]
    rows[key] = f"| {clean[0]} | {clean[1]} | {clean[2]} | {clean[3]} | {when} |"
    text = "\n".join(_SUMMARY_HEAD + [rows[k] for k in sorted(rows)]) + "\n"
    tmp = SUMMARY.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(SUMMARY)


def load_text(tracker: dict[str, Any]) -> str:
    """``"load 2.1–3.4; others used 0.4 cores"`` from ``LoadTracker.summary()``."""
    text = f"load {tracker['min']:.1f}–{tracker['max']:.1f}"
    cores = tracker.get("other_processes_cores_mean", {})
    if cores.get("nice_lt_10") is not None:
        text += f"; others used {cores['nice_lt_10'] + cores['nice_ge_10']:.1f} cores"
    return text


def combined_load(trackers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``LoadTracker.summary()`` of several runs as one: the lowest and highest load, and
    the busiest run's mean of the cores other processes used (for ``load_text``)."""
    cores = [t.get("other_processes_cores_mean", {}) for t in trackers]
    busiest = max(cores, key=lambda c: (c.get("nice_lt_10") or 0) + (c.get("nice_ge_10") or 0))
    return {
        "min": min(t["min"] for t in trackers),
        "max": max(t["max"] for t in trackers),
        "other_processes_cores_mean": busiest,
    }


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


# ------------------------------------------------------------------- grpo train


def ensure_arithmetic_assets() -> None:
    """``grpo arithmetic prepare`` unless the assets exist (cached; about a minute cold)."""
    assets = ARITHMETIC / "assets"
    if (assets / "base-model" / "config.json").exists() and (assets / "train.jsonl").exists():
        return
    subprocess.run([str(grpo_executable()), "arithmetic", "prepare"], cwd=REPO, check=True)


def grpo_executable() -> Path:
    return Path(sys.executable).parent / "grpo"


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a benchmark subprocess (see the module docstring)."""
    env = dict(os.environ)
    env.update({"RAY_ADDRESS": "local", "RAY_worker_niceness": "0", "PYTHONUNBUFFERED": "1"})
    # `bench.boxed_reward` must import in the driver and in Ray's workers.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


@dataclass
class GrpoRun:
    """One finished ``grpo train``: its metrics and when each metrics line appeared."""

    overrides: list[str]
    wall_s: float
    metrics: list[dict[str, Any]]
    line_times: list[float] = field(default_factory=list)
    """Seconds from the start of the process to each metrics line's appearance."""
    log_tail: str = ""
    placement: dict[str, Any] = field(default_factory=dict)
    """The run's ``placement.json``, with its start-up times (``startup_s``)."""

    def steps(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m.get("step", 0) >= 1 and "time/step_s" in m]

    @property
    def startup_s(self) -> float:
        """Process start until the first step began: imports, Ray, engine, learner."""
        first = next((t for m, t in zip(self.metrics, self.line_times) if m.get("step") == 1), None)
        if first is None:
            return float("nan")
        return first - self.steps()[0]["time/step_s"]

    @property
    def teardown_s(self) -> float:
        """Last metrics line until the process exited: final checkpoint, plots, shutdown."""
        return self.wall_s - self.line_times[-1] if self.line_times else float("nan")


def run_grpo_train(
    overrides: Sequence[str],
    *,
    config: Path = OUTCOME_YAML,
    env_extra: dict[str, str] | None = None,
    keep_dir: Path | None = None,
    timeout_s: float = 900.0,
    on_poll: Any = None,
) -> GrpoRun:
    """Run ``grpo train CONFIG --set ...`` (plus ``BENCH_OVERRIDES`` and a temporary
    ``output.dir``) and collect its metrics. ``on_poll(proc, lines)`` is called about
    every 0.1 s while it runs, with the number of metrics lines written so far (the
    memory benchmark samples processes there)."""
    tmp = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    run_dir = keep_dir or tmp / "run"
    sets = [*BENCH_OVERRIDES, *overrides, f"output.dir={run_dir}"]
    command = [str(grpo_executable()), "train", str(config)]
    for assignment in sets:
        command += ["--set", assignment]
    log_path = tmp / "train.log"
    metrics_file = run_dir / "metrics.jsonl"
    line_times: list[float] = []
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=bench_env(env_extra), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            while proc.poll() is None:
                if time.perf_counter() - start > timeout_s:
                    proc.terminate()
                    proc.wait(60)
                    raise RuntimeError(f"grpo train ran past {timeout_s} s: {command}")
                _note_new_lines(metrics_file, line_times, time.perf_counter() - start)
                if on_poll is not None:
                    on_poll(proc, len(line_times))
                time.sleep(0.1)
        except BaseException:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
            raise
    wall = time.perf_counter() - start
    _note_new_lines(metrics_file, line_times, wall)
    tail = log_path.read_text(errors="replace")[-4000:]
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"grpo train failed ({proc.returncode}):\n{tail}")
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    placement_file = run_dir / "placement.json"
    placement = json.loads(placement_file.read_text()) if placement_file.exists() else {}
    shutil.rmtree(tmp, ignore_errors=True)
    return GrpoRun(list(sets), wall, metrics, line_times, tail, placement)


def _note_new_lines(path: Path, times: list[float], now: float) -> None:
    try:
        count = path.read_bytes().count(b"\n")
    except OSError:
        return
    times.extend([round(now, 2)] * (count - len(times)))
