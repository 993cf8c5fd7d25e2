"""Benchmark: where the time of one `grpo train` step goes, in sync and async mode.

Runs `grpo train examples/arithmetic/outcome.yaml` (the demo's settings with outcome
supervision: 16 questions × G=8, 48 tokens, the 2.1M-parameter arithmetic base model,
one engine) for ``--steps`` steps with
evaluation and mid-run checkpoints off, in four configurations:

- ``sync`` and ``async`` (``train.mode=async``) with the default threads (engine and
  learner each take both cores; in sync mode they take turns);
- ``sync_split`` and ``async_split``: an explicit core split, ``rollout.threads=1`` and
  ``cluster.learner.threads=1`` (the engine is pinned to core 0).

From ``metrics.jsonl`` (the first ``--warmup`` steps left out, and steps slower than
1.5 × the median, which on this shared machine are bursts of other work) it reports the
mean seconds and the fraction of the step of each phase: generate, reward, learner
forward/backward (``time/logprob_s`` — the reference model's forward — plus
``time/train_s``), weight sync, and driver overhead (the step minus all of those).
In async mode ``time/generate_s`` is only the wait for rollouts that were started
during the previous step, and ``time/weight_sync_s`` includes waiting for the engine to
finish the next step's generation (an engine runs one call at a time).

Overlap: for each thread setting, the sync run gives the two phases — generation
``G = time/generate_s`` and the rest ``T = step − G`` — and the async run's step is
compared with their sum (no overlap) and their max (perfect overlap):
``overlap = (G + T − async_step) / (G + T − max(G, T))``.

Writes ``bench/results/step_breakdown.json``, the plot
``docs/benchmarks_step_breakdown.png`` (stacked bars) and a summary row.

    python bench/step_breakdown.py [--steps 12] [--warmup 2] [--configs sync,async,...]
    python bench/step_breakdown.py --plot-only      # redraw the plot from the last results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import (  # noqa: E402
    DOCS,
    RESULTS,
    LoadTracker,
    ensure_arithmetic_assets,
    load_text,
    machine_info,
    mean,
    median,
    run_grpo_train,
    update_summary,
    wait_for_quiet,
    write_result,
)

SPLIT = ["rollout.threads=1", "cluster.learner.threads=1"]
CONFIGS: dict[str, list[str]] = {
    "sync": [],
    "async": ["train.mode=async"],
    "sync_split": SPLIT,
    "async_split": ["train.mode=async", *SPLIT],
}
PHASES = ("generate", "reward", "logprob", "train", "weight_sync")
PLOT = DOCS / "benchmarks_step_breakdown.png"
BATCH = 16 * 8  # questions_per_step × group_size of outcome.yaml
OUTLIER = 1.5


def breakdown(steps: list[dict], warmup: int) -> dict:
    """Mean seconds and fraction of the step per phase over the steps after ``warmup``,
    leaving out steps slower than ``OUTLIER`` × the median (bursts of other people's
    work on the shared machine; how many were left out is recorded)."""
    kept = steps[warmup:]
    if not kept:
        raise SystemExit(f"only {len(steps)} steps: raise --steps above --warmup")
    typical = median(m["time/step_s"] for m in kept)
    clean = [m for m in kept if m["time/step_s"] <= OUTLIER * typical]
    step = mean(m["time/step_s"] for m in clean)
    seconds = {p: mean(m.get(f"time/{p}_s", 0.0) for m in clean) for p in PHASES}
    seconds["overhead"] = step - sum(seconds.values())
    return {
        "steps_measured": len(clean),
        "steps_left_out_as_outliers": len(kept) - len(clean),
        "step_s_mean": round(step, 4),
        "step_s_median": round(typical, 4),
        "completions_per_s": round(BATCH / step, 1),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "fraction": {k: round(v / step, 4) for k, v in seconds.items()},
        "learner_fwd_bwd_s": round(seconds["logprob"] + seconds["train"], 4),
        "tokens_per_s_generate": round(mean(m["rollout/tokens_per_s"] for m in clean), 1),
        "reward_mean": round(mean(m["reward/mean"] for m in clean), 4),
        "per_step": [
            {"step_s": round(m["time/step_s"], 3)}
            | {p: round(m.get(f"time/{p}_s", 0.0), 3) for p in PHASES}
            for m in steps
        ],
    }


def overlap(sync: dict, asynchronous: dict) -> dict:
    """The async step against the sum and the max of the sync run's two phases."""
    gen = sync["seconds"]["generate"]
    rest = sync["step_s_mean"] - gen
    total, longest = gen + rest, max(gen, rest)
    step = asynchronous["step_s_mean"]
    return {
        "generate_phase_s": round(gen, 4),
        "train_phase_s": round(rest, 4),
        "sum_s": round(total, 4),
        "max_s": round(longest, 4),
        "async_step_s": round(step, 4),
        "overlap": round((total - step) / (total - longest), 3) if total > longest else None,
        "speedup_vs_sync": round(total / step, 3),
        "async_step_over_max": round(step / longest, 3),
    }


