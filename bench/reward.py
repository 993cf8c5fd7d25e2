"""Benchmark: the reward service's `math` verifier over HTTP versus math-verify in-process.

Both paths check the same generated (completion, reference) pairs (a mix of right and
wrong answers in several notations) with the same number of worker processes and the
same pool (`reward.verifiers.pool.DeadlinePool`):

- HTTP: a `RewardServer` on 127.0.0.1, scored with `RewardClient` in requests of
  `--batch` items, with the client's default 4 requests in flight (what the driver does)
  and with one at a time;
- in-process: the whole set handed to the pool at once (no HTTP, no JSON, no batching).

Rounds alternate between the paths (in rotating order); throughput is that of each
path's median round, and the ratio is the median over rounds of the paired ratio, which
damps noise from other work on the machine. Single-item latency over HTTP is measured too.
Writes `bench/results/reward.json` and prints a one-line summary. Target: HTTP ≥ 0.8 of
in-process throughput at batch 64.

    python bench/reward.py [--n 512] [--workers N] [--batch 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

# This script is named like the package it measures: keep its own folder off the import
# path, or `import reward` would import this file.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from reward import RewardClient, RewardServer, RewardSettings  # noqa: E402
from reward.verifiers.math_answer import check_math, warm_worker  # noqa: E402
from reward.verifiers.pool import DeadlinePool  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reward.json"


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (completion, reference) pairs; about 60% right answers, in mixed notations."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(2, 30)
        right = rng.random() < 0.6
        kind = rng.choice(["int", "frac", "decimal", "latex", "steps", "text"])
        if kind == "int":
            value = a * b if right else a * b + rng.randint(1, 9)
            pairs.append((f"Multiplying, we get \\boxed{{{value}}}.", str(a * b)))
        elif kind == "frac":
            num = a if right else a + 1
            pairs.append((f"The ratio is \\boxed{{\\frac{{{num * 2}}}{{{b * 2}}}}}", f"{a}/{b}"))
        elif kind == "decimal":
            value = a / 4 if right else a / 4 + 0.25
            pairs.append((f"So the answer is {value}", f"\\frac{{{a}}}{{4}}"))
        elif kind == "latex":
            coef = a if right else a + 1
            pairs.append((f"$$x = \\boxed{{{coef}\\sqrt{{{b}}}}}$$", f"{a}\\sqrt{{{b}}}"))
        elif kind == "steps":
            total = a + b if right else a + b - 1
            pairs.append((f"{a}+{b}={total}\n\\boxed{{{total}}}", str(a + b)))
        else:
            pairs.append(
                (
                    f"I think it is {a}. Final answer: {a if right else b}",
                    str(a),
                )
            )
    return pairs


def http_round(
    client: RewardClient, pairs: list[tuple[str, str]]
) -> tuple[float, list[float | None]]:
    items = [
        {"id": str(i), "prompt": "Q", "completion": completion, "reference": reference}
        for i, (completion, reference) in enumerate(pairs)
    ]
    started = time.perf_counter()
    results = client.score(items)
    return time.perf_counter() - started, [r.reward for r in results]


def inprocess_round(
    pool: DeadlinePool, pairs: list[tuple[str, str]]
) -> tuple[float, list[float | None]]:
    tasks = [(reference, completion) for completion, reference in pairs]
    started = time.perf_counter()
    outcomes = pool.map(check_math, tasks)
    elapsed = time.perf_counter() - started
    return elapsed, [o.value[0] if o.status == "ok" else None for o in outcomes]


def latency(url: str, pairs: list[tuple[str, str]], count: int) -> list[float]:
    timings = []
    with RewardClient(url, max_batch=1) as client:
        for i in range(count):
            completion, reference = pairs[i % len(pairs)]
            item = {"id": str(i), "prompt": "Q", "completion": completion, "reference": reference}
            started = time.perf_counter()
            client.score([item])
            timings.append(time.perf_counter() - started)
    return timings


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and all its descendants (the fork server
    and the workers of both pools), from /proc; NaN where there is no /proc."""
    try:
        parents: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(entry.path, "stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
                ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    except OSError:
        return math.nan
    ours, frontier = set(), [os.getpid()]
    while frontier:
        pid = frontier.pop()
        ours.add(pid)
        frontier.extend(child for child, parent in parents.items() if parent == pid)
    return sum(ticks.get(pid, 0) for pid in ours) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process alone (client, server and pool management threads)."""
    times = os.times()
    return times.user + times.system


def machine() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "loadavg_before": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="items per round")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    info = machine()
    pairs = make_pairs(args.n)
    settings = RewardSettings(
        host="127.0.0.1", port=0, workers=args.workers, cache_size=0, log_level="warning"
    )
    server = RewardServer(settings)
    url = server.start()
    pool = DeadlinePool(
        args.workers,
        settings.item_timeout_s,
        initializer=warm_worker,
        preload=["math_verify", "reward.verifiers.math_answer"],
    )
    pool.start()
    clients = {
        "http": RewardClient(url, max_batch=args.batch),  # default: 4 requests in flight
        "http_sequential": RewardClient(url, max_batch=args.batch, max_in_flight=1),
    }
    paths = {
        "http": lambda: http_round(clients["http"], pairs),
        "http_sequential": lambda: http_round(clients["http_sequential"], pairs),
        "inprocess": lambda: inprocess_round(pool, pairs),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    own_cpu: dict[str, list[float]] = {name: [] for name in paths}
    try:
        http_round(clients["http"], pairs[: args.batch * 2])  # warm connections and caches
        inprocess_round(pool, pairs[: args.batch * 2])
        names = list(paths)
        for round_index in range(args.rounds):
            rewards = {}
            # Rotate the order so that no path always runs right after another.
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                cpu_before, own_before = cpu_seconds(), own_cpu_seconds()
                elapsed, rewards[name] = paths[name]()
                cpu[name].append(cpu_seconds() - cpu_before)
                own_cpu[name].append(own_cpu_seconds() - own_before)
                times[name].append(elapsed)
            if len({tuple(r) for r in rewards.values()}) != 1:
                raise SystemExit("HTTP and in-process rewards differ")
        timings = latency(url, pairs, args.latency_requests)
    finally:
        for client in clients.values():
            client.close()
        pool.close()
        server.stop()

    # Other work on the machine makes single rounds noisy: use the median round of each
    # path, and the median over rounds of the paired ratio (rounds run back to back).
    tput = {name: args.n / statistics.median(elapsed) for name, elapsed in times.items()}
    best = {name: args.n / min(elapsed) for name, elapsed in times.items()}
    paired = {
        name: statistics.median(i / h for i, h in zip(times["inprocess"], times[name], strict=True))
        for name in ("http", "http_sequential")
    }
    timings.sort()
    result = {
        "benchmark": "reward math verifier: HTTP (batched) vs in-process, same worker pool",
        "n_items": args.n,
        "right_answer_fraction": sum(1 for r in rewards["inprocess"] if r == 1.0) / args.n,
        "workers": args.workers,
        "batch": args.batch,
        "rounds": args.rounds,
        "http_in_flight": 4,
        "http_items_per_s": round(tput["http"], 1),
        "http_sequential_items_per_s": round(tput["http_sequential"], 1),
        "inprocess_items_per_s": round(tput["inprocess"], 1),
        "ratio_http_to_inprocess": round(paired["http"], 3),
        "ratio_http_sequential_to_inprocess": round(paired["http_sequential"], 3),
        "ratio_definition": "median over rounds of inprocess_round_s / http_round_s",
        "target_ratio": 0.8,
        "best_round_items_per_s": {name: round(value, 1) for name, value in best.items()},
        # CPU time per item depends less on other load than wall time does. The workers do
        # the same work on both paths; the HTTP path's extra cost (client and server, both
        # in this process) shows in the parent process's CPU time.
        "cpu_ms_per_item": {
            name: round(statistics.median(c) / args.n * 1000, 3) for name, c in cpu.items()
        },
        "parent_process_cpu_ms_per_item": {
            name: round(statistics.median(c) / args.n * 1000, 3) for name, c in own_cpu.items()
        },
        "round_s": {name: [round(t, 3) for t in elapsed] for name, elapsed in times.items()},
        "single_item_latency_ms": {
            "requests": len(timings),
            "median": round(statistics.median(timings) * 1000, 2),
            "p95": round(timings[int(0.95 * (len(timings) - 1))] * 1000, 2),
        },
        "machine": {**info, "loadavg_after": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lat = result["single_item_latency_ms"]
    cpu_ms = result["cpu_ms_per_item"]
    print(
        f"reward math, {args.n} items, {args.workers} workers, batch {args.batch}: "
        f"HTTP {tput['http']:.0f}/s (4 in flight), {tput['http_sequential']:.0f}/s (sequential) "
        f"vs in-process {tput['inprocess']:.0f}/s (median rounds): ratio "
        f"{result['ratio_http_to_inprocess']:.2f} "
        f"/ {result['ratio_http_sequential_to_inprocess']:.2f} (target 0.8); single-item latency "
        f"median {lat['median']} ms, p95 {lat['p95']} ms; CPU ms/item {cpu_ms['http']} (HTTP) "
        f"vs {cpu_ms['inprocess']} (in-process) -> {args.out}"
    )


if __name__ == "__main__":
    main()
