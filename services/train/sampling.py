"""The one sampling pipeline: questions in, one scored :class:`StepBatch` per step out.

Synchronous and asynchronous training are the same pipeline with a different
look-ahead: with look-ahead 0 a step's groups are submitted when the step asks
for them; with look-ahead 1 (``train.mode: async``) the next step's groups are
submitted as soon as this step's are collected, so the engines generate them
while the learner trains. Each group records the weight version it was sampled
with; groups more than ``train.max_staleness`` versions behind are dropped and
counted (``async/stale_dropped``). Dynamic sampling (DAPO) drops the groups
whose rewards are all equal and refills the step from the dataset, up to
:data:`MAX_DYNAMIC_SAMPLING_ROUNDS` rounds. A reward source that leaves most
completions unscorable step after step fails the run (:class:`UnscorableGuard`)
instead of letting it "succeed" with the initial weights.

Sampling seeds depend only on the run seed, the step, the group's index and the
refill round, so a run is reproducible exactly; group ids name those and the
question's row in the dataset (``s3-a0-q1-d57``), so that ``groups.jsonl`` shows
which question each group was, across a resume too. Every group sampled for a step is
in its :class:`StepBatch`, or named there as left out (stale or dropped by dynamic
sampling).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rollout import GroupRequest, RolloutPool, RolloutRecord, SamplingSpec
from services.spec import JobSpec
from services.train.batch import StepBatch, reward_items
from services.train.data import DataCursor, Question
from services.train.parts import RewardSource, RewardSourceError

MAX_DYNAMIC_SAMPLING_ROUNDS = 4


def group_seed(seed: int, step: int, index: int, attempt: int = 0) -> int:
    """The sampling seed of a group, from the run seed, step, group index and refill round."""
    digest = hashlib.sha256(f"{seed}:{step}:{index}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x3FFFFFFF


class UnscorableGuard:
    """Fails the run once more than ``train.max_unscorable_steps`` consecutive steps had
    more than ``train.max_unscorable_frac`` of their completions unscorable."""

    def __init__(self, spec: JobSpec, source: str) -> None:
        self.max_frac = spec.train.max_unscorable_frac
        self.max_steps = spec.train.max_unscorable_steps
        self.source = source
        self.failed_steps = 0
        self.first_error: str | None = None

    def check(self, step: int, batch: StepBatch) -> None:
        rewards = batch.rewards
        frac = float(rewards.isnan().float().mean()) if rewards.numel() else 0.0
        if frac <= self.max_frac:
            self.failed_steps, self.first_error = 0, None
            return
        self.failed_steps += 1
        self.first_error = self.first_error or _first_error(batch)
        if self.failed_steps > self.max_steps:
            raise RewardSourceError(
                f"step {step}: {self.failed_steps} steps in a row had more than "
                f"{self.max_frac:.0%} of their completions unscorable by {self.source}; "
                f"its first error: {self.first_error}. Fix the reward source, or raise "
                "train.max_unscorable_frac / train.max_unscorable_steps"
            )


def _first_error(batch: StepBatch) -> str:
    for results in batch.results:
        for result in results:
            if result.status != "ok":
                return f"{result.status}: {result.error or 'no message'}"
    return "none reported"


class PhaseTimer:
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


@dataclass
class _Submission:
    step: int
    questions: list[Question]
    handle: Any  # rollout.GenerationHandle


class SamplingPipeline:
    """Samples and scores the groups of each step (see the module docstring)."""

    def __init__(
        self, spec: JobSpec, pool: RolloutPool, reward: RewardSource, cursor: DataCursor
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.reward = reward
        self.cursor = cursor
        self.lookahead = 1 if spec.train.mode == "async" else 0
        self.sampling = SamplingSpec.from_config(spec.rollout)
        self.guard = UnscorableGuard(spec, reward.name)
        self._inflight: deque[_Submission] = deque()

    def next_batch(self, step: int, version: int) -> tuple[StepBatch, dict[str, float]]:
        """The scored groups of ``step`` (1-based) and the step's sampling metrics."""
        size, dynamic = self.spec.train.questions_per_step, self.spec.algorithm.dynamic_sampling
        timer, kept, seen, stale_rows = PhaseTimer(), [], [], 0
        for attempt in range(MAX_DYNAMIC_SAMPLING_ROUNDS):
            submission = self._take(step, attempt, size - sum(len(p.groups) for p in kept))
            with timer.measure("generate"):
                groups = self.pool.collect(submission.handle)
            self._prefetch(step)
            questions, groups, stale = self._fresh(submission.questions, groups, version)
            stale_rows += sum(len(group) for group in stale)
            with timer.measure("reward"):
                scored = self.score(questions, groups, step).leaving_out(stale, "stale_dropped")
            seen.append(scored)
            kept.append(scored.informative() if dynamic else scored)
            if not dynamic or sum(len(p.groups) for p in kept) >= size:
                break
        everything = StepBatch.concat(seen)
        self.guard.check(step, everything)
        metrics = {**everything.metrics(), **timer.as_metrics(), "async/stale_dropped": stale_rows}
        metrics["rollout/tokens_per_s"] = _tokens_per_s(everything, timer)
        return StepBatch.concat(kept), metrics

    def score(
        self, questions: list[Question], groups: list[list[RolloutRecord]], step: int
    ) -> StepBatch:
        """Score groups with the spec's verifiers (no request when there is nothing)."""
        if not groups:
            return StepBatch.empty()
        items = reward_items(questions, groups, self.spec.reward.verifiers)
        results = self.reward.score(items, job_id=self.spec.name, step=step)
        return StepBatch.scored(questions, groups, results)

    def _take(self, step: int, attempt: int, count: int) -> _Submission:
        """The prefetched submission of ``step``, or a new one."""
        if attempt == 0 and self._inflight and self._inflight[0].step == step:
            return self._inflight.popleft()
        return self._submit(step, self.cursor.next_batch(count, step), attempt)

    def _prefetch(self, step: int) -> None:
        """Keep ``lookahead`` later steps in flight (never past the last step)."""
        last = min(step + self.lookahead, self.spec.train.steps)
        queued = {s.step for s in self._inflight}
        for ahead in range(step + 1, last + 1):
            if ahead not in queued:
                size = self.spec.train.questions_per_step
                self._inflight.append(self._submit(ahead, self.cursor.next_batch(size, ahead), 0))

    def _submit(self, step: int, questions: list[Question], attempt: int) -> _Submission:
        requests = [
            GroupRequest(
                group_id=f"s{step}-a{attempt}-q{i}-d{q.index}",
                prompt=q.prompt,
                seed=group_seed(self.spec.seed, step, i, attempt),
            )
            for i, q in enumerate(questions)
        ]
        return _Submission(step, questions, self.pool.submit(requests, self.sampling))

    def _fresh(
        self, questions: list[Question], groups: list[list[RolloutRecord]], version: int
    ) -> tuple[list[Question], list[list[RolloutRecord]], list[list[RolloutRecord]]]:
        """Split off the groups sampled more than ``max_staleness`` versions ago."""
        limit = self.spec.train.max_staleness
        kept_q, kept_g, stale = [], [], []
        for question, group in zip(questions, groups):
            if group and version - group[0].weights_version > limit:
                stale.append(group)
                continue
            kept_q.append(question)
            kept_g.append(group)
        return kept_q, kept_g, stale


def _tokens_per_s(batch: StepBatch, timer: PhaseTimer) -> float:
    tokens = sum(len(r.token_ids) for r in batch.records())
    generate_s = timer.seconds.get("generate", 0.0)
    return tokens / generate_s if generate_s > 0 else 0.0
