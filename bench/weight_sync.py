"""Benchmark: weight sync to every engine, object store against broadcast, versus model
size, for full weights and for LoRA adapters.

For each model (``--models``; default the project's ``tiny`` model, the arithmetic
demo's base model, and the ``20m`` and ``100m`` configs of
``services.embedded.tiny_model``) and each part (``--parts``, both by default):

- ``full``: full fine-tuning; an update is every weight of the model;
- ``lora``: a LoRA adapter (``--lora-rank``, α = 2 × rank, ``all-linear``); the engines
  start with LoRA enabled and an update is the adapter alone, which every engine worker
  builds in memory under a new adapter id (``rollout.worker_extension``).

Each part starts what ``grpo train`` starts, with the driver's own code
(``services.train.parts``): the job spec ``examples/arithmetic/outcome.yaml`` with the
model (and for ``lora`` its ``model.lora``), the learner (``launch_learner``: one
``learner.Learner`` rank in a Ray actor, holding the broadcast sender) and a
``RolloutPool`` of ``--engines`` vLLM engines (eager) serving ``engine_lora(spec)``.
Then, alternating the two transports round by round (ABAB, so both see the same
machine), with the learner's trainable weights perturbed before every round (not
timed), it times one ``LearnerGroup.sync_weights`` — what the training loop's
``time/weight_sync_s`` measures:

- ``object_store``: the learner exports safetensors bytes, the bytes go through the
  Ray object store, every engine validates, deserializes and reloads (or, with LoRA,
  swaps in the new adapter);
- ``broadcast``: the learner's sender broadcasts the header and the bucketed tensors
  over gloo, every engine worker receives into its buffers and reloads from views (or
  builds the adapter from them).

Per model, part and transport: ``seconds`` (median), ``mb_per_s`` (payload ÷
seconds), ``fraction_of_demo_step`` (÷ the demo's measured step time,
``bench/results/step_breakdown.json`` or ``--step-s``); for broadcast also where
the time went (the sender's send, the engine's receive and reload). Every row records
the load before (``load``) and during (``load_during``) its measurement.

Results merge into ``bench/results/weight_sync.json``: full-weight rows under
``models``, LoRA rows under ``lora`` (``adapter_bytes``, ``adapter_seconds`` per
transport, beside the same model's ``full_bytes`` and ``full_seconds`` from ``models``
and when those were measured). Rows of models and parts not measured stay as they were.

    python bench/weight_sync.py [--models tiny,demo,20m,100m] [--parts full,lora]
                                [--engines 1] [--repeats 5] [--bucket-mb 16] [--lora-rank 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import (  # noqa: E402
    OUTCOME_YAML,
    RESULTS,
    LoadTracker,
    combined_load,
    load_text,
    machine_info,
    merge_rows,
    model_dir,
    names,
    read_result,
    update_summary,
    utc_now,
    wait_for_quiet,
    write_result,
)

log = logging.getLogger("bench.weight_sync")
TRANSPORTS = ("object_store", "broadcast")
PARTS = ("full", "lora")


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


def bench_spec(name: str, part: str, args: argparse.Namespace):
    """The demo's job spec on model ``name``, with a LoRA adapter for part ``lora``."""
    from services.spec import load_spec

    sets = [
        f"model.path={model_dir(name)}",
        f"rollout.engines={args.engines}",
        "rollout.group_size=2",
        "rollout.max_tokens=8",
        "rollout.enforce_eager=true",
        "cluster.weight_transport=broadcast",
    ]
    if part == "lora":
        sets.append(f"model.lora={{rank: {args.lora_rank}, target_modules: all-linear}}")
    return load_spec(OUTCOME_YAML, sets)


