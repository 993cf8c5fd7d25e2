"""Training samples and their packing into padded micro-batches.

The driver hands the learner one ``TrainSample`` per completion: the token ids
the engine saw and produced, the advantages (one per completion, or one per
token under process supervision) and the engine's log-probabilities. This
module owns turning a list of them into right-padded tensors whose token count
stays under the learner's micro-batch budget, and, with N learner ranks, the
plan of each rank's micro-batches: every rank runs as many as the busiest one
(an FSDP forward and backward are collectives), the missing ones being
``None`` — a placeholder micro-batch (``placeholder``) of zero weight.

Micro-batches hold samples of similar length (``split_by_tokens`` sorts them and
picks the cheapest bucketing), so little of a padded micro-batch is padding;
``MicroBatch.indices`` map each row back to its place in the full batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TrainSample:
    """One completion, ready for the loss."""

    prompt_token_ids: Sequence[int]
    token_ids: Sequence[int]
    advantages: float | Sequence[float]
    """One advantage for the completion, or one per completion token."""
    inference_logprobs: Sequence[float] | None = None
    """The engine's log-probabilities of ``token_ids`` (for truncated IS)."""

    @property
    def length(self) -> int:
        return len(self.prompt_token_ids) + len(self.token_ids)


@dataclass
class MicroBatch:
    """Right-padded tensors of a few samples; completion tensors are ``[B, C]``."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    completion_positions: torch.Tensor  # [B, C]: index into L of the logit predicting each token
    completion_ids: torch.Tensor  # [B, C]
    loss_mask: torch.Tensor  # [B, C]
    advantages: torch.Tensor  # [B, C]
    inference_logprobs: torch.Tensor  # [B, C] (0 where unknown)
    indices: list[int]  # positions of these samples in the full batch
    logits_start: int = 0
    """The first position of L whose logits predict a completion token (none before it
    do): known at collate time, so the forward pass needs no device-to-host read."""

    def to(self, device: torch.device) -> MicroBatch:
        fields = vars(self).items()
        return MicroBatch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in fields})


CPU_PASS_COST_TOKENS = 128
"""What one more forward and backward pass costs, in padded tokens. Measured with the
demo's learner step (128 samples of 35–55 tokens, budget 8192, 2 CPU threads, two
rounds of 5 steps): cost 0 → 21 micro-batches, 1.40–1.70 s a step; 64 → 4, 0.94–0.98 s;
128 → 3, 0.88–1.06 s; 256 → 2, 0.88–1.01 s; one micro-batch (no bucketing), 0.98–1.09 s.
64–256 are alike within the noise; 128 sits in the middle."""


def split_by_tokens(
    samples: Sequence[TrainSample], max_tokens: int, pass_cost: int = CPU_PASS_COST_TOKENS
) -> list[list[int]]:
    """Group sample indices, shortest first, so each group's padded size ≤ ``max_tokens``.

    The padded size of a group is ``len(group) × longest sample``; a sample
    longer than the budget gets a micro-batch of its own. Of the splits of the
    length-sorted samples into runs, the one of least cost — padded tokens plus
    ``pass_cost`` per group — is taken (dynamic programming over the run ends).
    """
    order = sorted(range(len(samples)), key=lambda i: (samples[i].length, i))
    lengths = [samples[i].length for i in order]
    cost = [0] * (len(order) + 1)  # cost[j]: the cheapest split of the first j samples
    start = [0] * (len(order) + 1)  # start[j]: where the last group of that split begins
    shorter = -1  # the last sample shorter than the current one
    for end in range(1, len(order) + 1):
        width = lengths[end - 1]
        if end > 1 and lengths[end - 2] < width:
            shorter = end - 2
        cost[end] = cost[end - 1] + width + pass_cost
        start[end] = end - 1
        for first in range(end - 2, -1, -1):
            if _not_cheapest(first, end, shorter, lengths, max_tokens, pass_cost):
                break
            candidate = cost[first] + (end - first) * width + pass_cost
            if candidate <= cost[end]:  # ties: the fewer passes
                cost[end], start[end] = candidate, first
    groups: list[list[int]] = []
    end = len(order)
    while end:
        groups.append(order[start[end] : end])
        end = start[end]
    return groups[::-1]


def _not_cheapest(
    first: int, end: int, shorter: int, lengths: list[int], max_tokens: int, pass_cost: int
) -> bool:
    """Whether the group ``first:end`` of the sorted lengths, and every group that starts
    before it, is over the budget or cheaper split after ``shorter`` (the padding
    of ``first:shorter + 1`` would cost more than the pass the split adds)."""
    width = lengths[end - 1]
    if (end - first) * width > max_tokens:
        return True
    return first <= shorter and (shorter + 1 - first) * (width - lengths[shorter]) > pass_cost


def minibatches(n_samples: int, updates: int) -> list[list[int]]:
    """``updates`` consecutive chunks of ``range(n_samples)``, the last taking the rest."""
    size = n_samples // updates if n_samples >= updates else n_samples
    chunks = [list(range(start, start + size)) for start in range(0, n_samples, size)]
    if len(chunks) > 1 and len(chunks[-1]) < size:
        chunks[-2].extend(chunks.pop())
    return chunks


def plan_micro_batches(
    samples: Sequence[TrainSample], shards: Sequence[Sequence[int]], rank: int, max_tokens: int
) -> list[list[int] | None]:
    """Rank ``rank``'s micro-batches (indices into ``samples``), padded with ``None``.

    ``shards[r]`` are the indices of rank r's samples; each shard is bucketed by
    ``split_by_tokens``, and the list is padded to the longest plan of any rank.
    With one shard of every sample this is ``split_by_tokens(samples, max_tokens)``.
    """
    plans = []
    for shard in shards:
        groups = split_by_tokens([samples[i] for i in shard], max_tokens)
        plans.append([[shard[i] for i in group] for group in groups])
    count = max(len(plan) for plan in plans)
    mine: list[list[int] | None] = list(plans[rank])
    return mine + [None] * (count - len(mine))


def collate(samples: Sequence[TrainSample], indices: list[int], pad_id: int) -> MicroBatch:
    """Pad the samples at ``indices`` into one ``MicroBatch``."""
    chosen = [samples[i] for i in indices]
    width = max(s.length for s in chosen)
    completion_width = max(max(len(s.token_ids) for s in chosen), 1)
    shape, completion_shape = (len(chosen), width), (len(chosen), completion_width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(completion_shape, dtype=torch.long)
    completion_ids = torch.full(completion_shape, pad_id, dtype=torch.long)
    loss_mask = torch.zeros(completion_shape, dtype=torch.float32)
    advantages = torch.zeros(completion_shape, dtype=torch.float32)
    inference = torch.zeros(completion_shape, dtype=torch.float32)
    for row, sample in enumerate(chosen):
        prompt, tokens = list(sample.prompt_token_ids), list(sample.token_ids)
        n_prompt, n_tokens = len(prompt), len(tokens)
        input_ids[row, : n_prompt + n_tokens] = torch.tensor(prompt + tokens, dtype=torch.long)
        attention[row, : n_prompt + n_tokens] = 1
        if not n_tokens:
            continue
        positions[row, :n_tokens] = torch.arange(n_prompt - 1, n_prompt - 1 + n_tokens)
        completion_ids[row, :n_tokens] = torch.tensor(tokens, dtype=torch.long)
        loss_mask[row, :n_tokens] = 1.0
        advantages[row, :n_tokens] = _token_advantages(sample.advantages, n_tokens)
        if sample.inference_logprobs is not None:
            inference[row, :n_tokens] = torch.tensor(list(sample.inference_logprobs))
    starts = [len(s.prompt_token_ids) - 1 for s in chosen if len(s.token_ids)]
    return MicroBatch(
        input_ids,
        attention,
        positions,
        completion_ids,
        loss_mask,
        advantages,
        inference,
        indices,
        logits_start=min(starts, default=0),
    )


def placeholder(pad_id: int) -> MicroBatch:
    """A one-token micro-batch for a rank with nothing left to run; its loss weighs 0."""
    return collate([TrainSample([pad_id], [pad_id], 0.0)], [0], pad_id)


def _token_advantages(advantages: float | Sequence[float], n_tokens: int) -> torch.Tensor:
    if isinstance(advantages, int | float):
        return torch.full((n_tokens,), float(advantages))
    values = torch.tensor(list(advantages), dtype=torch.float32)
    if values.numel() != n_tokens:
        raise ValueError(
            f"a sample has {values.numel()} per-token advantages for {n_tokens} tokens; "
            "give one per completion token or a single float"
        )
    return values
