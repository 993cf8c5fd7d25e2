"""Benchmark: `Learner.train_step` against bare PyTorch, and its GFLOP/s against a matmul.

Two measurements on the demo's base model, float32, all cores:

1. **Achieved GFLOP/s** of a real learner step: the demo's settings (β = 0.04,
   ``micro_batch_tokens`` 8192: the learner buckets the batch by length) on the demo
   batch, the matrix-multiply FLOPs a step needs (every linear layer over the batch's
   real tokens — the LM head over its completion tokens only — forward, both backward
   products, and the reference's forward; attention's own products, a few percent at
   these lengths, are not counted) divided by the median step time, against the same
   products timed as bare ``torch`` matmuls of the same shapes: the fraction of this
   machine's matmul speed a learner step reaches.
2. **Tokens per second** against a hand-written step, same model, batch, dtype, threads
   and optimizer, one token budget large enough for the whole batch (the learner still
   buckets it by length when that saves more padding than a pass costs; bare pads once):

- **learner**: ``learner.Learner.train_step(samples)`` — collation of ``TrainSample``s
  into padded tensors, the GRPO loss of ``learner.grpo`` with its metrics, gradient
  clipping, AdamW, the schedule;
- **bare**: a hand-written step on tensors padded once in advance: forward, log-probs of
  the completion tokens (``log_softmax(logits / T)``), a policy-gradient loss with the
  same per-sequence token mean, backward, ``clip_grad_norm_``, ``AdamW.step``. With
  ``β > 0`` it also runs the frozen reference model's forward and adds the k3 KL term,
  as the learner does.

Both β = 0 (implementation overhead alone) and β = 0.04 (the demo's setting) are
measured. The batch imitates the demo's: 16 × 8 completions of the arithmetic prompt
length (15 tokens) with 20–40 completion tokens. Rounds alternate (learner, bare, bare,
learner, ...); tokens per second (prompt + completion tokens, unpadded) of each side's
median step. Target: learner ≥ 0.9 of bare. Writes ``bench/results/learner_efficiency.json``
(the GFLOP/s under ``demo_step``).

    python bench/learner_efficiency.py [--models demo] [--batch 128] [--steps 2] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import (  # noqa: E402
    ARITHMETIC,
    LoadTracker,
    ensure_arithmetic_assets,
    load_text,
    machine_info,
    update_summary,
    wait_for_quiet,
    write_result,
)

PROMPT_LEN = 15
LR = 3e-4
TEMPERATURE = 1.0


def model_path(name: str) -> Path:
    if name == "demo":
        ensure_arithmetic_assets()
        return ARITHMETIC / "assets" / "base-model"
    from services.embedded.tiny_model import tiny_model_dir

    return tiny_model_dir(name)


def make_samples(n: int, vocab: int, seed: int = 0) -> list:
    from learner import TrainSample

    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        length = rng.randint(20, 40)
        samples.append(
            TrainSample(
                prompt_token_ids=[rng.randrange(256) for _ in range(PROMPT_LEN)],
                token_ids=[rng.randrange(vocab) for _ in range(length)],
                advantages=rng.gauss(0.0, 1.0),
                inference_logprobs=[-rng.random() * 3 for _ in range(length)],
            )
        )
    return samples


class Bare:
    """A plain forward/backward/AdamW step on pre-padded tensors."""

    def __init__(self, path: Path, samples: list, beta: float) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.train()
        self.reference = None
        if beta > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            self.reference.requires_grad_(False).eval()
        self.beta = beta
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)
        width = max(len(s.token_ids) for s in samples)
        pad = self.model.config.pad_token_id or 0
        ids = torch.full((len(samples), PROMPT_LEN + width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        loss_mask = torch.zeros(len(samples), width)
        for row, s in enumerate(samples):
            tokens = list(s.prompt_token_ids) + list(s.token_ids)
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            loss_mask[row, : len(s.token_ids)] = 1.0
        self.ids, self.mask, self.loss_mask = ids, mask, loss_mask
        self.targets = ids[:, PROMPT_LEN:]
        self.advantages = torch.tensor([float(s.advantages) for s in samples]).unsqueeze(1)

    def _logprobs(self, model) -> object:
        logits = model(input_ids=self.ids, attention_mask=self.mask).logits
        logits = logits[:, PROMPT_LEN - 1 : -1].float() / TEMPERATURE
        return logits.log_softmax(-1).gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)

    def step(self) -> None:
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        logprobs = self._logprobs(self.model)
        per_token = -torch.exp(logprobs - logprobs.detach()) * self.advantages
        if self.reference is not None:
            with torch.no_grad():
                ref = self._logprobs(self.reference)
            delta = ref - logprobs
            per_token = per_token + self.beta * (torch.exp(delta) - delta - 1)
        per_seq = (per_token * self.loss_mask).sum(-1) / self.loss_mask.sum(-1)
        per_seq.mean().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()


def timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def compare(name: str, beta: float, args: argparse.Namespace) -> dict:
    import torch

    from learner import Learner, LearnerConfig
    from learner.config import AlgorithmConfig

    path = model_path(name)
    torch.set_num_threads(args.threads)
    config = LearnerConfig(
        algorithm=AlgorithmConfig(beta=beta),
        lr=LR,
        micro_batch_tokens=10**9,  # micro-batching off
        max_len=64,
        temperature=TEMPERATURE,
    )
    learner = Learner(str(path), config, device="cpu", dtype="float32", threads=args.threads)
    vocab = learner.policy.config.vocab_size
    samples = make_samples(args.batch, vocab)
    bare = Bare(path, samples, beta)
    tokens = sum(s.length for s in samples)
    learner_step = lambda: learner.train_step(samples)  # noqa: E731
    timed(learner_step, 2)  # warm-up
    timed(bare.step, 2)
    quiet = wait_for_quiet()
    learner_times, bare_times = [], []
    for i in range(args.rounds):  # ABBA order
        order = ("learner", "bare") if i % 2 == 0 else ("bare", "learner")
        for side in order:
            if side == "learner":
                learner_times += timed(learner_step, args.steps)
            else:
                bare_times += timed(bare.step, args.steps)
    learner_s, bare_s = statistics.median(learner_times), statistics.median(bare_times)
    params = sum(p.numel() for p in learner.policy.parameters())
    return {
        "model": name,
        "parameters": params,
        "beta": beta,
        "batch": args.batch,
        "tokens_per_step": tokens,
        "threads": torch.get_num_threads(),
        "learner_step_s": round(learner_s, 4),
        "bare_step_s": round(bare_s, 4),
        "learner_tokens_per_s": round(tokens / learner_s, 1),
        "bare_tokens_per_s": round(tokens / bare_s, 1),
        "ratio": round(bare_s / learner_s, 3),
        "learner_step_s_all": [round(t, 4) for t in learner_times],
        "bare_step_s_all": [round(t, 4) for t in bare_times],
        "load": quiet,
    }


DEMO_MICRO_BATCH_TOKENS = 8192  # examples/arithmetic/outcome.yaml
DEMO_BETA = 0.04


def linear_products(model, samples: list) -> list[tuple[int, int, int]]:
    """``(rows, in, out)`` of each linear layer's forward product over ``samples``' real
    tokens; the LM head's rows are the completion tokens (the only logits needed)."""
    import torch

    tokens = sum(s.length for s in samples)
    completion = sum(len(s.token_ids) for s in samples)
    head = model.get_output_embeddings()
    products = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            rows = completion if module is head else tokens
            products.append((rows, module.in_features, module.out_features))
    return products