class SendRecorder:
    """The broadcast transport's link to the learner group, keeping the last send's
    report (the sender's seconds and buckets)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.last: Any = None

    @property
    def endpoint(self) -> dict:
        return self.group.endpoint

    def open(self, prefix: str, world_size: int) -> Any:
        return self.group.open(prefix, world_size)

    def send(self, version: int) -> Any:
        self.last = self.group.send(version)
        return self.last

    def snapshot(self, version: int) -> Any:
        return self.group.snapshot(version)


def measure(name: str, part: str, args: argparse.Namespace) -> dict:
    """Start the learner and the pool of ``part`` on model ``name``; time the updates."""
    from services.train.parts import engine_lora, launch_learner

    spec = bench_spec(name, part, args)
    lora = engine_lora(spec)
    tracker = LoadTracker()
    learner = launch_learner(spec, spec.learner_config())
    pool = None
    try:
        _use_bucket(learner.ranks[0], int(args.bucket_mb * 2**20))
        start = time.perf_counter()
        pool = _start_pool(spec, lora)
        start_s = time.perf_counter() - start
        learner.wait_ready()
        quiet = wait_for_quiet()
        rows = _rounds(pool, learner, args.repeats)
    finally:
        if pool is not None:
            pool.shutdown()
        learner.shutdown()
    update = _update_spec(spec.model.path, lora)
    payload = _size(update)[1]
    result = {
        "model_dir": spec.model.path,
        "parameters": _size(_update_spec(spec.model.path, None))[0],
        "payload_mb": round(payload / 1e6, 3),
        "engines": args.engines,
        "pool_start_s": round(start_s, 1),
        "repeats": args.repeats,
        "learner": "services.train.parts.launch_learner (learner.Learner, 1 rank)",
        "measured_at": utc_now(),
        "load": quiet,
        "load_during": tracker.summary(),
    }
    for kind in TRANSPORTS:
        result[kind] = _summary(rows[kind][1:], payload)
    return result if lora is None else _lora_row(result, update, lora)


def _start_pool(spec: Any, lora: dict | None) -> Any:
    """The engines as ``services.train.parts.start_parts`` starts them."""
    from rollout import RolloutPool
    from services.train.parts import engine_placement

    return RolloutPool(
        spec.model.path,
        spec.rollout,
        seed=spec.seed,
        placement=engine_placement(spec.rollout, spec.cluster.engines),
        lora=lora,
    )


def _use_bucket(rank: Any, bucket_bytes: int) -> None:
    """Give the learner rank a broadcast sender with ``--bucket-mb`` buckets (the driver
    makes one of the default size on first use)."""
    import ray

    def install(learner: Any) -> None:
        from rollout import BroadcastSender

        learner.weight_sender = BroadcastSender(bucket_bytes=bucket_bytes)

    ray.get(rank.__ray_call__.remote(install))


def _rounds(pool: Any, learner: Any, repeats: int) -> dict[str, list[dict]]:
    """``repeats`` + 1 rounds of both transports (the first round is warm-up)."""
    import ray

    from rollout import BroadcastTransport, ObjectStoreTransport
    from services.train.parts import LearnerGroup

    recorder = SendRecorder(learner)
    groups = {"object_store": LearnerGroup(learner.ranks), "broadcast": learner}
    transports = {"object_store": ObjectStoreTransport(), "broadcast": BroadcastTransport(recorder)}
    rows: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    version = 0
    for _ in range(repeats + 1):
        for kind in TRANSPORTS:
            version += 1
            ray.get(learner.ranks[0].__ray_call__.remote(_perturb))
            pool.transport = transports[kind]
            t0 = time.perf_counter()
            groups[kind].sync_weights(pool, version)
            seconds = time.perf_counter() - t0
            rows[kind].append({"seconds": seconds, **_parts(pool, recorder, kind)})
    if pool.weights_versions() != [version] * len(pool._slots):
        raise RuntimeError(f"engines did not all reach version {version}")
    return rows


def _perturb(learner: Any) -> None:
    """Change every weight an update carries (the trainable ones: all, or the adapter)."""
    import torch

    with torch.no_grad():
        for param in learner.policy.parameters():
            if param.requires_grad:
                param.add_(1e-4)


def _parts(pool: Any, recorder: SendRecorder, kind: str) -> dict:
    """Where one broadcast's time went: the sender's send and the engine's receive/reload."""
    if kind != "broadcast":
        return {}
    import ray

    send = ray.get(recorder.last)
    # The pool keeps its engine actors private; the benchmark reads engine 0's report.
    load = ray.get(pool._slots[0].actor.__ray_call__.remote(lambda engine: engine.last_load))
    return {
        "send_s": send["seconds"],
        "buckets": send["buckets"],
        "engine_receive_s": load["seconds"] - load["load_s"],
        "engine_reload_s": load["load_s"],
    }


def _update_spec(path: str, lora: dict | None) -> Any:
    """What an update carries: the checkpoint's tensors, or with LoRA the adapter's."""
    from rollout.lora import adapter_spec
    from rollout.weights import checkpoint_spec

    spec = checkpoint_spec(path)
    return spec if lora is None else adapter_spec(spec, lora)


def _size(spec: Any) -> tuple[int, int]:
    """Elements and bytes of the tensors of ``spec`` (tied ones once)."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
    elements = total = 0
    for name, tensor in spec.tensors.items():
        if spec.tied_embeddings and name == "lm_head.weight":
            continue
        count = 1
        for dim in tensor.shape:
            count *= dim
        elements += count
        total += count * sizes[tensor.dtype]
    return elements, total


def _lora_row(result: dict, update: Any, lora: dict) -> dict:
    """A ``lora`` row: the measurement with the adapter's size and seconds up front."""
    elements, size = _size(update)
    return {
        "adapter_bytes": size,
        "adapter_seconds": {kind: result[kind]["seconds"] for kind in TRANSPORTS},
        "adapter_parameters": elements,
        "adapter_tensors": len(update.tensors),
        "adapter_config": {k: lora[k] for k in ("r", "lora_alpha", "target_modules")},
        **result,
    }


