"""Benchmark: generation throughput of the rollout pool against bare vLLM.

Same model, prompts, sampling parameters and CPU threads on both sides:

- **bare**: ``vllm.LLM.generate`` in this process (``n=G``, one log-prob per token,
  ``processed_logprobs``, the options a pool engine uses);
- **pool (1 engine)**: ``RolloutPool.generate`` through a Ray actor, records and all;
- **pool (2 engines)**: the machine's cores split between two engines (scaling).

Bare and 1-engine pool rounds alternate (bare, pool, pool, bare, ...) so that
load from other work on the machine affects both alike, and Ray's workers run
at the bare side's niceness (Ray's default, 15, would hand the CPU to any
other process on a shared machine). Besides wall-clock tokens/s it reports
tokens per CPU-second of the whole process tree, which other load on a shared
machine barely moves. Every completion is
exactly ``max_tokens`` long (``ignore_eos``). Also measures weight sync through
the object store (serialize + ``update_weights``). Writes
``bench/results/rollout.json`` and prints a summary line.

    .venv/bin/python bench/rollout.py [--size 20m] [--questions 64] [--group-size 8]
                                      [--max-tokens 256] [--threads 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# This script is named like the package it measures: keep its own folder off the import
# path, or `import rollout` would import this file.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

RESULTS = Path(__file__).parent / "results" / "rollout.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", default="20m", help="tiny-model size (services.embedded.tiny_model)"
    )
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of the bare engine and the 1-engine pool",
    )
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per side (ABBA order)")
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument(
        "--ray-niceness",
        type=int,
        default=0,
        help="niceness of Ray workers (Ray's default is 15; 0 matches the bare side)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and every descendant: the bare engine's
    processes, Ray's processes (started here by ``ray.init``) and the pool's actors."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def timed(fn) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds of the process tree) of one round."""
    cpu, start = tree_cpu_seconds(), time.perf_counter()
    tokens = fn()
    return tokens, time.perf_counter() - start, tree_cpu_seconds() - cpu


def prompts(n: int) -> list[str]:
    return [f"Q: {3 * i % 97}+{7 * i % 89}-{i % 13}\nA:" for i in range(n)]


class Bare:
    """vLLM in this process with the options RolloutEngine uses."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, env: dict[str, str]) -> None:
        os.environ.update(env)
        from vllm import LLM, SamplingParams

        self.llm = LLM(
            model=str(model_dir),
            dtype="float32",
            seed=0,
            gpu_memory_utilization=0.05,
            kv_cache_memory_bytes=args.kv_cache_gib << 30,
            enforce_eager=args.eager,
            logprobs_mode="processed_logprobs",
            enable_chunked_prefill=False,  # as RolloutEngine on CPU (seeded requests)
        )
        self.params = [
            SamplingParams(
                n=args.group_size,
                max_tokens=args.max_tokens,
                temperature=1.0,
                ignore_eos=True,
                logprobs=0,
                seed=i,
            )
            for i in range(args.questions)
        ]
        self.prompts = prompts(args.questions)
        self.llm.generate(self.prompts[:2], self.params[:2], use_tqdm=False)  # warm-up

    def run(self) -> tuple[int, float, float]:
        def generate() -> int:
            outputs = self.llm.generate(self.prompts, self.params, use_tqdm=False)
            return sum(len(c.token_ids) for o in outputs for c in o.outputs)

        return timed(generate)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


class Pooled:
    """The rollout pool with ``engines`` engines sharing ``threads`` cores."""

    def __init__(
        self, model_dir: Path, args: argparse.Namespace, engines: int, threads: int
    ) -> None:
        from rollout import GroupRequest, RolloutConfig, RolloutPool, SamplingSpec
        from services.train.parts import engine_placement

        self.config = RolloutConfig(
            engines=engines,
            group_size=args.group_size,
            max_tokens=args.max_tokens,
            threads=threads,
            kv_cache_gib=args.kv_cache_gib,
            enforce_eager=args.eager,
        )
        start = time.perf_counter()
        self.pool = RolloutPool(
            model_dir, self.config, dtype="float32", seed=0, placement=engine_placement(self.config)
        )
        self.start_s = time.perf_counter() - start
        self.requests = [
            GroupRequest(f"q{i}", p, seed=i) for i, p in enumerate(prompts(args.questions))
        ]
        self.sampling = SamplingSpec(
            n=args.group_size, max_tokens=args.max_tokens, temperature=1.0, ignore_eos=True
        )
        self.pool.generate(self.requests[:2], self.sampling)  # warm-up

    def run(self) -> tuple[int, float, float]:
        def generate() -> int:
            groups = self.pool.generate(self.requests, self.sampling)
            return sum(len(r.token_ids) for g in groups for r in g)

        return timed(generate)

    def weight_sync(self, model_dir: Path, version: int) -> dict[str, float]:
        """Seconds to serialize the model's weights and to load them into every engine."""
        import torch
        from transformers import AutoModelForCausalLM

        from rollout import serialize_weights

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(1.0001)
        start = time.perf_counter()
        payload = serialize_weights(model.state_dict())
        serialize_s = time.perf_counter() - start
        start = time.perf_counter()
        self.pool.update_weights(payload, version)
        update_s = time.perf_counter() - start
        assert self.pool.weights_versions() == [version] * self.config.engines
        return {
            "payload_mb": round(len(payload) / 1e6, 1),
            "serialize_s": round(serialize_s, 3),
            "update_weights_s": round(update_s, 3),
        }

    def close(self) -> None:
        self.pool.shutdown()