def step_gflop(products: list[tuple[int, int, int]]) -> float:
    """A step's matmul GFLOP: policy forward + two backward products, reference forward."""
    return sum(2 * m * k * n for m, k, n in products) * 4 / 1e9


def matmul_step_s(products: list[tuple[int, int, int]], repeats: int) -> float:
    """Median seconds of the step's products as bare matmuls: per layer the forward
    ``x @ wᵀ``, the input gradient ``g @ w``, the weight gradient ``gᵀ @ x``, and the
    reference's forward."""
    import torch

    operands = [(torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)) for m, k, n in products]

    def once() -> None:
        for x, w, g in operands:
            torch.nn.functional.linear(x, w)
            torch.nn.functional.linear(x, w)
            g @ w
            g.t() @ x

    once()
    return statistics.median(timed(once, repeats))


def demo_step(args: argparse.Namespace) -> dict:
    """The demo's learner step on the demo batch: GFLOP/s against bare matmuls."""
    import torch

    from learner import Learner, LearnerConfig
    from learner.batching import split_by_tokens
    from learner.config import AlgorithmConfig

    torch.set_num_threads(args.threads)
    config = LearnerConfig(
        algorithm=AlgorithmConfig(beta=DEMO_BETA),
        lr=LR,
        micro_batch_tokens=DEMO_MICRO_BATCH_TOKENS,
        max_len=64,
        temperature=TEMPERATURE,
    )
    path = model_path("demo")
    learner = Learner(str(path), config, device="cpu", dtype="float32", threads=args.threads)
    samples = make_samples(args.batch, learner.policy.config.vocab_size)
    products = linear_products(learner.policy, samples)
    groups = split_by_tokens(samples, DEMO_MICRO_BATCH_TOKENS)
    timed(lambda: learner.train_step(samples), 4)  # warm-up: the first steps run slower
    quiet = wait_for_quiet()
    steps = timed(lambda: learner.train_step(samples), args.rounds * 2)
    step_s, matmul_s = statistics.median(steps), matmul_step_s(products, args.rounds * 2)
    gflop = step_gflop(products)
    return {
        "beta": DEMO_BETA,
        "micro_batch_tokens": DEMO_MICRO_BATCH_TOKENS,
        "micro_batches": len(groups),
        "tokens": sum(s.length for s in samples),
        "padded_tokens": sum(len(g) * max(samples[i].length for i in g) for g in groups),
        "gflop_per_step": round(gflop, 3),
        "learner_step_s": round(step_s, 4),
        "learner_gflops": round(gflop / step_s, 2),
        "matmul_s": round(matmul_s, 4),
        "matmul_gflops": round(gflop / matmul_s, 2),
        "fraction_of_matmul": round(matmul_s / step_s, 3),
        "learner_step_s_all": [round(t, 4) for t in steps],
        "threads": torch.get_num_threads(),
        "load": quiet,
    }


