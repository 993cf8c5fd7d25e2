"""Configuration of the policy update: the GRPO algorithm, LoRA and the optimizer.

``AlgorithmConfig`` is the job spec's ``algorithm`` section and ``LoraConfig`` its
``model.lora``; ``LearnerConfig`` is what a ``Learner`` needs (the algorithm, LoRA,
optimizer, schedule and batching), built by the driver from the job spec. All are
validated once and frozen.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

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


ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")]


def _not_empty(names: tuple[str, ...]) -> tuple[str, ...]:
    # Not min_length: on a tuple it also fails when only an item is wrong.
    if not names:
        raise ValueError("name at least one module, or write all-linear")
    return names


ModuleNames = Annotated[
    tuple[ModuleName, ...],
    Field(max_length=256, json_schema_extra={"minItems": 1}),
    AfterValidator(_not_empty),
]
TargetModules = Annotated[
    Annotated[Literal["all-linear"], Tag("all-linear")] | Annotated[ModuleNames, Tag("list")],
    Discriminator(lambda value: "all-linear" if isinstance(value, str) else "list"),
]


class LoraConfig(BaseModel):
    """Train a LoRA adapter instead of every weight (``learner.lora``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rank: int = Field(ge=1, le=512, description="r: the rank of every adapter matrix.")
    alpha: float | None = Field(
        None,
        gt=0.0,
        le=65536.0,
        validate_default=True,
        description="α: the adapter's update is scaled by α / rank; null: 2 × rank.",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input while training."
    )
    target_modules: TargetModules = Field(
        "all-linear",
        description="Names of the decoder layers' linear modules to adapt (e.g. q_proj), "
        "or all-linear: every linear module of the decoder layers (never lm_head).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: object) -> object:
        if isinstance(value, str) and value != "all-linear":
            raise ValueError(
                f"{value!r} is neither 'all-linear' nor a list: write [{value}] for one module"
            )
        return value

    @field_validator("alpha")
    @classmethod
    def _alpha_defaults_to_twice_the_rank(cls, alpha: float | None, info: ValidationInfo):
        if alpha is None and "rank" in info.data:
            return 2.0 * info.data["rank"]
        return alpha


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
    lora: LoraConfig | None = Field(None, description="null: full fine-tuning.")
