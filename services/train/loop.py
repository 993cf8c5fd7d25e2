"""The GRPO step loop, on one screen: sample → score → advantages → learn → sync → record.

Read this first. Each phase is one line and each part is a typed handle: the
sampling pipeline (:mod:`services.train.sampling`) returns the step's scored
groups as one :class:`~services.train.batch.StepBatch`, the batch computes its
advantages with ``learner.grpo``, the :class:`~services.train.parts.LearnerGroup`
trains on it and moves the new weights into every engine, and the
:class:`~services.train.run.TrainingRun` records the step (metrics, samples,
evaluation and checkpoints when due). Ray stays behind the handles.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from services.train.sampling import SamplingPipeline

if TYPE_CHECKING:
    from services.train.batch import StepBatch
    from services.train.parts import LearnerGroup
    from services.train.run import TrainingRun

log = logging.getLogger(__name__)


def train(run: TrainingRun) -> str:
    """Steps from ``run.step`` to ``train.steps``: ``"succeeded"``, or ``"cancelled"``
    when a stop was asked (after a checkpoint)."""
    spec, parts = run.spec, run.parts
    pipeline = SamplingPipeline(spec, parts.pool, parts.reward, run.cursor)
    run.evaluate_first()
    while run.step < spec.train.steps:
        if run.stop_requested():
            run.checkpoint()
            return "cancelled"
        started = time.perf_counter()
        batch, metrics = pipeline.next_batch(run.step + 1, run.version)  # sample → score
        batch = batch.with_advantages(
            spec.reward.supervision, scale=spec.algorithm.scale, tokenizer=run.tokenizer
        )  # advantages
        metrics |= learn(parts.learner, batch, run)  # learn → sync weights
        run.step += 1
        metrics["time/step_s"] = time.perf_counter() - started
        run.record(metrics, batch)  # record (evaluation and checkpoint when due)
    run.finish()
    return "succeeded"


def learn(learner: LearnerGroup, batch: StepBatch, run: TrainingRun) -> dict[str, Any]:
    """Train on the batch's scorable completions and sync the engines to the new version."""
    samples = batch.train_samples()
    if not samples:
        log.warning("step %d: no scorable, fresh completions; skipping the update", run.step + 1)
        zero = {"time/logprob_s": 0.0, "time/train_s": 0.0, "time/weight_sync_s": 0.0}
        return {**zero, "weights_version": run.version}
    started = time.perf_counter()
    metrics = learner.train_step(samples)
    logprob_s = metrics.pop("time/logprob_s", 0.0)
    metrics["time/logprob_s"] = logprob_s
    metrics["time/train_s"] = time.perf_counter() - started - logprob_s
    synced = time.perf_counter()
    run.version += 1
    learner.sync_weights(run.parts.pool, run.version)
    metrics["time/weight_sync_s"] = time.perf_counter() - synced
    return {**metrics, "weights_version": run.version}
