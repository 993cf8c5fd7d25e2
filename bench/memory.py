"""Benchmark: peak resident memory of every process of the demo, by role.

Runs a short ``grpo train`` of the arithmetic demo (``--steps``, evaluation off) and,
every ``--interval`` seconds while it runs, walks the process tree of the ``grpo``
process: the local Ray it starts (GCS, raylet, dashboard and agents) and Ray's workers
are its descendants, and so are the processes the actors start (the engine actor's vLLM
EngineCore and Worker, the reward service's verifier processes). Each process gets a
role from its title and its ancestors, and the peak RSS (and PSS, which shares pages
among the processes that map them, where ``/proc/PID/smaps_rollup`` is readable) of
each process is kept, and its CPU time. Reports, per role, the largest single-process
peak, the peak of the role's sum, the number of processes and their CPU seconds; and the
peak of the whole tree.
Writes ``bench/results/memory.json``.

    python bench/memory.py [--steps 6] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import (  # noqa: E402
    LoadTracker,
    ensure_arithmetic_assets,
    load_text,
    machine_info,
    run_grpo_train,
    update_summary,
    wait_for_quiet,
    write_result,
)

MIB = 2**20
RAY_SYSTEM = (
    ("gcs_server", "ray: gcs_server"),
    ("/raylet", "ray: raylet"),
    ("dashboard/agent.py", "ray: dashboard agent"),
    ("dashboard.py", "ray: dashboard"),
    ("runtime_env/agent", "ray: runtime env agent"),
    ("log_monitor.py", "ray: log monitor"),
    ("autoscaler/_private/monitor.py", "ray: autoscaler monitor"),
)
ACTORS = {
    "Learner": "learner actor",
    "EngineActor": "engine actor",
    "RewardService": "reward service actor",
    "IDLE": "ray: idle worker",
    "DashboardAgent": "ray: dashboard agent",
    "RuntimeEnvAgent": "ray: runtime env agent",
}


def own_role(title: str) -> str | None:
    """A role from a process's own title, or None when only its ancestors tell."""
    if title.startswith("VLLM::EngineCore"):
        return "vLLM EngineCore"
    if title.startswith("VLLM::Worker"):
        return "vLLM Worker"
    if title.startswith("ray::"):
        name = title[5:].split(".")[0].split()[0]
        return ACTORS.get(name, f"ray actor {name}")
    for marker, role in RAY_SYSTEM:
        if marker in title:
            return role
    return None


def child_role(parent_role: str) -> str:
    """The role of an untitled process, from its nearest titled ancestor."""
    if parent_role.startswith("reward service"):
        return "reward service: verifier processes"
    if parent_role.startswith(("engine", "vLLM")):
        return "engine: helper processes (resource tracker, compiler)"
    if parent_role.startswith(("ray:", "other")):
        return parent_role  # e.g. the dashboard's head modules
    return f"child of {parent_role}"


