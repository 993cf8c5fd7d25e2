"""The GRPO objective of one micro-batch, as the learner configures it.

``learner.grpo`` holds the math; this module maps a ``LearnerConfig`` onto it:
the loss arguments, truncated importance sampling against the engines'
log-probabilities, the train/inference mismatch metric, and the normalizer —
the full mini-batch's count (sequences, or tokens for ``token_mean``), so that
micro-batch losses, on any number of ranks, sum to the mini-batch's loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from learner.batching import MicroBatch, TrainSample
from learner.config import LearnerConfig
from learner.grpo import grpo_loss, masked_mean, truncated_is_weights


def micro_batch_loss(
    config: LearnerConfig,
    batch: MicroBatch,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    normalizer: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of ``batch`` (to backpropagate) and its metrics."""
    algorithm = config.algorithm
    is_weights = None
    if algorithm.tis_cap is not None:
        is_weights = truncated_is_weights(old_logprobs, batch.inference_logprobs, algorithm.tis_cap)
    loss, metrics = grpo_loss(
        logprobs,
        old_logprobs,
        ref_logprobs,
        batch.advantages,
        batch.loss_mask,
        clip_low=algorithm.clip_low,
        clip_high=algorithm.clip_high,
        beta=algorithm.beta,
        kl=algorithm.kl,
        agg=algorithm.agg,
        max_len=config.max_len,
        is_weights=is_weights,
        normalizer=normalizer,
    )
    mismatch = (old_logprobs.detach() - batch.inference_logprobs).abs()
    metrics["train/inference_logprob_abs_diff"] = float(masked_mean(mismatch, batch.loss_mask))
    return loss, metrics


def normalizer(config: LearnerConfig, samples: Sequence[TrainSample]) -> float:
    """The full mini-batch's count, so that micro-batch losses sum to its loss."""
    if config.algorithm.agg == "token_mean":
        return float(max(sum(len(s.token_ids) for s in samples), 1))
    return float(max(sum(1 for s in samples if len(s.token_ids)), 1))


def stack_rows(rows: list[torch.Tensor], batch: MicroBatch) -> torch.Tensor:
    """Per-sample 1-D tensors as ``[B, C]``, zero-padded like ``batch.loss_mask``."""
    out = torch.zeros_like(batch.loss_mask)
    for row, values in enumerate(rows):
        out[row, : values.numel()] = values.to(out.device)
    return out
