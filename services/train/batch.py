"""One step's batch: the groups, their rewards ``[B, G]`` and their advantages.

A :class:`StepBatch` is built once per step from the sampled groups and the
reward service's results, and keeps one shape all the way to the learner:
``rewards`` is a ``[B, G]`` tensor with NaN for every unscorable completion (the
reward client's rule, :func:`reward.rewards_and_steps`), the advantages come
from ``learner.grpo`` in one call per batch (outcome) or per group (process),
and only :meth:`StepBatch.train_samples`, at the learner's edge, flattens it
into ``TrainSample`` rows. The batch also names the groups sampled for the step
but left out of it (stale, or dropped by dynamic sampling), so that
:meth:`StepBatch.group_rows` accounts for every group of the step in
``groups.jsonl``. Process supervision maps the reward service's character offsets
to token indices by detokenizing prefixes of the generated tokens, so the
alignment holds whatever the tokenizer merges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from learner import TrainSample
from learner.grpo import outcome_advantages, process_advantages, zero_variance_groups
from reward import rewards_and_steps
from reward.protocol import Item, Result, VerifierRef
from rollout import RolloutRecord
from services.train.data import Question

Advantage = float | list[float] | None
"""Of one completion: one value, one per token (process supervision), or None (left out)."""


@dataclass(frozen=True)
class LeftOut:
    """A group sampled for a step but not in its batch: ``stale_dropped`` or
    ``dynamic_dropped``."""

    group_id: str
    weights_version: int
    outcome: str


def prompt_text(question: Question) -> str:
    """The text the reward service sees as the item's prompt."""
    if isinstance(question.prompt, str):
        return question.prompt
    return question.prompt[-1]["content"]


def reward_items(
    questions: Sequence[Question],
    groups: Sequence[Sequence[RolloutRecord]],
    verifiers: Sequence[VerifierRef],
) -> list[Item]:
    """One protocol item per completion, ids ``"<group_id>/<sample_index>"``."""
    return [
        Item(
            id=f"{record.group_id}/{record.sample_index}",
            prompt=prompt_text(question),
            completion=record.text,
            reference=question.reference,
            verifiers=list(verifiers),
            metadata=dict(question.metadata),
            completion_ids=list(record.token_ids),
        )
        for question, group in zip(questions, groups)
        for record in group
    ]


@dataclass(frozen=True)
class StepBatch:
    """B groups of G completions with their results; ``rewards`` is ``[B, G]``, NaN =
    unscorable. ``advantages`` is set by :meth:`with_advantages`, one entry per
    completion."""

    questions: list[Question]
    groups: list[list[RolloutRecord]]
    results: list[list[Result]]
    rewards: torch.Tensor
    advantages: list[list[Advantage]] | None = None
    left_out: tuple[LeftOut, ...] = ()

    @staticmethod
    def scored(
        questions: list[Question], groups: list[list[RolloutRecord]], results: Sequence[Result]
    ) -> StepBatch:
        """Regroup a flat list of results (in the order of the groups' records)."""
        sizes = [len(group) for group in groups]
        grouped, offset = [], 0
        for size in sizes:
            grouped.append(list(results[offset : offset + size]))
            offset += size
        flat, _ = rewards_and_steps(results)
        rewards = torch.tensor(flat, dtype=torch.float32)
        return StepBatch(questions, groups, grouped, _as_rows(rewards, sizes))

    @staticmethod
    def empty() -> StepBatch:
        return StepBatch([], [], [], torch.empty(0, 0))

    @staticmethod
    def concat(parts: Sequence[StepBatch]) -> StepBatch:
        if not parts:
            return StepBatch.empty()
        return StepBatch(
            [q for p in parts for q in p.questions],
            [g for p in parts for g in p.groups],
            [r for p in parts for r in p.results],
            torch.cat([p.rewards for p in parts]),
            left_out=tuple(g for p in parts for g in p.left_out),
        )

    def leaving_out(self, groups: Sequence[Sequence[RolloutRecord]], outcome: str) -> StepBatch:
        """This batch, naming ``groups`` as sampled for the step but left out (``outcome``)."""
        named = tuple(LeftOut(g[0].group_id, g[0].weights_version, outcome) for g in groups if g)
        return replace(self, left_out=self.left_out + named)

    def informative(self) -> StepBatch:
        """The groups that carry a learning signal (dynamic sampling keeps only these)."""
        flat = zero_variance_groups(self.rewards).tolist()
        keep = [i for i, no_signal in enumerate(flat) if not no_signal]
        kept = StepBatch(
            [self.questions[i] for i in keep],
            [self.groups[i] for i in keep],
            [self.results[i] for i in keep],
            self.rewards[keep],
            left_out=self.left_out,
        )
        dropped = [group for group, no_signal in zip(self.groups, flat) if no_signal]
        return kept.leaving_out(dropped, "dynamic_dropped")

    def with_advantages(self, supervision: str, *, scale: str, tokenizer: Any) -> StepBatch:
        """This batch with the GRPO advantages of every scorable completion."""
        if supervision == "process":
            rows = [self._process_row(g, tokenizer) for g in range(len(self.groups))]
        else:
            values = outcome_advantages(self.rewards, scale=scale).tolist() if self.groups else []
            rows = [self._masked(g, row) for g, row in enumerate(values)]
        return replace(self, advantages=rows)

    def train_samples(self) -> list[TrainSample]:
        """The learner's flat rows: one per scorable completion, in group order."""
        if self.advantages is None:
            raise RuntimeError("StepBatch.train_samples needs with_advantages() first")
        return [
            TrainSample(
                prompt_token_ids=record.prompt_token_ids,
                token_ids=record.token_ids,
                advantages=advantage,
                inference_logprobs=record.inference_logprobs,
            )
            for group, row in zip(self.groups, self.advantages)
            for record, advantage in zip(group, row)
            if advantage is not None
        ]

    def group_rows(self, step: int) -> list[dict[str, Any]]:
        """``groups.jsonl`` rows of the step: each group in the batch (``trained``,
        ``zero_variance`` or ``unscorable``, from its advantages), then those left out."""
        if self.advantages is None:
            raise RuntimeError("StepBatch.group_rows needs with_advantages() first")
        fates = [
            (group[0].group_id, group[0].weights_version, _outcome(row))
            for group, row in zip(self.groups, self.advantages)
        ]
        fates += [(g.group_id, g.weights_version, g.outcome) for g in self.left_out]
        return [
            {"step": step, "group_id": group_id, "weights_version": version, "outcome": outcome}
            for group_id, version, outcome in fates
        ]

    def metrics(self) -> dict[str, float]:
        """``reward/*`` and ``rollout/*`` metrics of the batch (``time/*`` come from the caller)."""
        return {**_reward_metrics(self.rewards), **_rollout_metrics(self.records())}

    def records(self) -> list[RolloutRecord]:
        return [record for group in self.groups for record in group]

    def sample_rows(self, step: int, count: int) -> list[dict[str, Any]]:
        """The first ``count`` completions with their rewards, for ``samples.jsonl``."""
        rows = [
            {
                "step": step,
                "prompt": prompt_text(question),
                "completion": record.text,
                "reference": question.reference,
                "reward": result.reward,
                "status": result.status,
            }
            for question, group, results in zip(self.questions, self.groups, self.results)
            for record, result in zip(group, results)
        ]
        return rows[:count]

    def _masked(self, g: int, values: list[float]) -> list[Advantage]:
        valid = (~self.rewards[g].isnan()).tolist()
        return [value if ok else None for value, ok in zip(values, valid)]

    def _process_row(self, g: int, tokenizer: Any) -> list[Advantage]:
        group, results = self.groups[g], self.results[g]
        valid = [i for i, ok in enumerate((~self.rewards[g].isnan()).tolist()) if ok]
        row: list[Advantage] = [None] * len(group)
        if not valid:
            return row
        step_rewards, step_ends = [], []
        for i in valid:
            rewards, ends = _step_tensors(group[i], results[i], tokenizer)
            step_rewards.append(rewards)
            step_ends.append(ends)
        width = max(max(len(group[i].token_ids) for i in valid), 1)
        advantages = process_advantages(step_rewards, step_ends, width)
        for k, i in enumerate(valid):
            row[i] = advantages[k, : len(group[i].token_ids)].tolist()
        return row


