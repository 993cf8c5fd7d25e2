"""Benchmark: one learner rank against two (FSDP2 over gloo), on this machine's CPU cores;
and the learner with a LoRA adapter against full fine-tuning.

Part ``scaling`` (``--parts``: both parts by default; default models the demo's
``small`` and ``20m``, side by side in one run): the same batch goes through
``Learner.train_step`` with N = 1 (one process, all cores as torch threads) and with
N = 2 (two processes, the cores split evenly between them: the thread split is
recorded). Part ``lora`` (default models ``20m`` and ``100m``): N = 1 with full
fine-tuning against N = 1 with a LoRA adapter (``LearnerConfig.lora``: ``--lora-rank``,
α = 2 × rank, ``all-linear``; what ``model.lora`` gives ``grpo train``'s learner), on
the same batch.

Each configuration runs in fresh processes, so that the peak RSS of every rank
(``ru_maxrss``) is its own. Reported per configuration: tokens per second of the median
learner step (prompt + completion tokens of the batch, unpadded), peak RSS per rank, and
the bytes of parameters, gradients, optimizer state and reference that each rank holds
(``Learner.memory_bytes``; with LoRA the parameters include the frozen base and the
reference is the same model with the adapter off, 0 bytes). The batch imitates the
demo's: 16 × 8 completions of the arithmetic prompt length, β = 0.04, the demo's
micro-batch budget. Results merge into ``bench/results/learner_scaling.json``: part
``scaling`` writes ``results`` (and the run's machine and load), part ``lora`` one row
per model under ``lora`` (with its own load); what a run did not measure stays. This
machine is shared: run it under the heavy-work lock, and read the recorded load beside
the numbers.

    flock /tmp/grpo-heavy.lock python bench/learner_scaling.py [--parts scaling,lora]
                                      [--models small,20m] [--steps 3] [--lora-rank 8]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import (  # noqa: E402
    LoadTracker,
    combined_load,
    load_text,
    machine_info,
    merge_rows,
    names,
    read_result,
    update_summary,
    utc_now,
    wait_for_quiet,
    write_result,
)
from bench.learner_efficiency import make_samples  # noqa: E402

log = logging.getLogger("bench.learner_scaling")
MICRO_BATCH_TOKENS = 8192  # the demo's train.micro_batch_tokens
LR = 5e-5
PARTS = ("scaling", "lora")
DEFAULT_MODELS = {"scaling": "small,20m", "lora": "20m,100m"}


def rank_main(rank: int, world: int, threads: int, port: int, args, queue) -> None:
    """One learner rank: a warm-up step, ``args.steps`` timed steps, then what it measured."""
    from learner import Learner, LearnerConfig, LoraConfig
    from learner.distributed import DistContext
    from services.embedded.tiny_model import tiny_model_dir

    context = DistContext(rank, world, master_port=port, timeout_s=600) if world > 1 else None
    lora = LoraConfig(rank=args.lora_rank) if args.lora_rank else None
    config = LearnerConfig(lr=LR, micro_batch_tokens=MICRO_BATCH_TOKENS, max_len=64, lora=lora)
    path = str(tiny_model_dir(args.model))
    learner = Learner(path, config, device="cpu", threads=threads, dist_context=context)
    samples = make_samples(args.batch, learner.policy.config.vocab_size)
    learner.train_step(samples)  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        learner.train_step(samples)
        times.append(time.perf_counter() - start)
    queue.put(
        {
            "rank": rank,
            "step_s": times,
            "tokens": sum(s.length for s in samples),
            "parameters": sum(p.numel() for p in learner.policy.parameters()),  # global
            "trainable": sum(p.numel() for p in learner.policy.parameters() if p.requires_grad),
            "state_bytes": learner.memory_bytes(),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )
    learner.close()


def run_config(
    model: str, world: int, cores: int, args: argparse.Namespace, lora_rank: int | None = None
) -> dict:
    """``world`` ranks of ``model`` in fresh processes, ``cores // world`` threads each;
    with ``lora_rank`` training a LoRA adapter of that rank."""
    import torch.multiprocessing as mp

    threads = max(cores // world, 1)
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    run_args = argparse.Namespace(
        model=model, batch=args.batch, steps=args.steps, lora_rank=lora_rank
    )
    with socket.socket() as sock:  # a free port for the group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        spawn.Process(target=rank_main, args=(r, world, threads, port, run_args, queue))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    ranks = sorted((queue.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
    for proc in procs:
        proc.join()
    # A step ends for the group when its slowest rank is done: take the max per step.
    step_s = [max(times) for times in zip(*(r["step_s"] for r in ranks))]
    median_s = statistics.median(step_s)
    return {
        "model": model,
        "parameters": ranks[0]["parameters"],
        "trainable_parameters": ranks[0]["trainable"],
        "lora_rank": lora_rank,
        "ranks": world,
        "threads_per_rank": threads,
        "tokens_per_step": ranks[0]["tokens"],
        "step_s_median": round(median_s, 4),
        "step_s_all": [round(t, 4) for t in step_s],
        "tokens_per_s": round(ranks[0]["tokens"] / median_s, 1),
        "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in ranks],
        "state_bytes_per_rank": [r["state_bytes"] for r in ranks],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="scaling,lora", help="comma-separated: scaling, lora")
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated tiny-model sizes (default: small,20m for scaling; 20m,100m for lora)",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--lora-rank", type=int, default=8, help="the adapter's rank (lora)")
    args = parser.parse_args(argv)
    unknown = sorted(set(names(args.parts)) - set(PARTS))
    if unknown or not names(args.parts):
        parser.error(f"--parts: {', '.join(unknown) or 'none given'}; choose from {PARTS}")
    return args


def part_models(args: argparse.Namespace, part: str) -> list[str]:
    """The models part ``part`` measures: ``--models``, else the part's default."""
    return names(args.models or DEFAULT_MODELS[part])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # As the training driver runs its learner actors (services/train/parts.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    result = read_result("learner_scaling")
    if "scaling" in names(args.parts):
        result.update(scaling(args))
    if "lora" in names(args.parts):
        rows = {model: lora_row(model, args) for model in part_models(args, "lora")}
        merge_rows(result, "lora", rows)
        result["lora_is"] = (
            "per model, N = 1 with all cores: full fine-tuning against a LoRA adapter "
            "(LearnerConfig.lora), the same batch"
        )
        _lora_summary(result["lora"])
    out = write_result("learner_scaling", result)
    log.info("wrote %s", out)


