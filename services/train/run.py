"""One training run around the step loop: start-up, resume, records, stop, shutdown.

:class:`TrainingRun` owns what is not the step itself: preflight checks before
any engine starts, starting the parts, exact resume from a checkpoint (the
learner's state, the data cursor, the weights version, and the run directory cut
back to that step), graceful stop on SIGINT/SIGTERM or a cancel from the job API
(finish the step, checkpoint, exit), the evaluation cadence (before the first
update, every ``eval_every`` steps, after the last), checkpoints, state reports
to the job API, and the run directory. The step loop is :func:`services.train.loop.train`.
"""

from __future__ import annotations

import json
import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reward.protocol import Item
from services.spec import JobSpec
from services.train.batch import StepBatch, prompt_text
from services.train.data import DataCursor, Question, load_questions
from services.train.evaluation import evaluate
from services.train.loop import train
from services.train.parts import Parts, engine_lora, quietly, start_parts
from services.train.reporting import NullReporter, Reporter
from services.train.run_dir import RunDirectory
from services.train.trackers import Tracker, open_trackers

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, Any]], None]


class PreflightError(ValueError):
    """The spec is valid but cannot run here (a file is missing, a verifier unknown…)."""


@dataclass
class RunResult:
    status: str  # "succeeded" | "cancelled"
    steps_done: int
    run_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)


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
    load_spec_questions(spec, spec.data.train, limit=1)
    if spec.reward.url is None:
        _check_local_verifiers(spec)
    try:
        engine_lora(spec)  # model.lora.target_modules names modules the model has
    except ValueError as error:
        raise PreflightError(str(error)) from None


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


def load_spec_questions(spec: JobSpec, path: str, limit: int | None = None) -> list[Question]:
    """The questions of one split, read as the spec's ``data`` section says."""
    data = spec.data
    return load_questions(
        path,
        prompt_field=data.prompt_field,
        answer_field=data.answer_field,
        chat_template=data.chat_template,
        system_prompt=data.system_prompt,
        metadata_fields=data.metadata_fields,
        limit=limit,
    )


def probe_item(spec: JobSpec, question: Question) -> Item:
    """An item the reward source must answer before the first step (any status will do)."""
    return Item(
        id="probe",
        prompt=prompt_text(question),
        completion="",
        reference=question.reference,
        verifiers=list(spec.reward.verifiers),
        metadata=dict(question.metadata),
    )


