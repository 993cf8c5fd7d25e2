"""How the learner combines the metrics of its micro-batches, and of its ranks.

The policy loss is a sum (each micro-batch's loss is already divided by the
global normalizer); every other loss metric is a mean weighted by the number
of completion tokens. Over N ranks the sums and the token counts are summed
first, so every rank reports the metrics of the whole batch.
"""

from __future__ import annotations

import torch

from learner.distributed import all_reduce_floats

SUMMED_METRICS = ("loss/policy",)
TOKEN_WEIGHTED_METRICS = (
    "train/inference_logprob_abs_diff",
    "loss/kl",
    "loss/clip_frac_low",
    "loss/clip_frac_high",
    "loss/ratio_mean",
)


class MetricTotals:
    """Combines micro-batch metrics: the policy loss sums, the rest weigh by tokens."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.tokens = 0.0

    def add(self, metrics: dict[str, float], tokens: float) -> None:
        for key in SUMMED_METRICS:
            self.sums[key] = self.sums.get(key, 0.0) + metrics.get(key, 0.0)
        for key in TOKEN_WEIGHTED_METRICS:
            self.sums[key] = self.sums.get(key, 0.0) + metrics.get(key, 0.0) * tokens
        self.tokens += tokens

    def sum_over_ranks(self, device: torch.device) -> None:
        """Replace this rank's totals by those of all ranks (collective)."""
        keys = (*SUMMED_METRICS, *TOKEN_WEIGHTED_METRICS)
        values = all_reduce_floats([self.sums.get(k, 0.0) for k in keys] + [self.tokens], device)
        self.sums = dict(zip(keys, values[:-1], strict=True))
        self.tokens = values[-1]

    def result(self) -> dict[str, float]:
        weight = max(self.tokens, 1.0)
        out = {key: self.sums.get(key, 0.0) for key in SUMMED_METRICS}
        out.update({key: self.sums.get(key, 0.0) / weight for key in TOKEN_WEIGHTED_METRICS})
        return out