class Sampler:
    """Peak memory per process of one process tree, sampled on demand."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = 0.0
        self.peaks: dict[tuple[int, float], dict] = {}  # (pid, create_time) -> record
        self.tree_peak = {"rss": 0, "pss": 0}
        self.snapshots: list[list[tuple[tuple[int, float], int]]] = []
        self.lines = 0
        self.step_marks: list[tuple[float, dict]] = []  # (time, CPU s per process) per step
        self.samples = 0
        self.pss_readable = True

    def __call__(self, proc, lines: int) -> None:
        now = time.monotonic()
        if lines != self.lines:  # a step ended: mark the CPU time of every process
            self.lines = lines
            self.sample(proc.pid)
            self.step_marks.append((now, {k: r["cpu_s"] for k, r in self.peaks.items()}))
            return
        if now - self.last < self.interval:
            return
        self.last = now
        self.sample(proc.pid)

    def sample(self, root_pid: int) -> None:
        import psutil

        try:
            root = psutil.Process(root_pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        roles: dict[int, str] = {root_pid: "driver (grpo train)"}
        total = {"rss": 0, "pss": 0}
        snapshot = []
        for process in tree:  # parents come before their children
            try:
                key = (process.pid, process.create_time())
                title = " ".join(process.cmdline()) or process.name()
                role = roles.get(process.pid) or own_role(title)
                if role is None:
                    role = child_role(roles.get(process.ppid(), "other (parent not seen)"))
                roles[process.pid] = role
                rss, pss = process.memory_info().rss, self._pss(process) or 0
                times = process.cpu_times()
            except psutil.Error:
                continue
            total["rss"] += rss
            total["pss"] += pss
            snapshot.append((key, rss))
            record = self.peaks.setdefault(
                key, {"pid": process.pid, "rss": 0, "pss": 0, "cpu_s": 0.0}
            )
            record["role"], record["title"] = role, title[:80]  # titles change as processes start
            record["rss"] = max(record["rss"], rss)
            record["pss"] = max(record["pss"], pss)
            record["cpu_s"] = max(record["cpu_s"], times.user + times.system)
        self.tree_peak = {k: max(self.tree_peak[k], total[k]) for k in total}
        self.snapshots.append(snapshot)
        self.samples += 1

    def _pss(self, process) -> int | None:
        if not self.pss_readable:
            return None
        import psutil

        try:
            return process.memory_full_info().pss
        except psutil.NoSuchProcess:
            return None
        except (psutil.AccessDenied, AttributeError):  # no smaps here: RSS only
            self.pss_readable = False
            return None

    def role_sum_peaks(self) -> dict[str, int]:
        """Per role, the largest sum of its processes' RSS in one sample (final roles)."""
        peaks: dict[str, int] = {}
        for snapshot in self.snapshots:
            sums: dict[str, int] = {}
            for key, rss in snapshot:
                role = self.peaks[key]["role"]
                sums[role] = sums.get(role, 0) + rss
            for role, value in sums.items():
                peaks[role] = max(peaks.get(role, 0), value)
        return peaks

    def steady_cores(self) -> dict[str, Any]:
        """Cores each role kept busy from the end of step 1 to the end of the last step."""
        if len(self.step_marks) < 2:
            return {}
        (t0, first), (t1, last) = self.step_marks[0], self.step_marks[-1]
        cores: dict[str, float] = {}
        for key, cpu in last.items():
            role = self.peaks[key]["role"]
            cores[role] = cores.get(role, 0.0) + (cpu - first.get(key, 0.0)) / (t1 - t0)
        return {
            "window_s": round(t1 - t0, 1),
            "steps": len(self.step_marks) - 1,
            "cores_by_role": {
                k: round(v, 3) for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v > 0
            },
        }

    def by_role(self) -> dict[str, dict]:
        sum_peaks = self.role_sum_peaks()
        roles: dict[str, dict] = {}
        for record in self.peaks.values():
            entry = roles.setdefault(
                record["role"],
                {"processes": 0, "max_rss_mib": 0.0, "max_pss_mib": 0.0, "cpu_s": 0.0},
            )
            entry["processes"] += 1
            entry["cpu_s"] = round(entry["cpu_s"] + record["cpu_s"], 1)
            entry["max_rss_mib"] = max(entry["max_rss_mib"], round(record["rss"] / MIB, 1))
            entry["max_pss_mib"] = max(entry["max_pss_mib"], round(record["pss"] / MIB, 1))
        for role, entry in roles.items():
            entry["role_sum_peak_rss_mib"] = round(sum_peaks.get(role, 0) / MIB, 1)
        return dict(sorted(roles.items(), key=lambda kv: -kv[1]["max_rss_mib"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    args = parser.parse_args()

    ensure_arithmetic_assets()
    info = machine_info()
    tracker = LoadTracker()
    quiet = wait_for_quiet()
    sampler = Sampler(args.interval)
    overrides = [f"train.steps={args.steps}", f"train.warmup_steps={min(5, args.steps)}"]
    run = run_grpo_train(overrides, on_poll=sampler)
    tracker.sample()
    roles = sampler.by_role()
    load = tracker.summary()
    result = {
        "benchmark": "peak memory per process role of the demo (grpo train, arithmetic)",
        "config": "examples/arithmetic/outcome.yaml, eval off",
        "steps": args.steps,
        "samples": sampler.samples,
        "interval_s": args.interval,
        "pss_available": sampler.pss_readable,
        "roles": roles,
        "tree_peak_rss_mib": round(sampler.tree_peak["rss"] / MIB, 1),
        "tree_peak_pss_mib": round(sampler.tree_peak["pss"] / MIB, 1)
        if sampler.pss_readable
        else None,
        "note": "RSS counts shared pages (forked workers, shared libraries) in every process "
        "that maps them, so sums of RSS overstate; PSS splits shared pages among them",
        "processes": sorted(
            (
                {
                    "pid": r["pid"],
                    "role": r["role"],
                    "title": r["title"],
                    "peak_rss_mib": round(r["rss"] / MIB, 1),
                    "peak_pss_mib": round(r["pss"] / MIB, 1),
                    "cpu_s": round(r["cpu_s"], 1),
                }
                for r in sampler.peaks.values()
            ),
            key=lambda r: -r["peak_rss_mib"],
        ),
        "cpu_note": "cpu_s: CPU seconds (user + system) each process had used at its last "
        "sample, over the whole run (start-up included); steady_state_cpu: cores busy per "
        "role between the end of step 1 and the end of the last step",
        "steady_state_cpu": sampler.steady_cores(),
        "run_wall_s": round(run.wall_s, 1),
        "run_startup_s": round(run.startup_s, 1),
        "step_s": [round(m["time/step_s"], 3) for m in run.steps()],
        "machine": info,
        "load": quiet,
        "load_during": load,
    }
    out = write_result("memory", result)
    top = [
        f"{role} {entry['max_rss_mib']:.0f}"
        for role, entry in roles.items()
        if not role.startswith("ray:")
    ]
    line = (
        f"peak RSS MiB per process: {', '.join(top)}; whole tree {result['tree_peak_rss_mib']:.0f} "
        f"MiB RSS"
        + (f" / {result['tree_peak_pss_mib']:.0f} MiB PSS" if sampler.pss_readable else "")
    )
    update_summary("memory", line, "—", load_text(load))
    print(f"memory ({sampler.samples} samples): {line} -> {out}")


if __name__ == "__main__":
    main()