class TrainingRun:
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
        self.stop_signalled = False
        self.step = 0
        self.version = 0
        self.parts: Parts | None = None
        self.trackers: list[Tracker] = []
        self.cursor: DataCursor | None = None
        self.eval_questions: list[Question] = []
        self.tokenizer: Any = None

    # ---------------------------------------------------------------- lifecycle

    def run(self) -> RunResult:
        """Start, resume if there is a checkpoint, train, and report the outcome."""
        previous = _install_stop_handlers(self._signal_stop)
        try:
            self.reporter.state("RUNNING")
            self._start(with_learner=True)
            self._resume()
            status = train(self)
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
        if self.spec.data.eval is None:
            raise PreflightError("data.eval: evaluation needs an eval split")
        try:
            self._start(with_learner=False)
            return self.evaluate()
        finally:
            self.shutdown()

    def _start(self, *, with_learner: bool) -> None:
        spec = self.spec
        preflight(spec)
        self.cursor = DataCursor(load_spec_questions(spec, spec.data.train), spec.seed)
        self.eval_questions = (
            load_spec_questions(spec, spec.data.eval, limit=spec.train.eval_size)
            if spec.data.eval
            else []
        )
        if with_learner:
            self.run_dir.prepare(spec.model_dump(mode="json"))
            self.trackers = open_trackers(
                self.run_dir.path,
                tensorboard=spec.output.tensorboard,
                wandb=spec.output.wandb,
                name=spec.name,
                config=spec.model_dump(mode="json"),
            )
        self.parts = start_parts(spec, with_learner=with_learner)
        self.parts.reward.probe(probe_item(spec, self.cursor.questions[0]))
        if with_learner:
            self.run_dir.write_placement(self.parts.placement())
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(spec.model.path, trust_remote_code=False)

    def _resume(self) -> None:
        checkpoint = self._checkpoint_to_resume()
        if checkpoint is None:
            self.run_dir.start_fresh()
            return
        state = json.loads((checkpoint / "driver_state.json").read_text())
        self.parts.learner.load_checkpoint(str(checkpoint))
        self.cursor.restore(state["cursor"])
        self.step, self.version = state["step"], state["weights_version"]
        self.parts.learner.sync_weights(self.parts.pool, self.version)
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

    def shutdown(self) -> None:
        """Stop the parts and the trackers; draw the curves (idempotent)."""
        if self.parts is not None:
            self.parts.shutdown()
            self.parts = None
        for tracker in self.trackers:
            quietly(tracker.close)
        self.trackers = []
        if self.run_dir.metrics_file.exists():
            quietly(self.run_dir.plot_curves)

    # ------------------------------------------------------- what the loop calls

    def stop_requested(self) -> bool:
        return self.stop_signalled or self.reporter.cancel_requested()

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out questions (nothing without an eval split)."""
        if not self.eval_questions:
            return {}
        return evaluate(self.spec, self.parts, self.eval_questions, self.step)

    def evaluate_first(self) -> None:
        """Record the policy's accuracy before any update as step 0 (with an eval split)."""
        if self.step == 0 and self.eval_questions:
            self.record(self.evaluate())

    def record(self, metrics: dict[str, Any], batch: StepBatch | None = None) -> None:
        """Record ``self.step``: evaluate when due, write metrics, samples and the groups'
        outcomes, report them, and checkpoint when due."""
        if batch is not None:
            if self._eval_due():
                metrics.update(self.evaluate())
            count = self.spec.output.samples_per_step
            self.run_dir.append_samples(batch.sample_rows(self.step, count))
            self.run_dir.append_groups(batch.group_rows(self.step))
        record = {"step": self.step, **{k: _json_number(v) for k, v in metrics.items()}}
        self.run_dir.append_metrics(record)
        for tracker in self.trackers:
            tracker.log(record)
        self.reporter.metrics(record)
        self.on_step(self.step, record)
        if batch is not None and self._checkpoint_due():
            self.checkpoint()

    def checkpoint(self) -> Path:
        cursor = self.cursor.resume_state(self.step)
        state = {"step": self.step, "weights_version": self.version, "cursor": cursor}

        def write(tmp: Path) -> None:
            self.parts.learner.save_checkpoint(str(tmp))
            (tmp / "driver_state.json").write_text(json.dumps(state))

        path = self.run_dir.write_checkpoint(self.step, write, self.spec.checkpoint.keep_last)
        self.reporter.checkpoint(self.step, str(path))
        log.info("checkpoint written: %s", path)
        return path

    def finish(self) -> None:
        """The last checkpoint, ``final/`` (a Hugging Face model directory), the curves."""
        self.checkpoint()
        final = self.run_dir.path / "final"
        self.parts.learner.save_pretrained(str(final), self.spec.model.path)
        self.run_dir.plot_curves()
        self.reporter.checkpoint(self.step, str(final), final=True)

    def _eval_due(self) -> bool:
        every, steps = self.spec.train.eval_every, self.spec.train.steps
        if not self.eval_questions:
            return False
        return self.step == steps or bool(every and self.step % every == 0)

    def _checkpoint_due(self) -> bool:
        every = self.spec.checkpoint.every
        return bool(every and self.step % every == 0 and self.step < self.spec.train.steps)

    def _signal_stop(self, *_: Any) -> None:
        log.warning("stop requested: finishing the current step, then checkpointing")
        self.stop_signalled = True


def _json_number(value: Any) -> Any:
    """NaN (e.g. the reward mean of a step whose rollouts were all dropped) as null."""
    return None if isinstance(value, float) and math.isnan(value) else value


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
