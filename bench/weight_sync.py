"""Benchmark: weight sync to every engine, object store against broadcast, versus model size.

For each model (``--models``; default the project's ``tiny`` model, the arithmetic
demo's base model, and the ``20m`` and ``100m`` configs of
``services.embedded.tiny_model``) it starts one ``rollout.RolloutPool`` of
``--engines`` vLLM engines (eager) and a learner stand-in actor that holds the
model's weights and a ``rollout.BroadcastSender``. Then, alternating the two
transports round by round (ABAB, so both see the same machine), with the
weights perturbed before every round (not timed), it times one
``RolloutPool.update_weights`` — what the training loop's
``time/weight_sync_s`` measures:

- ``object_store``: ``pool.update_weights(actor.export.remote(), v)``: the actor
  serializes to safetensors, the bytes go through the Ray object store, every
  engine validates, deserializes and reloads;
- ``broadcast``: ``pool.update_weights(None, v)`` with a
  ``rollout.BroadcastTransport``: the actor's sender broadcasts the header and
  the bucketed tensors over gloo, every engine worker receives into its
  buffers and reloads from views.

Per model and transport: ``seconds`` (median), ``mb_per_s`` (payload ÷
seconds), ``fraction_of_demo_step`` (÷ the demo's measured step time,
``bench/results/step_breakdown.json`` or ``--step-s``); for broadcast also where
the time went (the sender's send, the engine's receive and reload). The load
average is recorded per model and over the run. Writes
``bench/results/weight_sync.json``.

    python bench/weight_sync.py [--models tiny,demo,20m,100m] [--engines 1] [--repeats 5]
                                [--bucket-mb 16]
"""

from __future__ import annotations

import argparse
import json
import logging
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

log = logging.getLogger("bench.weight_sync")
TRANSPORTS = ("object_store", "broadcast")


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


