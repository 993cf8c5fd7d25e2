"""Benchmark: weight sync to every engine versus model size, through the Ray object store.

For each model (``--models``; default the project's ``tiny`` model, the arithmetic
demo's base model and the ~100M-parameter ``100m`` config of ``services.embedded.tiny_model``)
it starts a ``rollout.RolloutPool`` of ``--engines`` vLLM engines and repeats, with the
weights perturbed each time:

1. serialize the policy's state dict to safetensors bytes (``rollout.serialize_weights``,
   what the learner's ``export_safetensors`` does);
2. ``ray.put`` the bytes into the object store (the learner actor's export returns an
   ``ObjectRef`` the same way);
3. ``RolloutPool.update_weights(ref, version)``: every engine fetches, validates and
   loads the update inside vLLM, all-or-nothing.

Reports the median seconds of each part, the effective bytes per second of the update
(payload ÷ step 3, and ÷ all three), and the sync as a fraction of a training step:
the demo's measured sync step time (``bench/results/step_breakdown.json``, or
``--step-s``). Engines run eager (``enforce_eager``: no torch.compile, which starts ~20 s
faster and does not change how weights load). Writes ``bench/results/weight_sync.json``.

    python bench/weight_sync.py [--models tiny,demo,100m] [--engines 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import (  # noqa: E402
    ARITHMETIC,
    RESULTS,
    LoadTracker,
    ensure_arithmetic_assets,
    load_text,
    machine_info,
    update_summary,
    wait_for_quiet,
    write_result,
)


def model_dir(name: str) -> Path:
    if name == "demo":
        ensure_arithmetic_assets()
        return ARITHMETIC / "assets" / "base-model"
    from services.embedded.tiny_model import tiny_model_dir

    return tiny_model_dir(name)


def demo_step_s(explicit: float | None) -> tuple[float | None, str]:
    """The demo's sync step time: ``--step-s``, else the step breakdown's measurement."""
    if explicit is not None:
        return explicit, "--step-s"
    path = RESULTS / "step_breakdown.json"
    if path.exists():
        configs = json.loads(path.read_text()).get("configs", {})
        if "sync" in configs:
            return configs["sync"]["step_s_mean"], "bench/results/step_breakdown.json (sync)"
    return None, "no step time measured yet: run bench/step_breakdown.py first"


def measure(name: str, engines: int, repeats: int) -> dict:
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from rollout import RolloutConfig, RolloutPool, serialize_weights
    from services.train.parts import engine_placement

    path = model_dir(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    config = RolloutConfig(engines=engines, group_size=2, max_tokens=8, enforce_eager=True)
    start = time.perf_counter()
    pool = RolloutPool(path, config, dtype="float32", seed=0, placement=engine_placement(config))
    start_s = time.perf_counter() - start
    rows = []
    try:
        quiet = wait_for_quiet()
        for version in range(1, repeats + 1):
            with torch.no_grad():
                for param in model.parameters():
                    param.mul_(1.0001)
            t0 = time.perf_counter()
            payload = serialize_weights(model.state_dict())
            t1 = time.perf_counter()
            ref = ray.put(payload)
            t2 = time.perf_counter()
            pool.update_weights(ref, version)
            t3 = time.perf_counter()
            rows.append((len(payload), t1 - t0, t2 - t1, t3 - t2))
            del ref
        if pool.weights_versions() != [repeats] * engines:
            raise RuntimeError(f"engines did not all reach version {repeats}")
    finally:
        pool.shutdown()
    size = rows[0][0]
    serialize, put, update = (statistics.median(r[i] for r in rows) for i in (1, 2, 3))
    total = serialize + put + update
    return {
        "model_dir": str(path),
        "parameters": params,
        "payload_bytes": size,
        "payload_mb": round(size / 1e6, 2),
        "engines": engines,
        "pool_start_s": round(start_s, 1),
        "repeats": repeats,
        "serialize_s": round(serialize, 4),
        "ray_put_s": round(put, 4),
        "update_weights_s": round(update, 4),
        "total_s": round(total, 4),
        "update_weights_s_all": [round(r[3], 4) for r in rows],
        "bytes_per_s_update": round(size / update),
        "bytes_per_s_total": round(size / total),
        "load": quiet,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,demo,100m", help="comma-separated")
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-s", type=float, default=None, help="step time to compare with")
    args = parser.parse_args()

    import os

    import ray

    info = machine_info()
    tracker = LoadTracker()
    step_s, step_source = demo_step_s(args.step_s)
    ray.init(
        address="local",
        num_cpus=len(os.sched_getaffinity(0)),
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"worker_niceness": 0},
    )
    results = {}
    try:
        for name in [m for m in args.models.split(",") if m]:
            tracker.sample()
            results[name] = measure(name, args.engines, args.repeats)
            tracker.sample()
            if step_s:
                results[name]["fraction_of_demo_step"] = round(results[name]["total_s"] / step_s, 4)
            r = results[name]
            print(
                f"  {name}: {r['parameters'] / 1e6:.1f}M params, {r['payload_mb']} MB: "
                f"update {r['update_weights_s']} s, total {r['total_s']} s, "
                f"{r['bytes_per_s_update'] / 1e6:.0f} MB/s",
                flush=True,
            )
    finally:
        ray.shutdown()
    load = tracker.summary()
    result = {
        "benchmark": "weight sync through the Ray object store vs model size",
        "transport": "ObjectStoreTransport (safetensors bytes, one ray.put, one ref to all)",
        "demo_step_s": step_s,
        "demo_step_s_source": step_source,
        "models": results,
        "machine": info,
        "load_during": load,
    }
    out = write_result("weight_sync", result)
    parts = []
    for name, r in results.items():
        frac = r.get("fraction_of_demo_step")
        parts.append(
            f"{name} ({r['parameters'] / 1e6:.1f}M, {r['payload_mb']} MB) {r['total_s']:.3f} s "
            f"({r['bytes_per_s_update'] / 1e6:.0f} MB/s"
            + (f", {frac:.1%} of a demo step)" if frac is not None else ")")
        )
    line = f"{args.engines} engine(s): " + "; ".join(parts)
    update_summary("weight sync", line, "—", load_text(load))
    print(f"weight sync: {line} -> {out}")


if __name__ == "__main__":
    main()
