"""The arithmetic task: the embedded default's training problem.

This module owns the problems (integer expressions such as ``23+45-17``), their
worked solutions (one line per step, the final answer boxed), the jsonl splits
the examples train and evaluate on, and the short supervised warm-up that turns
the project's random tiny model into the base policy of the demo.

A completion has the format the ``arithmetic_steps`` verifier parses::

    prompt:      "Compute 23+45-17.\\n"
    completion:  "23+45=68\\n68-17=51\\n\\\\boxed{51}"   (then end of text)

Everything is deterministic: problems come from seeded generators, the warm-up
fixes its seeds, its thread count and its kernels (``PINNED_NUMERICS``), and results
are cached under ``$GRPO_CACHE_DIR`` keyed by every setting that affects them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from services.embedded.tiny_model import cached_directory, tiny_model_dir

log = logging.getLogger(__name__)

OPERATORS = ("+", "-")
SPLIT_SEEDS = {"train": 1, "eval": 2, "warmup": 3}
EVAL_SIZE = 256
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
"""The warm-up's kernels: torch's AVX2 kernels and MKL's SSE2 code path (conditional
numerical reproducibility, the branch MKL documents as giving the same results on
Intel and compatible processors). Left to choose, they follow each CPU's widest
instructions, and the warm-up's training turned the last-bit differences into a
different base policy on each of three machines (27.3% and 34.4% at step 0 on two of
them). ``MKL_CBWR=AVX2`` is not enough: MKL honours it on Intel CPUs only (an AMD
EPYC's MKL_VERBOSE reports ``CNR:AUTO`` under it, ``CNR:COMPATIBLE`` under this), and
the two machines built different base policies under it."""


@dataclass(frozen=True)
class TaskConfig:
    """Shape of the problems: how many operands and how large they are."""

    operands: int = 3
    max_operand: int = 9


@dataclass(frozen=True)
class WarmupConfig:
    """The supervised warm-up that makes the base model (fixed, documented point)."""

    model_size: str = "small"
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    examples: int = 20_000
    seed: int = 0
    threads: int = 2


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    solution: str


def make_problem(rng: random.Random, task: TaskConfig) -> Problem:
    """One random problem with its worked solution."""
    values = [rng.randint(0, task.max_operand) for _ in range(task.operands)]
    ops = [rng.choice(OPERATORS) for _ in range(task.operands - 1)]
    expression = str(values[0]) + "".join(f"{op}{v}" for op, v in zip(ops, values[1:]))
    lines, total = [], values[0]
    for op, value in zip(ops, values[1:]):
        result = total + value if op == "+" else total - value
        lines.append(f"{total}{op}{value}={result}")
        total = result
    lines.append(f"\\boxed{{{total}}}")
    return Problem(f"Compute {expression}.\n", str(total), "\n".join(lines))


def make_split(split: str, size: int, task: TaskConfig = TaskConfig()) -> list[Problem]:
    """The problems of a split; splits use different seeds and exclude each other."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    held_out = (
        set() if split == "eval" else {p.question for p in make_split("eval", EVAL_SIZE, task)}
    )
    rng = random.Random(SPLIT_SEEDS[split] * 1_000_003 + task.operands * 101 + task.max_operand)
    problems: list[Problem] = []
    while len(problems) < size:
        problem = make_problem(rng, task)
        if problem.question not in held_out:
            problems.append(problem)
    return problems


def write_jsonl(problems: list[Problem], path: Path) -> Path:
    """Write problems as jsonl rows with ``question``, ``answer`` and ``solution``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        for problem in problems:
            handle.write(json.dumps(asdict(problem)) + "\n")
    tmp.replace(path)
    return path


def write_dataset(out_dir: str | Path, task: TaskConfig = TaskConfig(), train_size: int = 4096):
    """Write ``train.jsonl`` and ``eval.jsonl`` (256 held-out questions) to ``out_dir``."""
    out = Path(out_dir)
    write_jsonl(make_split("train", train_size, task), out / "train.jsonl")
    write_jsonl(make_split("eval", EVAL_SIZE, task), out / "eval.jsonl")
    return out


def dataset_dir(task: TaskConfig = TaskConfig()) -> Path:
    """A cached directory with the task's train and eval splits."""
    key = _digest(asdict(task))
    return cached_directory(f"data/arithmetic-{key}", lambda d: write_dataset(d, task))


