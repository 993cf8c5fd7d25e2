"""The training driver: the GRPO step loop that ties rollout, reward and learner together.

One step (DESIGN.md): B questions → the rollout pool samples G completions each
→ the reward service scores them over HTTP → advantages (outcome or process
supervision) → the learner actor updates the policy → the new weights are
broadcast to every engine. In asynchronous mode the pool generates step k+1
while the learner trains on step k, and rollouts older than ``max_staleness``
weight versions are dropped and counted.

The driver also owns evaluation (greedy, on held-out questions, before the
first update, every ``eval_every`` steps and after the last), checkpoints and
exact resume, graceful stop on SIGINT/SIGTERM (finish the step, checkpoint,
exit), and the run directory. ``python -m services.driver --spec FILE`` is the
constant entrypoint the job API hands to Ray's job system.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from reward import RewardClient
from reward.protocol import VerifierRef
from rollout import GroupRequest, RolloutPool, SamplingSpec
from services import cluster
from services.data import DataCursor, Question, load_questions
from services.reporting import NullReporter, Reporter
from services.run_dir import RunDirectory
from services.scoring import (
    ScoredGroups,
    outcome_samples,
    process_samples,
    reward_items,
    reward_tensor,
)
from services.spec import JobSpec
from services.trackers import Tracker, open_trackers

log = logging.getLogger(__name__)

MAX_DYNAMIC_SAMPLING_ROUNDS = 4

StepCallback = Callable[[int, dict[str, Any]], None]


class PreflightError(ValueError):
    """The spec is valid but cannot run here (a file is missing, a verifier unknown…)."""


@dataclass
class RunResult:
    status: str  # "succeeded" | "cancelled"
    steps_done: int
    run_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)


def group_seed(seed: int, step: int, index: int, attempt: int = 0) -> int:
    """The sampling seed of a group, from the run seed, step, group index and refill round."""
    digest = hashlib.sha256(f"{seed}:{step}:{index}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x3FFFFFFF


def prompt_text(question: Question) -> str:
    """The text the reward service sees as the item's prompt."""
    if isinstance(question.prompt, str):
        return question.prompt
    return question.prompt[-1]["content"]


def preflight(spec: JobSpec) -> None:
    """Checks that need the file system, run before any engine starts."""
    model = Path(spec.model.path)
    if not (model / "config.json").exists():
        raise PreflightError(
            f"model.path: {model} is not a Hugging Face model directory (no config.json)"
        )
    for name, path in (("data.train", spec.data.train), ("data.eval", spec.data.eval)):
        if path is not None and not Path(path).exists():
            raise PreflightError(f"{name}: {path} does not exist")
    load_questions(
        spec.data.train,
        prompt_field=spec.data.prompt_field,
        answer_field=spec.data.answer_field,
        limit=1,
    )
    if spec.reward.url is None:
        _check_local_verifiers(spec)


def _check_local_verifiers(spec: JobSpec) -> None:
    from reward import RewardSettings
    from reward.verifiers import build_registry

    known = set(build_registry(RewardSettings()))
    wanted = [v.name for v in spec.reward.verifiers] + [spec.reward.eval_verifier]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise PreflightError(
            f"reward.verifiers: unknown verifier(s) {unknown}; available: {sorted(known)}"
        )


