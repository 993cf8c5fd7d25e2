"""Benchmark: one learner rank on one CUDA GPU, in bf16, with a Qwen2-0.5B-shaped model.

The model is made from a config, with no download (Qwen2-0.5B's shape: hidden 896, 24
layers, 14 attention heads, 2 KV heads, intermediate 4864, vocabulary 151936, tied
embeddings; randomly initialised, ~494M parameters) and written to a temporary
directory, from which ``learner.Learner`` loads it as the service's learner actor does
with ``replicas: 1`` on a GPU: fp32 weights and AdamW state, bf16 autocast for the
forward and backward passes, the frozen reference beside it (β = 0.04). A synthetic GRPO
batch (groups of completions of one prompt, advantages normalised within each group)
goes through ``Learner.train_step``. Reported, as JSON with the device's name:

- tokens per second of the median timed step (prompt + completion tokens, unpadded);
- peak GPU memory (``torch.cuda.max_memory_allocated``) over the steps, and the bytes
  of parameters, gradients, optimizer state and reference (``Learner.memory_bytes``);
- the agreement of the policy's log-probabilities of the batch's completion tokens in
  bf16 autocast against fp32, same weights (mean and max absolute difference).

A run on a GPU writes ``bench/results/gpu_learner.json`` and its summary row; it needs
only torch, transformers and pydantic (the learner's config) there, and the repository
root importable (no project install, no vLLM, no Ray). It takes well under 5 minutes.
Without CUDA it exits with an error; ``--allow-cpu`` runs a scaled-down model on the
CPU instead, as a smoke test of the script (fp32 on both sides of the comparison, so
the differences are 0), printing its JSON and writing no result file.

    python bench/gpu_learner.py [--steps 3] [--groups 8] [--group-size 8] [--allow-cpu]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import machine_info, update_summary, write_result  # noqa: E402

QWEN2_0_5B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
}
CPU_SMOKE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
}
CPU_SMOKE_BATCH = {"groups": 2, "group_size": 4, "prompt_len": 8, "max_completion": 16}
LR = 1e-6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--groups", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-completion", type=int, default=512)
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=4096, help="the learner's default budget"
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="without CUDA, run a scaled-down model and batch on the CPU (a smoke test)",
    )
    args = parser.parse_args(argv)
    for name in ("steps", "groups", "group_size", "prompt_len", "max_completion"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    return args


def choose_device(allow_cpu: bool):
    """The first CUDA GPU; without one, the CPU if allowed, else exit with the reason."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if not allow_cpu:
        raise SystemExit(
            "bench/gpu_learner.py measures the learner on a CUDA GPU and torch sees none "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a "
            "machine with one, or pass --allow-cpu for a scaled-down smoke test on the CPU"
        )
    return torch.device("cpu")