def summarize(runs: list[tuple[int, float, float]]) -> dict:
    rates = [tokens / wall for tokens, wall, _ in runs]
    cpu_rates = [tokens / cpu for tokens, _, cpu in runs]
    return {
        "tokens_per_round": runs[0][0],
        "round_s": [round(wall, 2) for _, wall, _ in runs],
        "round_cpu_s": [round(cpu, 2) for _, _, cpu in runs],
        "tokens_per_s": round(statistics.median(rates), 1),
        "best_tokens_per_s": round(max(rates), 1),
        "tokens_per_cpu_s": round(statistics.median(cpu_rates), 1),
    }


def main() -> None:
    args = parse_args()
    import ray

    from services.embedded.tiny_model import parameter_count, tiny_model_dir
    from services.train.parts import cpu_engine_env

    model_dir = tiny_model_dir(args.size)
    cpu_ids = sorted(os.sched_getaffinity(0))
    env = cpu_engine_env(0, args.threads, cpu_ids, bind=True)
    load_before = os.getloadavg()

    ray.init(
        num_cpus=len(cpu_ids),
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"worker_niceness": args.ray_niceness},
    )
    bare = Bare(model_dir, args, env)
    pool = Pooled(model_dir, args, engines=1, threads=args.threads)
    bare_runs, pool_runs = [], []
    for i in range(args.rounds):  # ABBA: bare, pool, pool, bare, ...
        order = (bare, pool) if i % 2 == 0 else (pool, bare)
        for side in order:
            (bare_runs if side is bare else pool_runs).append(side.run())
    sync_1 = pool.weight_sync(model_dir, version=1)
    bare.close()
    pool.close()

    result: dict = {
        "benchmark": "rollout pool (Ray actor, records) vs bare vllm.LLM.generate, same threads",
        "model": args.size,
        "model_params": parameter_count(model_dir),
        "group_size": args.group_size,
        "prompts": args.questions,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "thread_env": env,
        "enforce_eager": args.eager,
        "ray_worker_niceness": args.ray_niceness,
        "kv_cache_gib_per_engine": args.kv_cache_gib,
        "rounds": args.rounds,
        "bare": summarize(bare_runs),
        "pool_1_engine": summarize(pool_runs) | {"start_s": round(pool.start_s, 1)},
        "weight_sync_1_engine": sync_1,
    }
    result["ratio_pool_to_bare"] = round(
        result["pool_1_engine"]["tokens_per_s"] / result["bare"]["tokens_per_s"], 3
    )
    result["ratio_pool_to_bare_cpu"] = round(
        result["pool_1_engine"]["tokens_per_cpu_s"] / result["bare"]["tokens_per_cpu_s"], 3
    )
    result["ratio_definition"] = (
        "ratio_pool_to_bare: median wall-clock tokens/s, pool over bare; "
        "ratio_pool_to_bare_cpu: tokens per CPU-second of the whole process tree "
        "(insensitive to other load on a shared machine)"
    )
    result["target_ratio"] = 0.95

    if not args.skip_scaling:
        pool2 = Pooled(model_dir, args, engines=2, threads=max(1, len(cpu_ids) // 2))
        runs2 = [pool2.run() for _ in range(args.rounds)]
        sync_2 = pool2.weight_sync(model_dir, version=1)
        pool2.close()
        result["pool_2_engines"] = summarize(runs2) | {
            "threads_per_engine": pool2.config.threads,
            "start_s": round(pool2.start_s, 1),
        }
        result["weight_sync_2_engines"] = sync_2
        result["scaling_2_vs_1_engine"] = round(
            result["pool_2_engines"]["tokens_per_s"] / result["pool_1_engine"]["tokens_per_s"], 3
        )
    ray.shutdown()
    result["machine"] = {
        "platform": platform.platform(),
        "cpu_count": len(cpu_ids),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    scaling = result.get("scaling_2_vs_1_engine")
    print(
        f"rollout bench ({args.size}, {args.questions}x{args.group_size}x{args.max_tokens} tokens, "
        f"{args.threads} threads): bare {result['bare']['tokens_per_s']} tok/s, "
        f"pool(1) {result['pool_1_engine']['tokens_per_s']} tok/s, "
        f"ratio {result['ratio_pool_to_bare']} wall / {result['ratio_pool_to_bare_cpu']} CPU "
        "(target 0.95)" + (f", pool(2) scaling x{scaling}" if scaling else "")
    )


if __name__ == "__main__":
    main()