def comparisons(args: argparse.Namespace, tracker: LoadTracker) -> list[dict]:
    """Learner against bare tokens/s, for each model and β."""
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        for beta in [float(b) for b in args.betas.split(",")]:
            tracker.sample()
            row = compare(name, beta, args)
            tracker.sample()
            rows.append(row)
            print(
                f"  {name} β={beta}: learner {row['learner_tokens_per_s']:.0f} tok/s vs bare "
                f"{row['bare_tokens_per_s']:.0f} tok/s: ratio {row['ratio']}",
                flush=True,
            )
    return rows


def summary_line(rows: list[dict], step: dict) -> str:
    line = "; ".join(
        f"{r['model']} β={r['beta']:g}: {r['learner_tokens_per_s']:.0f} vs "
        f"{r['bare_tokens_per_s']:.0f} tok/s, ratio {r['ratio']}"
        for r in rows
    )
    return (
        f"{line}; demo step {step['learner_step_s']} s, {step['learner_gflops']} GFLOP/s "
        f"= {step['fraction_of_matmul']} of bare matmul ({step['matmul_gflops']} GFLOP/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo", help="comma-separated: demo, tiny, 20m…")
    parser.add_argument("--betas", default="0,0.04")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    info = machine_info()
    tracker = LoadTracker()
    rows = comparisons(args, tracker)
    tracker.sample()
    step = demo_step(args)
    tracker.sample()
    print(f"  demo step: {step['learner_gflops']} GFLOP/s, matmul {step['matmul_gflops']}")
    load = tracker.summary()
    result = {
        "benchmark": "Learner.train_step vs bare PyTorch forward+backward+AdamW",
        "dtype": "float32",
        "micro_batching": "one budget for the whole batch; the learner buckets it by length",
        "ratio_definition": "bare median step s / learner median step s (= tokens/s ratio)",
        "target_ratio": 0.9,
        "target_met": all(r["ratio"] >= 0.9 for r in rows),
        "results": rows,
        "demo_step": step,
        "machine": info,
        "load_during": load,
    }
    out = write_result("learner_efficiency", result)
    line = summary_line(rows, step)
    update_summary("learner efficiency", line, "≥ 0.9 of bare", load_text(load))
    print(f"learner efficiency ({args.threads} threads, batch {args.batch}): {line} -> {out}")


if __name__ == "__main__":
    main()
