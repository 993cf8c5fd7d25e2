"""From rollouts to training samples: rewards, advantages and their token alignment.

The driver's glue between the three parts: it turns rollout records into
reward-protocol items, the service's results into a ``[B, G]`` reward tensor
(NaN for anything not ``ok``), those into GRPO advantages with
``learner.grpo`` (outcome or process supervision), and the scored completions
into ``TrainSample``s. Process supervision maps the reward service's character
offsets to token indices by detokenizing prefixes of the generated tokens, so
the alignment holds whatever the tokenizer merges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from learner import TrainSample
from learner.grpo import outcome_advantages, process_advantages
from reward.protocol import Item, Result, VerifierRef
from rollout import RolloutRecord
from services.data import Question


@dataclass
class ScoredGroups:
    """A batch of groups with their rewards; ``rewards`` is ``[B, G]``, NaN = unscorable."""

    questions: list[Question]
    groups: list[list[RolloutRecord]]
    results: list[list[Result]]
    rewards: torch.Tensor

    def zero_variance_mask(self) -> torch.Tensor:
        """``[B]``: groups whose valid rewards are all equal (or have < 2 valid)."""
        masked_max = torch.nan_to_num(self.rewards, nan=-math.inf).max(dim=1).values
        masked_min = torch.nan_to_num(self.rewards, nan=math.inf).min(dim=1).values
        valid = (~self.rewards.isnan()).sum(dim=1)
        return (masked_max == masked_min) | (valid < 2)

    def subset(self, keep: Sequence[int]) -> ScoredGroups:
        return ScoredGroups(
            [self.questions[i] for i in keep],
            [self.groups[i] for i in keep],
            [self.results[i] for i in keep],
            self.rewards[list(keep)],
        )

    @staticmethod
    def concat(parts: Sequence[ScoredGroups]) -> ScoredGroups:
        return ScoredGroups(
            [q for p in parts for q in p.questions],
            [g for p in parts for g in p.groups],
            [r for p in parts for r in p.results],
            torch.cat([p.rewards for p in parts]) if parts else torch.empty(0, 0),
        )


def reward_items(
    questions: Sequence[Question],
    groups: Sequence[Sequence[RolloutRecord]],
    verifiers: Sequence[VerifierRef],
    prompt_texts: Sequence[str],
) -> list[Item]:
    """One protocol item per completion, ids ``"<group_id>/<sample_index>"``."""
    return [
        Item(
            id=f"{record.group_id}/{record.sample_index}",
            prompt=prompt_text,
            completion=record.text,
            reference=question.reference,
            verifiers=list(verifiers),
        )
        for question, group, prompt_text in zip(questions, groups, prompt_texts)
        for record in group
    ]


def reward_tensor(results: Sequence[Sequence[Result]]) -> torch.Tensor:
    """``[B, G]`` float rewards; NaN where the status is not ``ok``."""
    return torch.tensor(
        [
            [r.reward if r.status == "ok" and r.reward is not None else math.nan for r in group]
            for group in results
        ],
        dtype=torch.float32,
    )


def outcome_samples(scored: ScoredGroups, *, scale: str, eps: float = 1e-6) -> list[TrainSample]:
    """Training samples with one advantage per completion; unscorable ones are left out."""
    advantages = outcome_advantages(scored.rewards, eps=eps, scale=scale)
    samples = []
    for g, group in enumerate(scored.groups):
        for i, record in enumerate(group):
            if math.isnan(float(scored.rewards[g, i])):
                continue
            samples.append(_sample(record, float(advantages[g, i])))
    return samples


def process_samples(scored: ScoredGroups, tokenizer, *, eps: float = 1e-6) -> list[TrainSample]:
    """Training samples with per-token advantages from the results' step rewards."""
    samples = []
    for group, results in zip(scored.groups, scored.results):
        valid = [(r, res) for r, res in zip(group, results) if res.status == "ok"]
        if not valid:
            continue
        step_rewards, step_ends = [], []
        for record, result in valid:
            steps = result.step_rewards or []
            if not steps and record.text.strip():
                raise ValueError(
                    "reward.supervision is 'process' but the verifiers returned no "
                    "step_rewards; use a process verifier such as arithmetic_steps"
                )
            ends = token_indices_of_offsets(tokenizer, record.token_ids, [s.end for s in steps])
            step_rewards.append(torch.tensor([s.reward for s in steps], dtype=torch.float32))
            step_ends.append(torch.tensor(ends, dtype=torch.long))
        width = max(max(len(r.token_ids) for r, _ in valid), 1)
        advantages = process_advantages(step_rewards, step_ends, width, eps=eps)
        for row, (record, _) in enumerate(valid):
            samples.append(_sample(record, advantages[row, : len(record.token_ids)].tolist()))
    return samples


def token_indices_of_offsets(
    tokenizer, token_ids: Sequence[int], char_ends: Sequence[int]
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


def _sample(record: RolloutRecord, advantages: float | list[float]) -> TrainSample:
    return TrainSample(
        prompt_token_ids=record.prompt_token_ids,
        token_ids=record.token_ids,
        advantages=advantages,
        inference_logprobs=record.inference_logprobs,
    )
