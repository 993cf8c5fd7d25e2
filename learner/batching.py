"""Training samples and their packing into padded micro-batches.

The driver hands the learner one ``TrainSample`` per completion: the token ids
the engine saw and produced, the advantages (one per completion, or one per
token under process supervision) and the engine's log-probabilities. This
module owns turning a list of them into right-padded tensors whose token count
stays under the learner's micro-batch budget.
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

    def to(self, device: torch.device) -> MicroBatch:
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return MicroBatch(**moved, indices=self.indices)


def split_by_tokens(samples: Sequence[TrainSample], max_tokens: int) -> list[list[int]]:
    """Group sample indices, in order, so each group's padded size ≤ ``max_tokens``.

    The padded size of a group is ``len(group) × longest sample``; a sample
    longer than the budget gets a micro-batch of its own.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index, sample in enumerate(samples):
        candidate = max(longest, sample.length)
        if current and candidate * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, candidate = [], sample.length
        current.append(index)
        longest = candidate
    if current:
        groups.append(current)
    return groups


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
    return MicroBatch(
        input_ids, attention, positions, completion_ids, loss_mask, advantages, inference, indices
    )


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
