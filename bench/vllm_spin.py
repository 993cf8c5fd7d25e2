"""Experiment: how much vLLM's idle busy-loop costs the learner in sync mode on 2 cores.

After each call, vLLM's engine processes keep polling their shared-memory queues for
``SpinCondition.busy_loop_s`` (1 s in vLLM 0.32) before they sleep, and in sync mode that
second overlaps the learner's reference forward, on the same cores. This runs the demo
(``grpo train``, 8 steps, evaluation off) in pairs: unchanged, and with the busy loop of
every shared-memory reader cut to ``--spin-s`` seconds by a ``sitecustomize`` module put
on ``PYTHONPATH`` (it patches ``vllm.distributed.device_communicators.shm_broadcast.
SpinCondition`` when vLLM imports it, in every process of the run). It changes nothing
in the project; it measures what such a change in ``rollout`` would buy. Reports the
median step, generate, reference-forward and train seconds of each run (first 2 steps
left out). Writes ``bench/results/vllm_spin.json``; not part of ``make bench`` by
default (``python -m bench.run_all --with vllm_spin``).

    python bench/vllm_spin.py [--spin-s 0.1] [--rounds 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import (  # noqa: E402
    REPO,
    LoadTracker,
    ensure_arithmetic_assets,
    load_text,
    machine_info,
    median,
    run_grpo_train,
    update_summary,
    wait_for_quiet,
    write_result,
)

SITECUSTOMIZE = '''
"""Benchmark experiment (bench/vllm_spin.py): shorten vLLM's shm-queue busy loop."""
import importlib.abc
import importlib.util
import os
import sys

_TARGET = "vllm.distributed.device_communicators.shm_broadcast"


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def patched_exec(module):
            exec_module(module)
            init = module.SpinCondition.__init__

            def patched_init(self, *args, **kwargs):
                init(self, *args, **kwargs)
                if getattr(self, "is_reader", False):
                    self.busy_loop_s = float(os.environ["BENCH_VLLM_SPIN_S"])

            module.SpinCondition.__init__ = patched_init

        spec.loader.exec_module = patched_exec
        return spec


sys.meta_path.insert(0, _Patch())
'''
PHASES = ("step", "generate", "logprob", "train", "weight_sync")


def run(steps: int, spin_dir: Path | None, spin_s: float) -> dict:
    env = None
    if spin_dir is not None:
        env = {
            "PYTHONPATH": os.pathsep.join([str(spin_dir), str(REPO)]),
            "BENCH_VLLM_SPIN_S": str(spin_s),
        }
    quiet = wait_for_quiet()
    result = run_grpo_train(
        [f"train.steps={steps}", f"train.warmup_steps={min(5, steps)}"], env_extra=env
    )
    kept = result.steps()[2:]
    row = {f"{p}_s": round(median(m[f"time/{p}_s"] for m in kept), 3) for p in PHASES}
    return row | {"load": quiet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spin-s", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    ensure_arithmetic_assets()
    info = machine_info()
    tracker = LoadTracker()
    spin_dir = Path(tempfile.mkdtemp(prefix="vllm-spin-"))
    (spin_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    runs: dict[str, list[dict]] = {"default_1s": [], f"spin_{args.spin_s:g}s": []}
    for _ in range(args.rounds):
        for name in runs:
            patched = name != "default_1s"
            runs[name].append(run(args.steps, spin_dir if patched else None, args.spin_s))
            print(f"  {name}: {runs[name][-1]}", flush=True)
    summary = {
        name: {f"{p}_s": round(median(r[f"{p}_s"] for r in rows), 3) for p in PHASES}
        for name, rows in runs.items()
    }
    base, patched = summary["default_1s"], summary[f"spin_{args.spin_s:g}s"]
    load = tracker.summary()
    result = {
        "benchmark": "demo step time with vLLM's shm busy loop at 1 s (default) vs shorter",
        "spin_s": args.spin_s,
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "medians": summary,
        "step_time_change": round(patched["step_s"] / base["step_s"] - 1, 3),
        "runs": runs,
        "machine": info,
        "load_during": load,
    }
    out = write_result("vllm_spin", result)
    line = (
        f"busy loop 1 s → {args.spin_s:g} s: step {base['step_s']} → {patched['step_s']} s "
        f"({result['step_time_change']:+.0%}), ref. forward {base['logprob_s']} → "
        f"{patched['logprob_s']} s, generate {base['generate_s']} → {patched['generate_s']} s"
    )
    update_summary("vLLM busy loop (experiment)", line, "—", load_text(load))
    print(f"vLLM busy loop: {line} -> {out}")


if __name__ == "__main__":
    main()
