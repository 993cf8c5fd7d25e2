"""Configuration of the policy update: the GRPO algorithm and the optimizer.

``AlgorithmConfig`` is the job spec's ``algorithm`` section; ``LearnerConfig`` is
what a ``Learner`` needs (the algorithm plus optimizer, schedule and batching),
built by the driver from the job spec. Both are validated once and frozen.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

KlKind = Literal["k1", "k2", "k3"]
Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
AdvantageScale = Literal["group", "batch", "none"]


class AlgorithmConfig(BaseModel):
    """The GRPO objective (DeepSeekMath eq. 3) and its common variants."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    clip_low: float = Field(0.2, ge=0.0, lt=1.0, description="ε of the lower clip: ρ ≥ 1 − ε.")
    clip_high: float = Field(0.2, ge=0.0, description="ε of the upper clip: ρ ≤ 1 + ε (DAPO).")
    beta: float = Field(0.04, ge=0.0, description="Weight β of the per-token KL penalty.")
    kl: KlKind = Field("k3", description="KL estimator; k3 is the paper's.")
    agg: Aggregation = Field(
        "seq_mean_token_mean",
        description="Loss aggregation: the paper's per-sequence mean, DAPO's token "
        "mean, or Dr. GRPO's constant-length sum.",
    )
    scale: AdvantageScale = Field(
        "group", description="Advantage scaling: group std (paper), batch std, or none."
    )
    tis_cap: float | None = Field(
        None,
        gt=0.0,
        description="Cap of truncated importance sampling against the engines' "
        "log-probabilities; null turns it off.",
    )
    dynamic_sampling: bool = Field(
        False, description="Drop groups whose rewards are all equal and sample more (DAPO)."
    )


class LearnerConfig(BaseModel):
    """Everything the learner needs for one run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: AlgorithmConfig = AlgorithmConfig()
    lr: float = Field(1e-5, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    updates_per_step: int = Field(1, ge=1)
    micro_batch_tokens: int = Field(4096, ge=1)
    max_len: int = Field(1024, ge=1, description="Longest completion; Dr. GRPO's divisor.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the engines.")
    gradient_checkpointing: bool = False
