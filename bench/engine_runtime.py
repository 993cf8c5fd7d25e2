"""Benchmark: how a CPU engine's process runs — vLLM's engine core in or out of process,
and which OpenMP runtime — measured on the demo's generation.

vLLM's CPU build advises preloading Intel's OpenMP (``libiomp5.so``, which it installs
into the venv) and tcmalloc; by default it also runs its engine core in a second
process that imports vLLM again and then polls shared-memory queues. Each variant here
is a fresh process with that environment: it creates a ``vllm.LLM`` on the demo's base
model (timed: ``create_s``), warms up, then generates the demo's batch (16 questions ×
G=8, at most 48 new tokens, temperature 1) ``--calls`` times (median ``generate_s``,
tokens/s), on the cores the engine gets in the demo (2 threads, bound). Variants
alternate over ``--rounds``. ``services.train.parts.cpu_engine_runtime`` is the
setting chosen from this. Writes ``bench/results/engine_runtime.json``; not in ``make
bench``'s default list (``python -m bench.run_all --only engine_runtime``).

    python bench/engine_runtime.py [--rounds 2] [--calls 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import (  # noqa: E402
    ARITHMETIC,
    LoadTracker,
    ensure_arithmetic_assets,
    load_text,
    machine_info,
    median,
    update_summary,
    wait_for_quiet,
    write_result,
)

MODEL = ARITHMETIC / "assets" / "base-model"
TRAIN = ARITHMETIC / "assets" / "train.jsonl"
IOMP = Path(sys.prefix) / "lib" / "libiomp5.so"
CHOSEN = "engine core in process"
"""What ``services.train.parts.cpu_engine_runtime`` sets."""
VARIANTS = {
    "vllm default (engine core in a 2nd process, GNU OpenMP)": {},
    "libiomp5 preloaded": {"LD_PRELOAD": str(IOMP)},
    CHOSEN: {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    "in process + libiomp5": {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "LD_PRELOAD": str(IOMP),
    },
}
ENGINE_ENV = {
    "OMP_NUM_THREADS": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def probe(calls: int) -> dict:
    """In this process: create the engine, then time the demo batch ``calls`` times."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=str(MODEL),
        dtype="float32",
        seed=0,
        max_model_len=512,
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        enable_chunked_prefill=False,
        gpu_memory_utilization=0.05,
    )
    create_s = time.perf_counter() - start
    with open(TRAIN) as lines:
        prompts = [json.loads(line)["question"] for _, line in zip(range(16), lines)]
    sampling = SamplingParams(n=8, max_tokens=48, temperature=1.0, seed=1)
    llm.generate(prompts, sampling, use_tqdm=False)
    seconds, tokens = [], 0
    for _ in range(calls):
        begin = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        seconds.append(time.perf_counter() - begin)
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    step = median(seconds)
    return {
        "create_s": round(create_s, 2),
        "generate_s": round(step, 3),
        "tokens_per_s": round(tokens / step),
    }


def run_variant(env: dict[str, str], calls: int) -> dict:
    spawned = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--probe", "--calls", str(calls)],
        env={**os.environ, **ENGINE_ENV, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - spawned
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "process_wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.calls)), flush=True)
        return
    ensure_arithmetic_assets()
    info, tracker = machine_info(), LoadTracker()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        for name, env in VARIANTS.items():
            quiet = wait_for_quiet()
            tracker.sample()
            run = {**run_variant(env, args.calls), "round": round_index, "load": quiet}
            tracker.sample()
            runs[name].append(run)
            print(f"  {name}: {run}", flush=True)
    keys = ("create_s", "generate_s", "tokens_per_s")
    summary = {
        name: {k: round(median(r[k] for r in rs), 3) for k in keys} for name, rs in runs.items()
    }
    result = {
        "benchmark": "CPU engine process runtime: engine core placement and OpenMP runtime",
        "settings": {
            "model": "examples/arithmetic/assets/base-model (2.1M parameters, float32)",
            "batch": "16 questions x G=8, max 48 new tokens, temperature 1, seed 1",
            "engine_env": ENGINE_ENV,
            "libiomp5": str(IOMP),
            "calls": args.calls,
            "rounds": args.rounds,
        },
        "variants": {name: {"env": VARIANTS[name], **summary[name]} for name in VARIANTS},
        "chosen": CHOSEN,
        "runs": runs,
        "machine": info,
        "load_during": tracker.summary(),
    }
    out = write_result("engine_runtime", result)
    default, chosen = summary[next(iter(VARIANTS))], summary[CHOSEN]
    line = (
        f"chosen: create {chosen['create_s']} s, generate {chosen['generate_s']} s; vLLM's "
        f"default: {default['create_s']} s, {default['generate_s']} s"
    )
    update_summary(
        "CPU engine runtime (demo batch)", line, "faster than default", load_text(tracker.summary())
    )
    print(f"engine runtime: {line} -> {out}")


if __name__ == "__main__":
    main()