class Driver:
    """Runs one training job to completion, cancellation or failure."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        reporter: Reporter | None = None,
        on_step: StepCallback | None = None,
    ) -> None:
        self.spec = spec
        self.reporter = reporter or NullReporter()
        self.on_step = on_step or (lambda step, metrics: None)
        self.run_dir = RunDirectory(spec.output.dir)
        self.stop_requested = False
        self.version = 0
        self.step = 0
        self.pool: RolloutPool | None = None
        self.learner: Any = None
        self.reward_actor: Any = None
        self.reward: RewardClient | None = None
        self.trackers: list[Tracker] = []

    # ----------------------------------------------------------------- set-up

    def _setup(self, with_learner: bool = True) -> None:
        spec = self.spec
        preflight(spec)
        self.train_questions = self._questions(spec.data.train)
        self.eval_questions = (
            self._questions(spec.data.eval, limit=spec.train.eval_size) if spec.data.eval else []
        )
        self.cursor = DataCursor(self.train_questions, spec.seed)
        if with_learner:
            self.run_dir.prepare(spec.model_dump(mode="json"))
            self.trackers = open_trackers(
                self.run_dir.path,
                tensorboard=spec.output.tensorboard,
                wandb=spec.output.wandb,
                name=spec.name,
                config=spec.model_dump(mode="json"),
            )
        cluster.connect(spec)
        self._start_reward()
        if with_learner:
            self.learner = cluster.start_learner(spec, spec.learner_config())
        self.pool = RolloutPool(
            spec.model.path,
            spec.rollout,
            dtype=_engine_dtype(spec.model.dtype),
            seed=spec.seed,
            actor_options=cluster.engine_actor_options(spec.cluster.engines),
        )
        if with_learner:
            self.run_dir.write_placement(self._placement())
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(spec.model.path, trust_remote_code=False)

    def _placement(self) -> dict:
        engines = [info["node_id"] for info in self.pool.process_infos()]
        return cluster.placement(self.learner, self.reward_actor, engines)

    def _questions(self, path: str, limit: int | None = None) -> list[Question]:
        data = self.spec.data
        return load_questions(
            path,
            prompt_field=data.prompt_field,
            answer_field=data.answer_field,
            chat_template=data.chat_template,
            system_prompt=data.system_prompt,
            limit=limit,
        )

    def _start_reward(self) -> None:
        spec = self.spec.reward
        if spec.url is None:
            self.reward_actor, url, token = cluster.start_reward_service(self.spec)
        else:
            import os

            url, token = spec.url, os.environ.get(spec.token_env) if spec.token_env else None
        self.reward = RewardClient(url, token, timeout_s=spec.timeout_s)

    def _resume(self) -> None:
        checkpoint = self._checkpoint_to_resume()
        if checkpoint is None:
            self.run_dir.truncate_after(-1)
            return
        state = json.loads((checkpoint / "driver_state.json").read_text())
        ray.get(self.learner.load_checkpoint.remote(str(checkpoint)))
        self.cursor.restore(state["cursor"])
        self.step, self.version = state["step"], state["weights_version"]
        self.pool.update_weights(self.learner.export_safetensors.remote(), self.version)
        self.run_dir.truncate_after(self.step)
        log.info("resumed from %s at step %d", checkpoint, self.step)

    def _checkpoint_to_resume(self) -> Path | None:
        resume = self.spec.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":
            return self.run_dir.latest_checkpoint()
        path = Path(resume)
        if not (path / "driver_state.json").exists():
            raise PreflightError(f"checkpoint.resume: {path} is not a checkpoint directory")
        return path

    # ------------------------------------------------------------------- loop

    def run(self) -> RunResult:
        previous = _install_stop_handlers(self._request_stop)
        try:
            self.reporter.state("RUNNING")
            self._setup()
            self._resume()
            status = self._loop()
            self.reporter.state("CANCELLED" if status == "cancelled" else "SUCCEEDED")
            return RunResult(status, self.step, self.run_dir.path, self.run_dir.read_metrics())
        except BaseException as error:
            self.reporter.state("FAILED", error=f"{type(error).__name__}: {error}")
            raise
        finally:
            self.shutdown()
            _restore_handlers(previous)

    def evaluate_only(self) -> dict[str, float]:
        """Evaluate the spec's model without training (``grpo eval``)."""
        if not self.eval_questions_configured():
            raise PreflightError("data.eval: evaluation needs an eval split")
        try:
            self._setup(with_learner=False)
            return self.evaluate()
        finally:
            self.shutdown()

    def eval_questions_configured(self) -> bool:
        return self.spec.data.eval is not None

    def _request_stop(self, *_: Any) -> None:
        log.warning("stop requested: finishing the current step, then checkpointing")
        self.stop_requested = True

    def _loop(self) -> str:
        spec = self.spec.train
        if self.step == 0 and self.eval_questions:
            self._record(0, self.evaluate())
        pending = None
        while self.step < spec.steps:
            if self._should_stop():
                self._checkpoint()
                return "cancelled"
            metrics, pending = self._train_step(pending)
            self.step += 1
            if self._eval_due():
                metrics.update(self.evaluate())
            self._record(self.step, metrics)
            if self._checkpoint_due():
                self._checkpoint()
        self._finish()
        return "succeeded"

    def _should_stop(self) -> bool:
        return self.stop_requested or self.reporter.cancel_requested()

    def _eval_due(self) -> bool:
        every, steps = self.spec.train.eval_every, self.spec.train.steps
        if not self.eval_questions:
            return False
        return self.step == steps or bool(every and self.step % every == 0)

    def _checkpoint_due(self) -> bool:
        every = self.spec.checkpoint.every
        return bool(every and self.step % every == 0 and self.step < self.spec.train.steps)

    def _train_step(self, pending: Any) -> tuple[dict[str, Any], Any]:
        start = time.perf_counter()
        if self.spec.train.mode == "async":
            scored, gen_metrics, pending = self._sample_async(pending)
        else:
            scored, gen_metrics = self._sample_sync()
        metrics = {**gen_metrics, **self._learn(scored)}
        metrics["time/step_s"] = time.perf_counter() - start
        return metrics, pending

    # --------------------------------------------------------------- sampling

    def _sample_sync(self) -> tuple[ScoredGroups, dict[str, Any]]:
        """Generate and score B groups (refilling dropped ones under dynamic sampling)."""
        size = self.spec.train.questions_per_step
        parts, seen, timings = [], [], _Timings()
        for attempt in range(MAX_DYNAMIC_SAMPLING_ROUNDS):
            questions = self.cursor.next_batch(size - sum(len(p.groups) for p in parts))
            with timings.measure("generate"):
                groups = self.pool.generate(self._requests(questions, attempt), self._sampling())
            with timings.measure("reward"):
                scored = self._score(questions, groups)
            seen.append(scored)
            if self.spec.algorithm.dynamic_sampling:
                scored = scored.subset(_informative(scored))
            parts.append(scored)
            if (
                sum(len(p.groups) for p in parts) >= size
                or not self.spec.algorithm.dynamic_sampling
            ):
                break
        everything = ScoredGroups.concat(seen)
        metrics = {**_reward_metrics(everything), **_rollout_metrics(everything, timings)}
        metrics.update(timings.as_metrics())
        return ScoredGroups.concat(parts), metrics

    def _sample_async(self, pending: Any) -> tuple[ScoredGroups, dict[str, Any], Any]:
        """Collect the rollouts started last step, start the next step's, score these."""
        size = self.spec.train.questions_per_step
        timings = _Timings()
        if pending is None:
            pending = self._submit(self.cursor.next_batch(size))
        questions, handle = pending
        with timings.measure("generate"):
            groups = self.pool.collect(handle)
        following = None
        if self.step + 1 < self.spec.train.steps:
            following = self._submit(self.cursor.next_batch(size), step=self.step + 1)
        fresh, stale = _split_stale(questions, groups, self.version, self.spec.train.max_staleness)
        with timings.measure("reward"):
            scored = (
                self._score(*fresh) if fresh[0] else ScoredGroups([], [], [], torch.empty(0, 0))
            )
        metrics = {**_reward_metrics(scored), **_rollout_metrics(scored, timings)}
        metrics.update(timings.as_metrics())
        metrics["async/stale_dropped"] = stale
        return scored, metrics, following

    def _submit(self, questions: list[Question], step: int | None = None) -> tuple[list, Any]:
        requests = self._requests(questions, 0, step=step)
        return questions, self.pool.submit(requests, self._sampling())

    def _requests(
        self, questions: list[Question], attempt: int, step: int | None = None
    ) -> list[GroupRequest]:
        step = self.step + 1 if step is None else step + 1
        return [
            GroupRequest(
                group_id=f"s{step}-a{attempt}-q{i}",
                prompt=q.prompt,
                seed=group_seed(self.spec.seed, step, i, attempt),
            )
            for i, q in enumerate(questions)
        ]

    def _sampling(self) -> SamplingSpec:
        return SamplingSpec.from_config(self.spec.rollout)

    def _score(self, questions: list[Question], groups: list[list[Any]]) -> ScoredGroups:
        items = reward_items(
            questions, groups, self.spec.reward.verifiers, [prompt_text(q) for q in questions]
        )
        results = self.reward.score(items, job_id=self.spec.name, step=self.step + 1)
        grouped, offset = [], 0
        for group in groups:
            grouped.append(results[offset : offset + len(group)])
            offset += len(group)
        return ScoredGroups(questions, groups, grouped, reward_tensor(grouped))

    # --------------------------------------------------------------- learning

    def _learn(self, scored: ScoredGroups) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        samples = self._train_samples(scored)
        start = time.perf_counter()
        if samples:
            learner_metrics = ray.get(self.learner.train_step.remote(samples))
            logprob_s = learner_metrics.pop("time/logprob_s", 0.0)
            metrics.update(learner_metrics)
            metrics["time/logprob_s"] = logprob_s
            metrics["time/train_s"] = time.perf_counter() - start - logprob_s
            sync_start = time.perf_counter()
            self.version += 1
            self.pool.update_weights(self.learner.export_safetensors.remote(), self.version)
            metrics["time/weight_sync_s"] = time.perf_counter() - sync_start
        else:
            log.warning(
                "step %d: no scorable, fresh completions; skipping the update", self.step + 1
            )
            metrics.update({"time/logprob_s": 0.0, "time/train_s": 0.0, "time/weight_sync_s": 0.0})
        metrics["weights_version"] = self.version
        self._write_samples(scored)
        return metrics

    def _train_samples(self, scored: ScoredGroups) -> list:
        if not scored.groups:
            return []
        if self.spec.reward.supervision == "process":
            return process_samples(scored, self.tokenizer)
        return outcome_samples(scored, scale=self.spec.algorithm.scale)

    def _write_samples(self, scored: ScoredGroups) -> None:
        count = self.spec.output.samples_per_step
        rows = []
        for question, group, results in zip(scored.questions, scored.groups, scored.results):
            for record, result in zip(group, results):
                if len(rows) == count:
                    break
                rows.append(
                    {
                        "step": self.step + 1,
                        "prompt": prompt_text(question),
                        "completion": record.text,
                        "reference": question.reference,
                        "reward": result.reward,
                        "status": result.status,
                    }
                )
        self.run_dir.append_samples(rows)

    # ------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out questions under ``reward.eval_verifier`` alone."""
        questions = self.eval_questions
        requests = [GroupRequest(f"eval-{q.index}", q.prompt, seed=None) for q in questions]
        sampling = SamplingSpec.greedy(self.spec.rollout.max_tokens, self.spec.rollout.stop)
        groups = self.pool.generate(requests, sampling)
        verifier = [VerifierRef(name=self.spec.reward.eval_verifier)]
        items = reward_items(questions, groups, verifier, [prompt_text(q) for q in questions])
        results = self.reward.score(items, job_id=f"{self.spec.name}-eval", step=self.step)
        correct = [r.status == "ok" and (r.reward or 0.0) >= 1.0 for r in results]
        accuracy = sum(correct) / max(len(correct), 1)
        log.info("step %d: eval/accuracy %.3f", self.step, accuracy)
        return {"eval/accuracy": accuracy}

    # ------------------------------------------------------------ bookkeeping

    def _record(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _json_number(v) for k, v in metrics.items()}}
        self.run_dir.append_metrics(record)
        for tracker in self.trackers:
            tracker.log(record)
        self.reporter.metrics(record)
        self.on_step(step, record)

    def _checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "weights_version": self.version,
            "cursor": self.cursor.state(),
        }

        def write(tmp: Path) -> None:
            ray.get(self.learner.save_checkpoint.remote(str(tmp)))
            (tmp / "driver_state.json").write_text(json.dumps(state))

        path = self.run_dir.write_checkpoint(self.step, write, self.spec.checkpoint.keep_last)
        self.reporter.checkpoint(self.step, str(path))
        log.info("checkpoint written: %s", path)
        return path

    def _finish(self) -> None:
        self._checkpoint()
        final = self.run_dir.path / "final"
        ray.get(self.learner.save_pretrained.remote(str(final), self.spec.model.path))
        self.run_dir.plot_curves()
        self.reporter.checkpoint(self.step, str(final), final=True)

    def shutdown(self) -> None:
        """Stop the engines, the reward service and the learner (idempotent)."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self.reward is not None:
            self.reward.close()
            self.reward = None
        if self.reward_actor is not None:
            _quietly(lambda: ray.get(self.reward_actor.stop.remote(), timeout=30))
            ray.kill(self.reward_actor)
            self.reward_actor = None
        if self.learner is not None:
            ray.kill(self.learner)
            self.learner = None
        for tracker in self.trackers:
            _quietly(tracker.close)
        self.trackers = []
        if self.run_dir.metrics_file.exists():
            _quietly(self.run_dir.plot_curves)


class _Timings:
    """Seconds spent per phase of a step, summed over refill rounds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{name}_s": value for name, value in self.seconds.items()}


