"""Helpers for the learner tests: recorded rollouts, a weights digest, and N-rank groups.

``run_ranks`` starts N learner processes (spawn, gloo on 127.0.0.1, a free
port) that each run one of the ``rank_*`` functions below; those functions
live here so that the worker processes can import them. Every rank writes
what it measured to ``out_dir/rank{r}.pt`` for the test to read.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from learner import Learner, LearnerConfig, TrainSample
from learner.distributed import DistContext


def recorded_rollouts(seed: int, n_steps: int = 4, batch: int = 8) -> list[list[TrainSample]]:
    """Synthetic 'recorded' rollouts: random prompts/completions with ±1 advantages."""
    rng = random.Random(seed)
    steps = []
    for _ in range(n_steps):
        samples = []
        for _ in range(batch):
            prompt = [rng.randrange(32, 120) for _ in range(rng.randint(3, 8))]
            tokens = [rng.randrange(32, 120) for _ in range(rng.randint(1, 12))]
            logprobs = [-rng.random() * 3 for _ in tokens]
            samples.append(TrainSample(prompt, tokens, rng.choice([-1.0, 1.0]), logprobs))
        steps.append(samples)
    return steps


def weights_digest(learner: Learner) -> str:
    """SHA-256 of the exported weights: equal digests mean identical policies."""
    return hashlib.sha256(learner.export_safetensors()).hexdigest()


def make_learner(
    model_dir: str, context: DistContext | None = None, **overrides: object
) -> Learner:
    config = LearnerConfig(lr=1e-3, **overrides)
    return Learner(model_dir, config, device="cpu", seed=0, threads=1, dist_context=context)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    task, world_size: int, out_dir: Path, *args: object, timeout_s: float = 30.0
) -> list[dict | None]:
    """Run ``task(context, out_dir, *args)`` on ``world_size`` ranks; what each rank saved.

    ``timeout_s`` is the group's collective timeout; the ranks get 8× that in all.
    """
    port = free_port()
    spawn = mp.get_context("spawn")
    procs = []
    for rank in range(world_size):
        context = DistContext(rank, world_size, master_port=port, timeout_s=timeout_s)
        procs.append(spawn.Process(target=task, args=(context, out_dir, *args)))
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + 8 * timeout_s
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.1))
    alive = [proc for proc in procs if proc.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive, f"{len(alive)} rank(s) still running after {8 * timeout_s} s"
    assert [proc.exitcode for proc in procs] == [0] * world_size
    files = [out_dir / f"rank{r}.pt" for r in range(world_size)]
    return [torch.load(f, weights_only=False) if f.exists() else None for f in files]


def full_grads(learner: Learner) -> dict[str, torch.Tensor]:
    """Every trained parameter's full gradient (collective with N ranks)."""
    out = {}
    for name, param in learner.policy.named_parameters():
        if not param.requires_grad:
            continue  # a LoRA policy's frozen base
        grad = param.grad
        out[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad.clone()
    return out


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    """A copy of the exported weights (collective with N ranks; empty off rank 0)."""
    return {name: tensor.clone() for name, tensor in learner.named_weights()}


def train_and_checkpoint(learner: Learner, batches: list, checkpoint: Path) -> dict:
    """Step through ``batches``, checkpointing after the first step.

    Returns the metrics, weights and gradients after each step, the state
    bytes after the first, and at the end the log-probs of the first batch
    and the safetensors export; writes ``{checkpoint}_final`` (``save_pretrained``).
    """
    out: dict = {"metrics": [], "weights": [], "grads": []}
    for step, batch in enumerate(batches):
        out["metrics"].append(learner.train_step(batch))
        out["weights"].append(weights(learner))
        out["grads"].append(full_grads(learner))
        if step == 0:
            out["memory"] = learner.memory_bytes()
            learner.save_checkpoint(checkpoint)
    out["logprobs"] = learner.compute_logprobs(batches[0])
    out["safetensors"] = learner.export_safetensors()
    learner.save_pretrained(checkpoint.parent / f"{checkpoint.name}_final")
    return out


def resume_and_step(learner: Learner, checkpoint: str, batch: list) -> dict:
    """Load ``checkpoint``; the weights as loaded, then one step's metrics and weights."""
    learner.load_checkpoint(checkpoint)
    loaded = weights(learner)
    metrics = learner.train_step(batch)
    return {"loaded": loaded, "metrics": metrics, "after": weights(learner)}


def rank_train(
    context: DistContext, out_dir: Path, model_dir: str, batches: list, configs: list, ports: list
) -> None:
    """``train_and_checkpoint`` with one learner per config (each on its own port)."""
    runs = []
    for index, (overrides, port) in enumerate(zip(configs, [context.master_port, *ports])):
        learner = make_learner(model_dir, replace(context, master_port=port), **overrides)
        runs.append(train_and_checkpoint(learner, batches, out_dir / f"ckpt{index}"))
        learner.close()
    torch.save({"runs": runs}, out_dir / f"rank{context.rank}.pt")


def rank_resume(
    context: DistContext,
    out_dir: Path,
    model_dir: str,
    overrides: dict,
    checkpoints: list,
    batch: list,
) -> None:
    """``resume_and_step`` from each checkpoint in turn, with one learner."""
    learner = make_learner(model_dir, context, **overrides)
    resumed = [resume_and_step(learner, path, batch) for path in checkpoints]
    learner.close()
    torch.save({"resumed": resumed}, out_dir / f"rank{context.rank}.pt")


def rank_fails(context: DistContext, out_dir: Path, model_dir: str, batch: list, how: str) -> None:
    """Rank 1 exits (``how="exits"``) or stalls past the timeout once the group is formed;
    rank 0 reports how its step failed, and after how long."""
    learner = make_learner(model_dir, context)
    if context.rank == 1:
        if how == "stalls":
            time.sleep(context.timeout_s + 2)
        os._exit(0)
    start = time.monotonic()
    try:
        learner.train_step(batch)
        error = None
    except Exception as exc:  # the test inspects whatever was raised
        error = f"{type(exc).__name__}: {exc}"
    result = {"error": error, "seconds": time.monotonic() - start}
    torch.save(result, out_dir / f"rank{context.rank}.pt")
    os._exit(0)  # the group is broken: skip its teardown