def scaling(args: argparse.Namespace) -> dict:
    """Part ``scaling``: N = 1 against N = 2 per model, with the run's machine and load."""
    info = machine_info()
    quiet = wait_for_quiet()
    tracker = LoadTracker()
    rows = []
    for model in part_models(args, "scaling"):
        pair = [_logged(run_config(model, world, args.cores, args)) for world in (1, 2)]
        rows.append({"model": model, "n1": pair[0], "n2": pair[1], **_compare(*pair)})
    return {
        "benchmark": "Learner.train_step with 1 rank vs 2 FSDP2 ranks (gloo, CPU)",
        "thread_split": f"N=1: 1 process × {args.cores} threads; "
        f"N=2: 2 processes × {max(args.cores // 2, 1)} thread(s) on {args.cores} cores",
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "dtype": "float32",
        "beta": 0.04,
        "micro_batch_tokens": MICRO_BATCH_TOKENS,
        "step_time": "per step the slowest rank's time; median over the timed steps",
        "results": rows,
        "machine": info,
        "load_at_start": quiet,
        "load_during": tracker.summary(),
    }


def lora_row(model: str, args: argparse.Namespace) -> dict:
    """Part ``lora`` on ``model``: full fine-tuning and the adapter, one rank each."""
    quiet = wait_for_quiet()
    tracker = LoadTracker()
    full = _logged(run_config(model, 1, args.cores, args))
    adapter = _logged(run_config(model, 1, args.cores, args, lora_rank=args.lora_rank))
    state = {"full": _state(full), "lora": _state(adapter)}
    return {
        "model": model,
        "full": full,
        "lora": adapter,
        "step_s_ratio_lora_over_full": round(adapter["step_s_median"] / full["step_s_median"], 3),
        "state_bytes": state,
        "held_ratio_lora_over_full": round(state["lora"]["held"] / state["full"]["held"], 3),
        "peak_rss_ratio_lora_over_full": round(
            adapter["peak_rss_mib_per_rank"][0] / full["peak_rss_mib_per_rank"][0], 3
        ),
        "measured_at": utc_now(),
        "machine": machine_info(),
        "load_at_start": quiet,
        "load_during": tracker.summary(),
    }


def _logged(row: dict) -> dict:
    log.info(
        "%s N=%d%s (%d thread(s) per rank): %.0f tok/s, peak RSS per rank %s MiB",
        row["model"],
        row["ranks"],
        f" LoRA r {row['lora_rank']}" if row["lora_rank"] else "",
        row["threads_per_rank"],
        row["tokens_per_s"],
        row["peak_rss_mib_per_rank"],
    )
    return row


def _lora_summary(rows: dict[str, dict]) -> None:
    """The summary's row of the LoRA part, over every model it holds."""
    line = "; ".join(
        f"{name} step {r['full']['step_s_median']:.2f} → {r['lora']['step_s_median']:.2f} s, "
        f"peak RSS {r['full']['peak_rss_mib_per_rank'][0]:.0f} → "
        f"{r['lora']['peak_rss_mib_per_rank'][0]:.0f} MiB, gradients + optimizer "
        f"{r['state_bytes']['full']['gradients_and_optimizer'] / 1e6:.0f} → "
        f"{r['state_bytes']['lora']['gradients_and_optimizer'] / 1e6:.1f} MB"
        for name, r in rows.items()
    )
    load = load_text(combined_load([r["load_during"] for r in rows.values()]))
    update_summary("learner, LoRA vs full (1 rank)", line, "—", load)


def _state(row: dict) -> dict[str, int]:
    """What one rank of ``row`` holds: gradients with optimizer state (what trains), and
    all of it (parameters, with LoRA the frozen base too, gradients, optimizer, reference)."""
    state = row["state_bytes_per_rank"][0]
    return {
        "gradients_and_optimizer": state["gradients"] + state["optimizer"],
        "held": sum(state.values()),
    }


def _compare(n1: dict, n2: dict) -> dict:
    """N=2 against N=1: throughput ratio and the state bytes of the busiest rank."""

    def trained(state: dict[str, int]) -> int:
        return state["parameters"] + state["gradients"] + state["optimizer"]

    return {
        "tokens_per_s_ratio_n2_over_n1": round(n2["tokens_per_s"] / n1["tokens_per_s"], 3),
        "trained_state_ratio_per_rank": round(
            max(trained(s) for s in n2["state_bytes_per_rank"])
            / trained(n1["state_bytes_per_rank"][0]),
            3,
        ),
        "peak_rss_ratio_per_rank": round(
            max(n2["peak_rss_mib_per_rank"]) / n1["peak_rss_mib_per_rank"][0], 3
        ),
    }


if __name__ == "__main__":
    main()