def _outcome(advantages: Sequence[Advantage]) -> str:
    """``unscorable`` (nothing to train on), ``zero_variance`` (every advantage 0: only the
    KL term moves the policy) or ``trained``."""
    scorable = [a for a in advantages if a is not None]
    if not scorable:
        return "unscorable"
    values = [v for a in scorable for v in (a if isinstance(a, list) else [a])]
    return "trained" if any(values) else "zero_variance"


def _step_tensors(
    record: RolloutRecord, result: Result, tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    steps = result.step_rewards or []
    if not steps and record.text.strip():
        raise ValueError(
            "reward.supervision is 'process' but the verifiers returned no "
            "step_rewards; use a process verifier such as arithmetic_steps"
        )
    ends = token_indices_of_offsets(tokenizer, record.token_ids, [s.end for s in steps])
    return (
        torch.tensor([s.reward for s in steps], dtype=torch.float32),
        torch.tensor(ends, dtype=torch.long),
    )


def token_indices_of_offsets(
    tokenizer: Any, token_ids: Sequence[int], char_ends: Sequence[int]
) -> list[int]:
    """For each exclusive character offset, the index of the token that completes it.

    The answer for offset ``e`` is the smallest ``t`` such that the detokenized
    ``token_ids[: t + 1]`` is at least ``e`` characters long (binary search).
    """
    last = max(len(token_ids) - 1, 0)
    cache: dict[int, int] = {}

    def decoded_length(t: int) -> int:
        if t not in cache:
            cache[t] = len(tokenizer.decode(token_ids[: t + 1], skip_special_tokens=True))
        return cache[t]

    indices = []
    for end in char_ends:
        low, high = 0, last
        while low < high:
            middle = (low + high) // 2
            if decoded_length(middle) >= end:
                high = middle
            else:
                low = middle + 1
        indices.append(low)
    return indices


def _as_rows(flat: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``[sum(sizes)] -> [B, G]`` (groups of one batch have equal size G)."""
    if not sizes:
        return torch.empty(0, 0)
    if len(set(sizes)) != 1:
        raise ValueError(f"groups of one batch must have equal sizes, got {sorted(set(sizes))}")
    return flat.view(len(sizes), sizes[0])


def _reward_metrics(rewards: torch.Tensor) -> dict[str, float]:
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
        "reward/zero_variance_groups_frac": float(zero_variance_groups(rewards).float().mean()),
    }


def _rollout_metrics(records: Sequence[RolloutRecord]) -> dict[str, float]:
    tokens = sum(len(r.token_ids) for r in records)
    return {
        "rollout/response_len_mean": tokens / max(len(records), 1),
        "rollout/truncated_frac": sum(r.truncated for r in records) / max(len(records), 1),
    }