def _informative(scored: ScoredGroups) -> list[int]:
    return [i for i, flat in enumerate(scored.zero_variance_mask().tolist()) if not flat]


def _split_stale(
    questions: list[Question], groups: list[list[Any]], version: int, max_staleness: int
) -> tuple[tuple[list[Question], list[list[Any]]], int]:
    kept_q, kept_g, dropped = [], [], 0
    for question, group in zip(questions, groups):
        if group and version - group[0].weights_version > max_staleness:
            dropped += len(group)
            continue
        kept_q.append(question)
        kept_g.append(group)
    return (kept_q, kept_g), dropped


def _reward_metrics(scored: ScoredGroups) -> dict[str, float]:
    rewards = scored.rewards
    if rewards.numel() == 0:
        return {
            "reward/mean": math.nan,
            "reward/std": math.nan,
            "reward/unscorable_frac": 0.0,
            "reward/zero_variance_groups_frac": 0.0,
        }
    valid = rewards[~rewards.isnan()]
    return {
        "reward/mean": float(valid.mean()) if valid.numel() else math.nan,
        "reward/std": float(valid.std()) if valid.numel() > 1 else 0.0,
        "reward/unscorable_frac": 1.0 - valid.numel() / rewards.numel(),
        "reward/zero_variance_groups_frac": float(scored.zero_variance_mask().float().mean()),
    }


