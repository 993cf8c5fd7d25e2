"""The benchmark suite (``make bench``): every benchmark, one at a time, then the summary.

Each benchmark runs in its own process (a fresh Ray and fresh engines; one failure does
not stop the others) and waits, before each timed section, for the machine's load
average to drop (``bench.common.wait_for_quiet``). The order puts the cheap ones first
and lets ``weight_sync`` use the step time that ``step_breakdown`` measured. About 17
minutes on 2 quiet cores (``weight_sync``, with its LoRA rows, about 4 of them), plus at
most ``--wait-budget`` (10 minutes) of waiting for a quiet machine in all, plus about 4
minutes once to install TRL into ``bench/.venv-trl``.

``bench/rollout.py`` (generation throughput against bare vLLM; 10+ minutes),
``bench/vllm_spin.py`` (an experiment, 5 minutes), ``bench/engine_runtime.py`` (4
minutes), ``bench/gpu_learner.py`` (needs a
CUDA GPU), ``bench/faults.py`` (the fault suite, under 15 minutes) and
``bench/learner_scaling.py`` (1 against 2 learner ranks, and LoRA against full
fine-tuning on the 20m and 100m models: about 6 minutes) run only when
named in ``--with`` or ``--only``: with them ``make bench`` would pass 22 minutes.
``bench/reward.py`` and ``bench/rollout.py`` write no summary row themselves: theirs
are made here from their latest result files.

    python -m bench.run_all [--only a,b] [--skip a,b] [--with rollout,vllm_spin]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import REPO, RESULTS, SUMMARY, loadavg, update_summary  # noqa: E402

BENCHMARKS: dict[str, list[str]] = {
    "learner_efficiency": ["bench/learner_efficiency.py"],
    "step_breakdown": ["bench/step_breakdown.py"],
    "weight_sync": ["bench/weight_sync.py"],
    "memory": ["bench/memory.py"],
    "trl_compare": ["bench/trl_compare.py"],
    "reward": ["bench/reward.py"],
    "rollout": ["bench/rollout.py"],
    "vllm_spin": ["bench/vllm_spin.py"],
    "engine_runtime": ["bench/engine_runtime.py"],
    "gpu_learner": ["bench/gpu_learner.py"],
    "faults": ["bench/faults.py"],
    "learner_scaling": ["bench/learner_scaling.py"],
}
OPTIONAL = {"rollout", "vllm_spin", "engine_runtime", "gpu_learner", "faults", "learner_scaling"}
"""Run only when named in ``--with`` or ``--only``."""


def summary_rows_from_files() -> None:
    """Summary rows of the benchmarks that write no row themselves, from their result files."""
    reward = RESULTS / "reward.json"
    if reward.exists():
        r = json.loads(reward.read_text())
        load = r.get("machine", {}).get("loadavg_before", [float("nan")])[0]
        update_summary(
            "reward service (HTTP vs in-process)",
            f"HTTP {r['http_items_per_s']} items/s vs in-process {r['inprocess_items_per_s']}: "
            f"ratio {r['ratio_http_to_inprocess']} (from {reward.name})",
            f"≥ {r.get('target_ratio', 0.8)}",
            f"{load:.1f} (before)",
        )
    rollout = RESULTS / "rollout.json"
    if rollout.exists():
        r = json.loads(rollout.read_text())
        load = r.get("machine", {}).get("loadavg_before", [float("nan")])[0]
        update_summary(
            "rollout pool vs bare vLLM",
            f"pool {r['pool_1_engine']['tokens_per_s']} tok/s vs bare {r['bare']['tokens_per_s']}: "
            f"ratio {r['ratio_pool_to_bare']} ({r['model']}, from {rollout.name})",
            f"≥ {r.get('target_ratio', 0.95)}",
            f"{load:.1f} (before)",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names")
    parser.add_argument(
        "--with", dest="extra", default="", help=f"also run these: {', '.join(sorted(OPTIONAL))}"
    )
    parser.add_argument(
        "--wait-budget",
        type=float,
        default=600,
        help="seconds all benchmarks together may wait for a quiet machine",
    )
    args = parser.parse_args()
    only = {n for n in args.only.split(",") if n}
    skip = {n for n in args.skip.split(",") if n}
    extra = {n for n in args.extra.split(",") if n}
    unknown = (only | skip | extra) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmarks {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    chosen = [
        name
        for name in BENCHMARKS
        if (name in only if only else name not in skip)
        and (name not in OPTIONAL or name in extra or name in only)
    ]
    print(f"benchmarks: {', '.join(chosen)} (load average {loadavg()})", flush=True)
    ledger = Path(tempfile.mkdtemp(prefix="bench-wait-")) / "waited_s"
    env = dict(os.environ, BENCH_WAIT_LEDGER=str(ledger), BENCH_WAIT_BUDGET_S=str(args.wait_budget))
    failed, timings = [], {}
    started = time.monotonic()
    for name in chosen:
        print(f"== {name}", flush=True)
        start = time.monotonic()
        proc = subprocess.run([sys.executable, *BENCHMARKS[name]], cwd=REPO, env=env)
        timings[name] = round(time.monotonic() - start)
        if proc.returncode != 0:
            failed.append(name)
            print(f"!! {name} failed with exit status {proc.returncode}", flush=True)
    summary_rows_from_files()
    total = round(time.monotonic() - started)
    waited = float(ledger.read_text()) if ledger.exists() else 0.0
    print(
        f"\nseconds per benchmark: {timings}; total {total} s (of which {waited:.0f} s waiting "
        f"for a quiet machine); load average now {loadavg()}"
    )
    if SUMMARY.exists():
        print("\n" + SUMMARY.read_text())
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
