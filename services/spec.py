"""The job spec: one pydantic model for ``grpo train``, the REST API and the driver.

A YAML file and a JSON body are the same object. Every section forbids unknown
fields, constrains its values, and cross-field rules fail with a message that
names the field and what to change. The spec is validated once and frozen;
``--set key=value`` overrides are applied to the raw mapping before validation.
The rollout and algorithm sections are owned by ``rollout`` and ``learner``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from learner.config import AlgorithmConfig, LearnerConfig
from reward.protocol import VerifierRef
from rollout.config import RolloutConfig

_STRICT = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SpecError(ValueError):
    """A job spec that cannot run; the message names the field and the fix."""


class ModelSpec(BaseModel):
    model_config = _STRICT

    path: str
    """A Hugging Face model directory (local, or on storage every node reaches)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on GPUs, float32 on CPU."""
    trust_remote_code: Literal[False] = False
    """Custom model code is never executed; only built-in architectures load."""


class DataSpec(BaseModel):
    model_config = _STRICT

    train: str
    """Training questions: a .jsonl or .parquet file, or a Hugging Face dataset directory."""
    eval: str | None = None
    """Held-out questions for evaluation (same formats); null turns evaluation off."""
    prompt_field: str = "question"
    answer_field: str = "answer"
    chat_template: bool = False
    """Wrap each question as a user message and apply the tokenizer's chat template."""
    system_prompt: str | None = None
    """System message put before the question when chat_template is on."""


class RewardSpec(BaseModel):
    model_config = _STRICT

    url: str | None = None
    """A running reward service; null: the driver starts one with a fresh token."""
    token_env: str | None = "GRPO_REWARD_TOKEN"
    """Environment variable holding the bearer token of the service at ``url``."""
    verifiers: tuple[VerifierRef, ...] = (VerifierRef(name="math"),)
    supervision: Literal["outcome", "process"] = "outcome"
    """outcome: one reward per completion; process: per-step rewards (§4.1.3)."""
    eval_verifier: str = "math"
    """The verifier that decides eval/accuracy (reward ≥ 1 counts as correct)."""
    timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _verifiers_present(self) -> RewardSpec:
        if not self.verifiers:
            raise ValueError("reward.verifiers is empty; name at least one verifier")
        return self


class TrainSpec(BaseModel):
    model_config = _STRICT

    steps: int = Field(200, ge=1)
    questions_per_step: int = Field(16, ge=1)
    updates_per_step: int = Field(1, ge=1)
    """Mini-batch updates per step; above 1 the batch is split and clipping matters."""
    lr: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    micro_batch_tokens: int = Field(4096, ge=16)
    """Most tokens (prompt + completion) in one forward/backward pass of the learner."""
    gradient_checkpointing: bool = False
    mode: Literal["sync", "async"] = "sync"
    """async: generation of step k+1 overlaps training of step k."""
    max_staleness: int = Field(1, ge=0)
    """async: rollouts sampled more than this many weight versions ago are dropped."""
    eval_every: int = Field(20, ge=0)
    """Evaluate every N steps (and before the first and after the last); 0: only those two."""
    eval_size: int = Field(200, ge=1)


class CheckpointSpec(BaseModel):
    model_config = _STRICT

    every: int = Field(50, ge=0)
    """Checkpoint every N steps (0: only at the end and on cancellation)."""
    keep_last: int = Field(2, ge=1)
    resume: str = "auto"
    """auto: continue from the newest checkpoint in output.dir if any; never; or a path."""


class OutputSpec(BaseModel):
    model_config = _STRICT

    dir: str = "runs/default"
    tensorboard: bool = False
    wandb: bool = False
    """Weights & Biases logging (set WANDB_MODE=offline to run without network)."""
    samples_per_step: int = Field(4, ge=0)


class Resources(BaseModel):
    """Ray resources of one part of the system."""

    model_config = _STRICT

    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    resources: dict[str, float] = {}
    """Custom Ray resources, e.g. {"rollout_node": 1} to pin a part to nodes that have them."""
    threads: int | None = Field(None, ge=1)
    """CPU threads: the learner's torch threads, the reward service's verifier
    processes. Engines take theirs from ``rollout.threads``."""