def plot(results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    parts = [*PHASES, "overhead"]
    labels = {
        "generate": "generate (async: waiting for it)",
        "reward": "reward",
        "logprob": "learner: reference fwd",
        "train": "learner: fwd/bwd + step",
        "weight_sync": "weight sync",
        "overhead": "driver overhead",
    }
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    bottoms = [0.0] * len(names)
    for part in parts:
        heights = [max(results[n]["seconds"][part], 0.0) for n in names]
        ax.bar(names, heights, bottom=bottoms, label=labels[part])
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, name in enumerate(names):
        ax.text(i, bottoms[i], f"{results[name]['step_s_mean']:.2f} s", ha="center", va="bottom")
    ax.set_ylabel("seconds per step (mean)")
    ax.set_title("grpo train, arithmetic demo (16×8 completions, 2 CPU cores)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_ylim(0, max(bottoms) * 1.15)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="re-plot the last results")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / "step_breakdown.json").read_text())["configs"])
        return
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")

    ensure_arithmetic_assets()
    info = machine_info()
    tracker = LoadTracker()
    results, runs = {}, {}
    for name in names:
        quiet = wait_for_quiet()
        tracker.sample()
        run = run_grpo_train([f"train.steps={args.steps}", *CONFIGS[name]])
        tracker.sample()
        results[name] = breakdown(run.steps(), args.warmup)
        if "train.mode=async" in CONFIGS[name]:  # generate_s is only the wait there
            results[name]["tokens_per_s_generate"] = None
        results[name]["overrides"] = CONFIGS[name]
        results[name]["load"] = quiet
        results[name]["startup_s"] = round(run.startup_s, 1)
        results[name]["wall_s"] = round(run.wall_s, 1)
        runs[name] = run
        r = results[name]
        print(
            f"  {name}: {r['step_s_mean']:.3f} s/step, {r['completions_per_s']} completions/s, "
            f"fractions {r['fraction']} (load {quiet['loadavg_at_start'][0]})",
            flush=True,
        )

    overlaps = {}
    for suffix in ("", "_split"):
        if f"sync{suffix}" in results and f"async{suffix}" in results:
            overlaps[f"async{suffix}"] = overlap(
                results[f"sync{suffix}"], results[f"async{suffix}"]
            )
    load = tracker.summary()
    result = {
        "benchmark": "grpo train step breakdown (arithmetic demo), sync and async",
        "config": "examples/arithmetic/outcome.yaml",
        "settings": {
            "steps": args.steps,
            "warmup_steps_skipped": args.warmup,
            "questions_per_step": 16,
            "group_size": 8,
            "max_tokens": 48,
            "engines": 1,
            "eval": "off",
            "ray_worker_niceness": 0,
        },
        "configs": results,
        "overlap": overlaps,
        "overlap_definition": "(sum - async_step) / (sum - max) of the sync run's generate "
        "and rest-of-step phases with the same threads; 1 = perfect, 0 = none",
        "machine": info,
        "load_during": load,
    }
    out = write_result("step_breakdown", result)
    if not args.no_plot:
        plot(results)
    headline = []
    for name, r in results.items():
        f = r["fraction"]
        headline.append(
            f"{name} {r['step_s_mean']:.2f} s/step (gen {f['generate']:.0%}, reward "
            f"{f['reward']:.0%}, learner {f['logprob'] + f['train']:.0%}, sync "
            f"{f['weight_sync']:.0%}, overhead {f['overhead']:.0%})"
        )
    for name, o in overlaps.items():
        headline.append(f"{name} overlap {o['overlap']} (x{o['speedup_vs_sync']} vs sync)")
    line = "; ".join(headline)
    update_summary("step breakdown", line, "—", load_text(load))
    print(f"step breakdown ({args.steps} steps, first {args.warmup} skipped): {line} -> {out}")


if __name__ == "__main__":
    main()