class WeightHolder:
    """The learner's side, as a Ray actor: the model's weights and a broadcast sender."""

    def __init__(self, path: str, threads: int, bucket_bytes: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from rollout import BroadcastSender

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.sender = BroadcastSender(bucket_bytes=bucket_bytes)
        self.last_send: dict = {}

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def perturb(self) -> None:
        import torch

        with torch.no_grad():
            for param in self.model.parameters():
                param.mul_(1.0001)

    def named_weights(self):
        seen: set[int] = set()
        for name, tensor in self.model.state_dict().items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                yield name, tensor.detach()

    def export(self) -> bytes:
        from rollout import serialize_weights

        return serialize_weights(self.named_weights())

    def weight_sender_endpoint(self) -> dict:
        return self.sender.endpoint

    def open_weight_group(self, prefix: str, world_size: int) -> None:
        self.sender.open(prefix, world_size)

    def send_weights(self, version: int) -> dict:
        self.last_send = self.sender.send(self.named_weights(), version)
        return self.last_send

    def weights_snapshot(self, version: int) -> bytes:
        return self.sender.snapshot(version)

    def get_last_send(self) -> dict:
        return self.last_send


def measure(name: str, engines: int, repeats: int, bucket_bytes: int) -> dict:
    import ray

    from rollout import (
        ActorSenderLink,
        BroadcastTransport,
        ObjectStoreTransport,
        RolloutConfig,
        RolloutPool,
    )
    from services.train.parts import engine_placement

    path = model_dir(name)
    holder = ray.remote(num_cpus=0.5)(WeightHolder).remote(str(path), 2, bucket_bytes)
    params = ray.get(holder.parameters.remote())
    transports = {
        "object_store": ObjectStoreTransport(),
        "broadcast": BroadcastTransport(ActorSenderLink(holder)),
    }
    config = RolloutConfig(engines=engines, group_size=2, max_tokens=8, enforce_eager=True)
    start = time.perf_counter()
    pool = RolloutPool(path, config, seed=0, placement=engine_placement(config))
    start_s = time.perf_counter() - start
    rows: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    try:
        quiet = wait_for_quiet()
        version = 0
        for _ in range(repeats + 1):  # the first round of each warms up and is dropped
            for kind in TRANSPORTS:
                version += 1
                ray.get(holder.perturb.remote())
                pool.transport = transports[kind]
                update = holder.export.remote() if kind == "object_store" else None
                t0 = time.perf_counter()
                pool.update_weights(update, version)
                seconds = time.perf_counter() - t0
                rows[kind].append({"seconds": seconds, **_parts(pool, holder, kind)})
        if pool.weights_versions() != [version] * engines:
            raise RuntimeError(f"engines did not all reach version {version}")
    finally:
        pool.shutdown()
        ray.kill(holder)
    payload = _payload_bytes(path)
    result = {
        "model_dir": str(path),
        "parameters": params,
        "payload_mb": round(payload / 1e6, 2),
        "engines": engines,
        "pool_start_s": round(start_s, 1),
        "repeats": repeats,
        "load": quiet,
    }
    for kind in TRANSPORTS:
        result[kind] = _summary(rows[kind][1:], payload)
    return result


def _parts(pool, holder, kind: str) -> dict:
    """Where one broadcast's time went: the sender's send and the engine's receive/reload."""
    if kind != "broadcast":
        return {}
    import ray

    send = ray.get(holder.get_last_send.remote())
    # The pool keeps its engine actors private; the benchmark reads engine 0's report.
    load = ray.get(pool._slots[0].actor.__ray_call__.remote(lambda engine: engine.last_load))
    return {
        "send_s": send["seconds"],
        "buckets": send["buckets"],
        "engine_receive_s": load["seconds"] - load["load_s"],
        "engine_reload_s": load["load_s"],
    }


def _payload_bytes(path: Path) -> int:
    """Bytes of the weights an update carries (the checkpoint's tensors, tied ones once)."""
    from rollout.weights import checkpoint_spec

    spec = checkpoint_spec(path)
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
    total = 0
    for name, tensor in spec.tensors.items():
        if spec.tied_embeddings and name == "lm_head.weight":
            continue
        count = sizes[tensor.dtype]
        for dim in tensor.shape:
            count *= dim
        total += count
    return total


def _summary(rows: list[dict], payload: int) -> dict:
    seconds = statistics.median(r["seconds"] for r in rows)
    out = {
        "seconds": round(seconds, 4),
        "seconds_all": [round(r["seconds"], 4) for r in rows],
        "mb_per_s": round(payload / 1e6 / seconds, 1),
    }
    for key in ("send_s", "engine_receive_s", "engine_reload_s"):
        if key in rows[0]:
            out[f"{key}_median"] = round(statistics.median(r[key] for r in rows), 4)
    if "buckets" in rows[0]:
        out["buckets"] = rows[0]["buckets"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,demo,20m,100m", help="comma-separated")
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=16, help="broadcast bucket, MiB")
    parser.add_argument("--step-s", type=float, default=None, help="step time to compare with")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

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
            bucket = int(args.bucket_mb * 2**20)
            results[name] = measure(name, args.engines, args.repeats, bucket)
            for kind in TRANSPORTS:
                if step_s:
                    r = results[name][kind]
                    r["fraction_of_demo_step"] = round(r["seconds"] / step_s, 4)
            log.info("  %s: %s", name, _line(name, results[name]))
    finally:
        ray.shutdown()
    load = tracker.summary()
    result = {
        "benchmark": "weight sync: Ray object store vs broadcast, by model size",
        "transports": {
            "object_store": "safetensors bytes exported by the learner actor, one ref to all",
            "broadcast": "gloo group learner → engine workers: header, agreement, buckets",
        },
        "bucket_mb": args.bucket_mb,
        "seconds_is": "median wall time of one RolloutPool.update_weights (time/weight_sync_s)",
        "demo_step_s": step_s,
        "demo_step_s_source": step_source,
        "models": results,
        "machine": info,
        "load_during": load,
    }
    out = write_result("weight_sync", result)
    line = f"{args.engines} engine(s): " + "; ".join(_line(n, r) for n, r in results.items())
    update_summary("weight sync", line, "100m by broadcast ≤ 0.5 s", load_text(load))
    log.info("weight sync: %s -> %s", line, out)


def _line(name: str, r: dict) -> str:
    return (
        f"{name} ({r['parameters'] / 1e6:.1f}M, {r['payload_mb']} MB) object store "
        f"{r['object_store']['seconds']:.3f} s, broadcast {r['broadcast']['seconds']:.3f} s"
    )


if __name__ == "__main__":
    main()