def write_model(out_dir: Path, shape: dict[str, int]) -> int:
    """A randomly initialised Qwen2 of ``shape`` saved in ``out_dir``; its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **shape,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def grpo_batch(args: argparse.Namespace, vocab: int, seed: int = 0) -> list:
    """``groups`` prompts × ``group_size`` completions of random tokens and lengths, each
    group's random rewards turned into advantages as GRPO does (minus the mean, over the std)."""
    from learner import TrainSample

    rng = random.Random(seed)
    samples = []
    for _ in range(args.groups):
        prompt = [rng.randrange(1, vocab) for _ in range(args.prompt_len)]
        rewards = [rng.random() for _ in range(args.group_size)]
        mean, std = statistics.fmean(rewards), statistics.pstdev(rewards) or 1.0
        for reward in rewards:
            n = rng.randint(max(1, args.max_completion // 8), args.max_completion)
            tokens = [rng.randrange(1, vocab) for _ in range(n)]
            logprobs = [-3 * rng.random() for _ in range(n)]
            samples.append(TrainSample(prompt, tokens, (reward - mean) / std, logprobs))
    return samples


def timed_steps(learner, samples: list, args: argparse.Namespace) -> list[float]:
    """Seconds of each timed ``train_step`` (after ``args.warmup`` untimed ones)."""
    import torch

    times = []
    for index in range(args.warmup + args.steps):
        start = time.perf_counter()
        learner.train_step(samples)
        if learner.device.type == "cuda":
            torch.cuda.synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def logprob_agreement(learner, samples: list, micro_batch_tokens: int) -> dict:
    """The policy's completion-token log-probs in bf16 autocast against fp32 (same weights)."""
    import torch

    from learner.batching import collate, plan_micro_batches
    from learner.models import token_logprobs

    temperature = learner.config.temperature
    low_dtype = torch.bfloat16 if learner.device.type == "cuda" else None  # as the learner
    total, count, worst = 0.0, 0, 0.0
    everything = [list(range(len(samples)))]
    with torch.no_grad():
        for indices in plan_micro_batches(samples, everything, 0, micro_batch_tokens):
            batch = collate(samples, indices, learner.pad_id).to(learner.device)
            low = token_logprobs(learner.policy, batch, temperature, low_dtype)
            full = token_logprobs(learner.policy, batch, temperature, None)
            diff = (low - full).abs()[batch.loss_mask.bool()]
            total, count = total + float(diff.sum()), count + diff.numel()
            worst = max(worst, float(diff.max()))
    return {"tokens": count, "mean_abs_diff": total / count, "max_abs_diff": worst}


def measure(args: argparse.Namespace, device, model_dir: Path) -> dict:
    """Build the learner on ``device``, run the steps, and collect what they measured."""
    import torch

    from learner import Learner, LearnerConfig

    on_gpu = device.type == "cuda"
    config = LearnerConfig(
        lr=LR, micro_batch_tokens=args.micro_batch_tokens, max_len=args.max_completion
    )
    start = time.perf_counter()
    learner = Learner(
        str(model_dir), config, device=device.type, dtype="bfloat16" if on_gpu else "float32"
    )
    load_s = time.perf_counter() - start
    samples = grpo_batch(args, learner.policy.config.vocab_size)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    step_s = timed_steps(learner, samples, args)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    tokens = sum(s.length for s in samples)
    return {
        "beta": config.algorithm.beta,
        "load_s": round(load_s, 2),
        "samples_per_step": len(samples),
        "tokens_per_step": tokens,
        "step_s_median": round(statistics.median(step_s), 4),
        "step_s_all": [round(t, 4) for t in step_s],
        "tokens_per_s": round(tokens / statistics.median(step_s), 1),
        "peak_gpu_memory_gib": round(peak, 3) if peak is not None else None,
        "state_bytes": learner.memory_bytes(),
        "logprobs_bf16_vs_fp32": logprob_agreement(learner, samples, args.micro_batch_tokens),
    }


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return machine_info()["cpu_model"] or "cpu"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; on a GPU write its result, on the CPU only print it."""
    args = parse_args(argv)
    device = choose_device(args.allow_cpu)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        vars(args).update(CPU_SMOKE_BATCH, warmup=1, steps=1)
    shape = QWEN2_0_5B if on_gpu else CPU_SMOKE
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-learner-model-") as model_dir:
        parameters = write_model(Path(model_dir), shape)
        measured = measure(args, device, Path(model_dir))
    result = {
        **describe(args, device, {**shape, "parameters": parameters}),
        **measured,
        "wall_s": round(time.perf_counter() - started, 1),  # model build to the last number
    }
    print(json.dumps(result, indent=2))
    if on_gpu:
        out = write_result("gpu_learner", result)
        summarise(result)
        print(f"wrote {out}", file=sys.stderr)
    return result


def describe(args: argparse.Namespace, device, model: dict) -> dict:
    """What was measured, and where: the device, the model, the precision, the batch."""
    import torch
    import transformers

    on_gpu = device.type == "cuda"
    return {
        "benchmark": "Learner.train_step, one rank on one GPU (bf16 autocast)",
        "device": device_name(device),
        "smoke_test_on_cpu": not on_gpu,
        "model": {"architecture": "Qwen2ForCausalLM", "init": "random, from a config", **model},
        "precision": "fp32 weights, gradients, AdamW state and reference; bf16 autocast"
        if on_gpu
        else "fp32 throughout (the learner uses no autocast on a CPU)",
        "batch": {
            "groups": args.groups,
            "group_size": args.group_size,
            "prompt_len": args.prompt_len,
            "completion_len": f"uniform {max(1, args.max_completion // 8)}–{args.max_completion}",
            "micro_batch_tokens": args.micro_batch_tokens,
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "machine": machine_info(),
    }


def summarise(result: dict) -> None:
    agreement = result["logprobs_bf16_vs_fp32"]
    update_summary(
        "learner on one GPU (bf16, Qwen2-0.5B shape)",
        f"{result['tokens_per_s']:.0f} tok/s, peak {result['peak_gpu_memory_gib']:.1f} GiB, "
        f"log-probs bf16 vs fp32 mean {agreement['mean_abs_diff']:.2e} / max "
        f"{agreement['max_abs_diff']:.2e} ({result['device']})",
        "—",
        "—",
    )


if __name__ == "__main__":
    main()