def _summary(rows: list[dict], payload: int) -> dict:
    seconds = statistics.median(r["seconds"] for r in rows)
    out = {
        "seconds": round(seconds, 4),
        "seconds_all": [round(r["seconds"], 4) for r in rows],
        "mb_per_s": round(payload / 1e6 / seconds, 2),
    }
    for key in ("send_s", "engine_receive_s", "engine_reload_s"):
        if key in rows[0]:
            out[f"{key}_median"] = round(statistics.median(r[key] for r in rows), 4)
    if "buckets" in rows[0]:
        out["buckets"] = rows[0]["buckets"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,demo,20m,100m", help="comma-separated")
    parser.add_argument("--parts", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=16, help="broadcast bucket, MiB")
    parser.add_argument("--lora-rank", type=int, default=8, help="the adapter's rank (lora)")
    parser.add_argument("--step-s", type=float, default=None, help="step time to compare with")
    args = parser.parse_args(argv)
    unknown = sorted(set(names(args.parts)) - set(PARTS))
    if unknown or not names(args.parts):
        parser.error(f"--parts: {', '.join(unknown) or 'none given'}; choose from {PARTS}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import os

    import ray

    info = machine_info()
    step_s, step_source = demo_step_s(args.step_s)
    ray.init(
        address="local",
        num_cpus=len(os.sched_getaffinity(0)),
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"worker_niceness": 0},
    )
    measured: dict[str, dict] = {"full": {}, "lora": {}}
    try:
        for name in names(args.models):
            for part in [p for p in PARTS if p in names(args.parts)]:
                row = measure(name, part, args)
                for kind in TRANSPORTS:
                    if step_s:
                        row[kind]["fraction_of_demo_step"] = round(row[kind]["seconds"] / step_s, 4)
                measured[part][name] = row
                log.info("  %s %s: %s", name, part, _line(name, row))
    finally:
        ray.shutdown()
    result = merged_result(read_result("weight_sync"), measured, args, info)
    result.update(demo_step_s=step_s, demo_step_s_source=step_source)
    out = write_result("weight_sync", result)
    _summary_rows(result, measured, args.engines)
    log.info("weight sync -> %s", out)


def merged_result(result: dict, measured: dict, args: argparse.Namespace, info: dict) -> dict:
    """The file's result with this run's rows put in (the others kept), the full weights
    beside each LoRA row, and the load over all the rows."""
    merge_rows(result, "models", measured["full"])
    merge_rows(result, "lora", measured["lora"])
    for name, row in result["lora"].items():
        full = result["models"].get(name)
        if full is not None:
            row.update(_against_full(row, full))
    rows = [*result["models"].values(), *result["lora"].values()]
    loads = [r["load_during"] for r in rows if "load_during" in r]
    result.update(
        benchmark="weight sync: Ray object store vs broadcast, by model size; LoRA adapters",
        transports={
            "object_store": "safetensors bytes exported by the learner actor, one ref to all",
            "broadcast": "gloo group learner → engine workers: header, agreement, buckets",
        },
        bucket_mb=args.bucket_mb,
        seconds_is="median wall time of one LearnerGroup.sync_weights (time/weight_sync_s)",
        lora_is="rows of updates that carry a LoRA adapter (engines serve it); full_* from "
        "models, measured at full_measured_at",
        machine=info,
        load_during=combined_load(loads) if loads else result.get("load_during"),
    )
    return result


def _against_full(row: dict, full: dict) -> dict:
    """The full weights' bytes and seconds beside an adapter's, and the ratios."""
    full_bytes = round(full["payload_mb"] * 1e6)
    full_seconds = {kind: full[kind]["seconds"] for kind in TRANSPORTS}
    return {
        "full_bytes": full_bytes,
        "full_seconds": full_seconds,
        "full_measured_at": full.get("measured_at"),
        "bytes_ratio_full_over_adapter": round(full_bytes / row["adapter_bytes"], 1),
        "seconds_ratio_full_over_adapter": {
            kind: round(full_seconds[kind] / row["adapter_seconds"][kind], 2) for kind in TRANSPORTS
        },
    }


def _summary_rows(result: dict, measured: dict, engines: int) -> None:
    """The summary's rows of the parts measured in this run (each over all its rows)."""
    keys = {"full": ("models", "weight sync"), "lora": ("lora", "weight sync, LoRA")}
    targets = {"full": "100m by broadcast ≤ 0.5 s", "lora": "—"}
    for part, (key, title) in keys.items():
        if not measured[part]:
            continue
        rows = result[key]
        line = f"{engines} engine(s): " + "; ".join(_line(n, r) for n, r in rows.items())
        loads = [r["load_during"] for r in rows.values() if "load_during" in r]
        update_summary(title, line, targets[part], load_text(combined_load(loads)))


def _line(name: str, r: dict) -> str:
    what = f"adapter r {r['adapter_config']['r']}, " if "adapter_bytes" in r else ""
    return (
        f"{name} ({what}{r['parameters'] / 1e6:.1f}M, {r['payload_mb']} MB) object store "
        f"{r['object_store']['seconds']:.3f} s, broadcast {r['broadcast']['seconds']:.3f} s"
    )


if __name__ == "__main__":
    main()