def _rollout_metrics(scored: ScoredGroups, timings: _Timings) -> dict[str, float]:
    records = [r for group in scored.groups for r in group]
    tokens = sum(len(r.token_ids) for r in records)
    generate_s = timings.seconds.get("generate", 0.0)
    return {
        "rollout/response_len_mean": tokens / max(len(records), 1),
        "rollout/truncated_frac": sum(r.truncated for r in records) / max(len(records), 1),
        "rollout/tokens_per_s": tokens / generate_s if generate_s > 0 else 0.0,
        "async/stale_dropped": 0,
    }


def _json_number(value: Any) -> Any:
    """NaN (e.g. the reward mean of a step whose rollouts were all dropped) as null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _engine_dtype(dtype: str) -> str:
    return "float32" if dtype == "auto" else dtype


def _install_stop_handlers(handler: Callable) -> dict:
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: the caller handles signals
            break
    return previous


def _restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _quietly(action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception as error:  # shutdown must finish even when a part is already gone
        log.debug("ignored during shutdown: %s", error)


def main(argv: list[str] | None = None) -> int:
    """``python -m services.driver --spec FILE``: the job API's constant entrypoint."""
    import argparse

    from services.reporting import reporter_from_env
    from services.spec import load_spec

    parser = argparse.ArgumentParser(description="Run one GRPO training job.")
    parser.add_argument("--spec", required=True, help="the validated job spec (JSON or YAML)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = Driver(load_spec(args.spec), reporter=reporter_from_env()).run()
    log.info("run %s after %d steps: %s", result.status, result.steps_done, result.run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
