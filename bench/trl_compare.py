"""Benchmark: `grpo train` against TRL's GRPOTrainer at equal settings, on this CPU machine.

TRL is not a dependency of the project: this script installs it into its own virtual
environment, ``bench/.venv-trl`` (``pip install torch==2.13.0 trl``; pip takes the
machine's local CPU wheel of torch; the script refuses an environment where a CUDA
torch or NVIDIA packages were pulled). TRL's vLLM modes need vLLM's CUDA build, so TRL
generates with transformers' ``generate`` in the training process (``use_vllm=False``,
its fastest configuration that runs here; ``--trl-paged`` tries transformers' paged
generation instead).

Both sides train the arithmetic base model on the train split with the same settings:
16 questions × G=8 completions per step (one optimizer update, no micro-batching),
48 new tokens at most, temperature 1, top-p 1, no top-k, lr 3e-4 constant (no warm-up),
AdamW without weight decay, grad clip 1.0, β = 0.04 with a frozen reference model,
ε = 0.2 both sides, one iteration per batch, the paper's loss aggregation (TRL
``loss_type="grpo"`` = our ``seq_mean_token_mean``), rewards scaled by the group's std
(``scale_rewards="group"`` = ``algorithm.scale: group``), float32, and the same reward
function (``bench/boxed_reward.py``: the last ``\\boxed{}`` equals the answer), which
grpo's reward service loads as a custom verifier (``GRPO_REWARD_CUSTOM_VERIFIERS``).

grpo runs in ``--mode`` (the demo's, async: on CPU the engines and the learner each take
half the cores, ``services.train.parts.cpu_share``); in async mode each round also runs
grpo in sync mode, so the sync ratio stands beside it.

Runs alternate (TRL, grpo, [grpo sync,] TRL, ... ``--rounds`` times, ``--steps`` each). Start-up
(process start until the first step begins: imports, models, for grpo also Ray and the
vLLM engine) is timed apart from the steps; steady state is the median step after the
first ``--warmup`` of each run. Reports completions per second and seconds per step of
each, their ratio, and each run's per-step mean reward. Writes
``bench/results/trl_comparison.json`` and a summary row. Target: ≥ 2× TRL's
completions/s.

    python bench/trl_compare.py [--steps 6] [--rounds 2] [--warmup 2] [--mode async] [--trl-paged]
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

from bench.common import (  # noqa: E402
    ARITHMETIC,
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

VENV = REPO / "bench" / ".venv-trl"
VENV_PY = VENV / "bin" / "python"
TRL_REQUIREMENTS = ["torch==2.13.0", "trl"]
MODEL = ARITHMETIC / "assets" / "base-model"
TRAIN = ARITHMETIC / "assets" / "train.jsonl"
QUESTIONS, GROUP, MAX_TOKENS, LR, BETA = 16, 8, 48, 3e-4, 0.04
BATCH = QUESTIONS * GROUP
DEMO_MODE = "async"
"""``make demo``'s train.mode (the Makefile's ``--set train.mode=async``)."""

GRPO_OVERRIDES = [
    f"train.questions_per_step={QUESTIONS}",
    f"rollout.group_size={GROUP}",
    f"rollout.max_tokens={MAX_TOKENS}",
    "rollout.temperature=1.0",
    "rollout.top_p=1.0",
    f"train.lr={LR}",
    "train.warmup_steps=0",
    "train.weight_decay=0.0",
    "train.grad_clip=1.0",
    "train.updates_per_step=1",
    "train.micro_batch_tokens=1000000",  # no micro-batching, as TRL here
    f"algorithm.beta={BETA}",
    "algorithm.kl=k3",
    "algorithm.clip_low=0.2",
    "algorithm.clip_high=0.2",
    "algorithm.agg=seq_mean_token_mean",
    "algorithm.scale=group",
    "model.dtype=float32",
    "reward.verifiers=[{name: boxed, weight: 1.0}]",
    "reward.eval_verifier=boxed",
]
GRPO_ENV = {
    "GRPO_REWARD_CUSTOM_VERIFIERS": json.dumps({"boxed": "bench.boxed_reward:boxed_answer"})
}


# ------------------------------------------------------------------ TRL's venv


def ensure_trl_venv() -> dict[str, str]:
    """Create ``bench/.venv-trl`` with TRL and the local CPU torch; return the versions."""
    if not _trl_importable():
        print(f"  installing TRL into {VENV} (a few minutes, once)", flush=True)
        if not VENV_PY.exists():
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(VENV_PY), "-m", "pip", "install", "--quiet", *TRL_REQUIREMENTS], check=True
        )
    versions = json.loads(
        subprocess.run(
            [
                str(VENV_PY),
                "-c",
                "import json, torch, transformers, trl, accelerate; print(json.dumps({m.__name__: "
                "m.__version__ for m in (torch, transformers, trl, accelerate)} | "
                "{'cuda': torch.version.cuda}))",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    listing = subprocess.run(
        [str(VENV_PY), "-m", "pip", "list", "--format=freeze"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    nvidia = [
        line for line in listing.splitlines() if line.lower().startswith(("nvidia", "triton"))
    ]
    if versions["cuda"] is not None or not versions["torch"].endswith("+cpu") or nvidia:
        raise SystemExit(
            f"{VENV} has a CUDA torch ({versions['torch']}, cuda {versions['cuda']}) or NVIDIA "
            f"packages {nvidia}; remove the folder and pin the CPU wheel"
        )
    return versions


def _trl_importable() -> bool:
    if not VENV_PY.exists():
        return False
    check = subprocess.run([str(VENV_PY), "-c", "import trl, torch"], capture_output=True)
    return check.returncode == 0


# ------------------------------------------------------------------------- runs


def run_trl(steps: int, paged: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="trl-bench-")) / "marks.json"
    command = [
        str(VENV_PY),
        str(REPO / "bench" / "trl_runner.py"),
        "--model",
        str(MODEL),
        "--train",
        str(TRAIN),
        "--steps",
        str(steps),
        "--questions-per-step",
        str(QUESTIONS),
        "--group-size",
        str(GROUP),
        "--max-tokens",
        str(MAX_TOKENS),
        "--lr",
        str(LR),
        "--beta",
        str(BETA),
        "--out",
        str(out),
    ] + (["--paged"] if paged else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("PYTHONPATH", None)
    spawned = time.time()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - spawned
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"TRL run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    marks = json.loads(out.read_text())
    step_s = [end - begin for begin, end in marks["steps"]]
    logs = [log for log in marks["logs"] if "reward" in log]
    return {
        "startup_s": round(marks["steps"][0][0] - spawned, 2),
        "startup_to_trainer_ready_s": round(marks["trainer_ready"] - spawned, 2),
        "wall_s": round(wall, 1),
        "step_s": [round(s, 3) for s in step_s],
        "generate_s": [round(s, 3) for s in marks["generate_s"]],
        "reward_mean": [round(float(log["reward"]), 4) for log in logs],
        "completion_len_mean": [round(float(log["completions/mean_length"]), 2) for log in logs],
        "kl": [round(float(log.get("kl", 0.0)), 5) for log in logs],
        "torch_threads": marks["torch_threads"],
        "generation": marks["generation"],
    }


def run_grpo(steps: int, mode: str) -> dict:
    overrides = [f"train.steps={steps}", f"train.mode={mode}", *GRPO_OVERRIDES]
    run = run_grpo_train(overrides, env_extra=GRPO_ENV)
    steps_m = run.steps()
    return {
        "startup_s": round(run.startup_s, 2),
        "startup_breakdown_s": run.placement.get("startup_s", {}),
        "cpu_share": run.placement.get("cpu_share"),
        "wall_s": round(run.wall_s, 1),
        "teardown_s": round(run.teardown_s, 1),
        "step_s": [round(m["time/step_s"], 3) for m in steps_m],
        "generate_s": [round(m["time/generate_s"], 3) for m in steps_m],
        "reward_mean": [round(m["reward/mean"], 4) for m in steps_m],
        "completion_len_mean": [round(m["rollout/response_len_mean"], 2) for m in steps_m],
        "kl": [round(m.get("loss/kl", 0.0), 5) for m in steps_m],
        "phases_s_median": {
            key: round(median(m.get(f"time/{key}_s", 0.0) for m in steps_m[2:]), 3)
            for key in ("generate", "reward", "logprob", "train", "weight_sync")
        },
    }


def steady(runs: list[dict], warmup: int, generate_key: str) -> dict:
    kept = [s for run in runs for s in run["step_s"][warmup:]]
    step = median(kept)
    generate = median(s for run in runs for s in run[generate_key][warmup:])
    return {
        "steps_measured": len(kept),
        "step_s_median": round(step, 3),
        "generate_s_median": round(generate, 3),
        "completions_per_s": round(BATCH / step, 2),
        "startup_s_median": round(median(r["startup_s"] for r in runs), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="TRL, grpo pairs")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of a run left out")
    parser.add_argument("--trl-paged", action="store_true", help="TRL: paged generate_batch")
    parser.add_argument(
        "--mode", default=DEMO_MODE, choices=("sync", "async"), help="grpo's train.mode"
    )
    args = parser.parse_args()

    versions = ensure_trl_venv()
    ensure_arithmetic_assets()
    info = machine_info()
    tracker = LoadTracker()
    sides = ("trl", "grpo", "grpo_sync") if args.mode == "async" else ("trl", "grpo")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    order = []
    for round_index in range(args.rounds):
        for side in sides:
            quiet = wait_for_quiet()
            tracker.sample()
            run = (
                run_trl(args.steps, args.trl_paged)
                if side == "trl"
                else run_grpo(args.steps, "sync" if side == "grpo_sync" else args.mode)
            )
            tracker.sample()
            run["round"], run["load"] = round_index, quiet
            runs[side].append(run)
            order.append(side)
            print(
                f"  round {round_index} {side}: start-up {run['startup_s']} s, steps "
                f"{run['step_s']} s, reward {run['reward_mean']} "
                f"(load {quiet['loadavg_at_start'][0]})",
                flush=True,
            )

    trl_runs, grpo_runs = runs["trl"], runs["grpo"]
    trl = steady(trl_runs, args.warmup, "generate_s")
    grpo = steady(grpo_runs, args.warmup, "generate_s")
    paired = [
        round(median(t["step_s"][args.warmup :]) / median(g["step_s"][args.warmup :]), 2)
        for t, g in zip(trl_runs, grpo_runs, strict=True)
    ]
    ratio = round(grpo["completions_per_s"] / trl["completions_per_s"], 2)
    sync = {}
    if "grpo_sync" in runs:
        grpo_sync = steady(runs["grpo_sync"], args.warmup, "generate_s")
        sync = {
            "grpo_sync": grpo_sync,
            "sync_ratio_completions_per_s_grpo_over_trl": round(
                grpo_sync["completions_per_s"] / trl["completions_per_s"], 2
            ),
        }
    load = tracker.summary()
    result = {
        "benchmark": "grpo train vs TRL GRPOTrainer, equal settings, arithmetic task, CPU",
        "settings": {
            "model": "examples/arithmetic/assets/base-model (Qwen2, 2.1M parameters, float32)",
            "prompts": "examples/arithmetic/assets/train.jsonl (train split)",
            "questions_per_step": QUESTIONS,
            "group_size": GROUP,
            "completions_per_step": BATCH,
            "max_new_tokens": MAX_TOKENS,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": "off",
            "lr": LR,
            "lr_schedule": "constant, no warm-up",
            "optimizer": "AdamW (torch), weight decay 0, grad clip 1.0",
            "beta": BETA,
            "epsilon": 0.2,
            "loss": "TRL loss_type=grpo = grpo algorithm.agg=seq_mean_token_mean",
            "reward_scaling": "group std (TRL scale_rewards=group, grpo algorithm.scale=group)",
            "updates_per_batch": 1,
            "micro_batching": "off on both sides",
            "gradient_checkpointing": "off on both sides",
            "reward": "bench/boxed_reward.py:boxed_answer in both (grpo: custom verifier)",
            "steps_per_run": args.steps,
            "rounds": args.rounds,
            "warmup_steps_skipped_per_run": args.warmup,
            "order": order,
        },
        "trl": {
            "versions": versions,
            "generation": trl_runs[0]["generation"] + " (use_vllm=False; TRL's vLLM modes "
            "need vLLM's CUDA build)",
            "venv": str(VENV.relative_to(REPO)),
            **trl,
        },
        "grpo": {
            "engine": "vLLM 0.32 CPU build, 1 engine, Ray workers at niceness 0",
            **grpo,
        },
        "mode": args.mode,
        "ratio_completions_per_s_grpo_over_trl": ratio,
        **sync,
        "per_round_step_s_trl_over_grpo": paired,
        "goal_multiple": 2.0,
        "goal_met": ratio >= 2.0,
        "runs": runs,
        "reward_curves": {side: [r["reward_mean"] for r in runs[side]] for side in sides},
        "machine": info,
        "load_during": load,
    }
    out = write_result("trl_comparison", result)
    line = (
        f"grpo {grpo['completions_per_s']} completions/s ({grpo['step_s_median']} s/step) vs TRL "
        f"{trl['completions_per_s']} ({trl['step_s_median']} s/step): x{ratio}; start-up "
        f"{grpo['startup_s_median']} s vs {trl['startup_s_median']} s"
    )
    if sync:
        line = f"{args.mode}: {line}; sync x{sync['sync_ratio_completions_per_s_grpo_over_trl']}"
    update_summary("vs TRL GRPOTrainer", line, "≥ 2× completions/s", load_text(load))
    print(f"TRL comparison ({args.rounds}×{args.steps} steps each): {line} -> {out}")


if __name__ == "__main__":
    main()
