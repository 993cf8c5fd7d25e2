"""TRL's GRPOTrainer on the arithmetic task: the TRL side of bench/trl_compare.py.

Runs with the Python of TRL's own virtual environment (``bench/.venv-trl``), which has
neither this project nor vLLM: it imports only TRL's stack, the standard library and
``bench/boxed_reward.py`` (by file path). Settings come from the command line and are
set explicitly, TRL's defaults included, to match ``grpo train``'s. It writes a JSON of
wall-clock marks (process start, training start, each step's start and end) and the
per-step logs (mean reward, completion length) and the seconds spent in TRL's
``_generate`` (tokenize, generate, decode) each step to ``--out``.

Generation: TRL without vLLM (``use_vllm=False``) calls transformers' ``generate`` in the
training process (``--paged`` switches to transformers' paged ``generate_batch``).
"""

from __future__ import annotations

import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def load_reward():
    path = Path(__file__).resolve().parent / "boxed_reward.py"
    spec = importlib.util.spec_from_file_location("boxed_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.boxed_answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True, help="jsonl with question and answer")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--questions-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paged", action="store_true", help="transformers' paged generation")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines() if line]
    # The same text as grpo's prompt; the answer column is named `reference`, as the reward
    # service calls it, so that one function serves both.
    dataset = Dataset.from_list([{"prompt": r["question"], "reference": r["answer"]} for r in rows])
    marks: dict = {"process_start": PROCESS_START, "steps": [], "logs": [], "generate_s": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks["train_begin"] = time.time()

        def on_step_begin(self, *_, **__):
            marks["steps"].append([time.time(), None])

        def on_step_end(self, *_, **__):
            marks["steps"][-1][1] = time.time()

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs is not None:
                marks["logs"].append(dict(logs))

    batch = args.questions_per_step * args.group_size
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    config = GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=batch,  # completions per step (B × G), one update
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.max_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        epsilon=0.2,
        epsilon_high=0.2,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        mask_truncated_completions=False,
        use_vllm=False,
        use_transformers_paged=args.paged,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_dropout=True,
        gradient_checkpointing=False,  # TRL's default is True; grpo's learner has it off
        dataloader_num_workers=0,
        log_completions=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    trainer = GRPOTrainer(
        model=args.model,
        reward_funcs=[load_reward()],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    generate = trainer._generate  # time generation apart from the rest of each step

    def timed_generate(*a, **k):
        start = time.time()
        try:
            return generate(*a, **k)
        finally:
            marks["generate_s"].append(time.time() - start)

    trainer._generate = timed_generate
    marks["trainer_ready"] = time.time()
    trainer.train()
    marks["train_end"] = time.time()
    marks["torch_threads"] = torch.get_num_threads()
    marks["versions"] = {
        name: __import__(name).__version__ for name in ("torch", "transformers", "trl")
    }
    marks["generation"] = (
        "transformers generate_batch (paged)" if args.paged else ("transformers generate")
    )
    marks["completions_per_step"] = batch
    Path(args.out).write_text(json.dumps(marks, indent=1))
    os._exit(0)  # skip interpreter teardown (not part of the measurement)


if __name__ == "__main__":
    main()