def base_model_dir(task: TaskConfig = TaskConfig(), warmup: WarmupConfig = WarmupConfig()) -> Path:
    """The demo's base policy: the tiny model after the supervised warm-up (cached)."""
    key = _digest({"task": asdict(task), "warmup": asdict(warmup), "numerics": PINNED_NUMERICS})
    name = f"models/arithmetic-base-{warmup.model_size}-{key}"
    return cached_directory(name, lambda d: _warmup_in_pinned_process(d, task, warmup))


def _warmup_in_pinned_process(out_dir: Path, task: TaskConfig, warmup: WarmupConfig) -> None:
    """Run ``supervised_warmup`` in a fresh interpreter under ``PINNED_NUMERICS``: the
    kernels are chosen when torch loads, so this process's own torch cannot be used."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **PINNED_NUMERICS, "PYTHONPATH": path}
    settings = json.dumps({"task": asdict(task), "warmup": asdict(warmup)})
    command = [sys.executable, "-m", "services.embedded.arithmetic", str(out_dir), settings]
    subprocess.run(command, env=env, check=True)


def supervised_warmup(out_dir: str | Path, task: TaskConfig, warmup: WarmupConfig) -> Path:
    """Train the tiny model on worked solutions of the warm-up split; save it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(warmup.seed)
    torch.set_num_threads(warmup.threads)
    source = tiny_model_dir(warmup.model_size, seed=warmup.seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    problems = make_split("warmup", warmup.examples, task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=warmup.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    rng = random.Random(warmup.seed)
    model.train()
    for step in range(warmup.steps):
        batch = rng.sample(problems, warmup.batch_size)
        input_ids, labels, attention = _sft_batch(tokenizer, batch)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == warmup.steps - 1:
            log.info("warm-up step %d/%d loss %.4f", step + 1, warmup.steps, loss.item())
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _sft_batch(tokenizer, problems: list[Problem]):
    """Right-padded input ids, labels masked to the solution tokens, attention mask."""
    import torch

    rows = []
    for problem in problems:
        prompt = tokenizer(problem.question, add_special_tokens=False)["input_ids"]
        answer = tokenizer(problem.solution, add_special_tokens=False)["input_ids"]
        rows.append((prompt, [*answer, tokenizer.eos_token_id]))
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        ids = prompt + answer
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(answer)
        attention[row, : len(ids)] = 1
    return input_ids, labels, attention


def weights_sha256(model_dir: str | Path) -> str:
    """SHA-256 of ``model_dir/model.safetensors``: equal digests, the same base policy
    (examples/arithmetic/README.md records the one the warm-up builds)."""
    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def prepare_assets(out_dir: str | Path) -> dict[str, Path]:
    """Copy the task's splits and base model into ``out_dir`` (what the example configs use)."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset_dir()
    paths = {}
    for split in ("train", "eval"):
        paths[split] = out / f"{split}.jsonl"
        shutil.copyfile(data / f"{split}.jsonl", paths[split])
    paths["model"] = out / "base-model"
    if not paths["model"].exists():
        tmp = out / ".base-model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base_model_dir(), tmp)
        tmp.rename(paths["model"])
    return paths


if __name__ == "__main__":  # _warmup_in_pinned_process: python -m ... OUT_DIR SETTINGS_JSON
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _settings = json.loads(sys.argv[2])
    supervised_warmup(
        sys.argv[1], TaskConfig(**_settings["task"]), WarmupConfig(**_settings["warmup"])
    )