class ClusterSpec(BaseModel):
    model_config = _STRICT

    ray_address: str | None = None
    """null: start a local Ray; otherwise the address of a running cluster."""
    learner: Resources = Resources()
    engines: Resources = Resources()
    reward: Resources = Resources()


class JobSpec(BaseModel):
    """A GRPO training job."""

    model_config = _STRICT

    name: str = Field("grpo-job", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = 0
    model: ModelSpec
    data: DataSpec
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardSpec = RewardSpec()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: TrainSpec = TrainSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    output: OutputSpec = OutputSpec()
    cluster: ClusterSpec = ClusterSpec()

    @model_validator(mode="after")
    def _batch_divides(self) -> JobSpec:
        completions = self.train.questions_per_step * self.rollout.group_size
        if completions % self.train.updates_per_step:
            raise ValueError(
                f"train.updates_per_step ({self.train.updates_per_step}) must divide the "
                f"batch of {completions} completions (train.questions_per_step × "
                "rollout.group_size); change one of them"
            )
        return self

    @model_validator(mode="after")
    def _warmup_fits(self) -> JobSpec:
        if self.train.warmup_steps > self.train.steps:
            raise ValueError(
                f"train.warmup_steps ({self.train.warmup_steps}) exceeds train.steps "
                f"({self.train.steps}); lower warmup_steps"
            )
        return self

    @model_validator(mode="after")
    def _eval_needs_data(self) -> JobSpec:
        if self.train.eval_every and self.data.eval is None:
            raise ValueError(
                "train.eval_every is set but data.eval is null; give data.eval or set "
                "train.eval_every to 0"
            )
        return self

    @model_validator(mode="after")
    def _engine_threads_in_rollout(self) -> JobSpec:
        if self.cluster.engines.threads is not None:
            raise ValueError(
                "cluster.engines.threads is not used: set rollout.threads (threads per engine)"
            )
        return self

    @model_validator(mode="after")
    def _dynamic_sampling_is_sync(self) -> JobSpec:
        if self.algorithm.dynamic_sampling and self.train.mode == "async":
            raise ValueError(
                "algorithm.dynamic_sampling refills groups within a step, which needs "
                "train.mode: sync; set one of them differently"
            )
        return self

    def learner_config(self) -> LearnerConfig:
        """The learner's view of this spec."""
        return LearnerConfig(
            algorithm=self.algorithm,
            lr=self.train.lr,
            warmup_steps=self.train.warmup_steps,
            total_steps=self.train.steps,
            weight_decay=self.train.weight_decay,
            grad_clip=self.train.grad_clip,
            updates_per_step=self.train.updates_per_step,
            micro_batch_tokens=self.train.micro_batch_tokens,
            max_len=self.rollout.max_tokens,
            temperature=self.rollout.temperature,
            gradient_checkpointing=self.train.gradient_checkpointing,
        )


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-5"`` → ``(["train", "lr"], 3e-05)``; the value is read as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {assignment!r}: write it as key.path=value, e.g. train.lr=3e-5")
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """A copy of the raw spec mapping with every ``key.path=value`` applied."""
    merged = copy.deepcopy(raw)
    for assignment in assignments:
        path, value = parse_override(assignment)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {assignment!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def validate_spec(raw: dict[str, Any]) -> JobSpec:
    """Validate a raw mapping; errors become one SpecError listing every field at fault."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(format_validation_error(error)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML (or JSON) job spec, apply ``--set`` overrides, and validate it."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise SpecError(f"cannot read job spec {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"job spec {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"job spec {path} must be a mapping of sections, got {type(raw).__name__}")
    return validate_spec(apply_overrides(raw, overrides or []))


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: ``field.path: message``."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {message}" if field else message)
    return "invalid job spec:\n  " + "\n  ".join(lines)
