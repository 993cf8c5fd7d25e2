"""The job spec: one pydantic model for ``grpo train``, the REST API and the driver.

A YAML file and a JSON body are the same object. Every section forbids unknown
fields, constrains its values, and cross-field rules fail with a message that
names the field and what to change. The spec is validated once and frozen;
``--set key=value`` overrides are applied to the raw mapping before validation.
The rollout and algorithm sections are owned by ``rollout`` and ``learner``.

Every number is bounded (a spec is user input: ``train.steps: 1e30`` or ``num_gpus:
1e9`` is a 422 now, not a run that fails hours later) and finite (``Infinity`` and
``NaN`` are refused), every text field must be valid Unicode (``ValidUnicode``), and
``reward.url`` must be an http(s) URL (``services.reward_urls``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from learner.config import AlgorithmConfig, LearnerConfig, LoraConfig
from reward.protocol import CALL_KEYWORDS, ValidUnicode, VerifierRef, check_weights
from rollout.config import RolloutConfig
from services import reward_urls

_STRICT = ConfigDict(
    extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
)
MAX_STEPS = 10**7
"""Most steps (and step counts: warm-up, eval and checkpoint periods) a job may name."""
MAX_SECONDS = 86_400.0
"""Longest timeout (any ``*_s`` field): a day."""
MAX_SEED = 2**32 - 1
"""vLLM seeds numpy with the engine's seed (``seed`` + engine index): numpy takes
seeds below 2^32."""


class SpecError(ValueError):
    """A job spec that cannot run; the message names the field and the fix."""


class ModelSpec(BaseModel):
    model_config = _STRICT

    path: str = Field(min_length=1, max_length=4096)
    """A Hugging Face model directory (local, or on storage every node reaches)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on GPUs, float32 on CPU."""
    trust_remote_code: Literal[False] = False
    """Custom model code is never executed; only built-in architectures load."""
    lora: LoraConfig | None = None
    """Train a LoRA adapter on the frozen base model ({rank, alpha, dropout,
    target_modules}); the engines serve it, and only the adapter moves to them.
    null: full fine-tuning."""


MAX_METADATA_FIELDS = 64
"""Most dataset columns a job sends with every completion (each one travels with every
item of every request, and is a keyword of every TRL-style call)."""
ColumnNames = Annotated[
    tuple[Annotated[str, Field(min_length=1, max_length=256)], ...],
    Field(max_length=MAX_METADATA_FIELDS),
]
MetadataFields = Annotated[
    Annotated[Literal["all"], Tag("all")] | Annotated[ColumnNames, Tag("columns")],
    Discriminator(lambda value: "all" if isinstance(value, str) else "columns"),
]
"""``"all"`` or a list of column names; the tag makes an error name one branch only."""


class DataSpec(BaseModel):
    model_config = _STRICT

    train: str = Field(min_length=1, max_length=4096)
    """Training questions: a .jsonl or .parquet file, or a Hugging Face dataset directory."""
    eval: str | None = Field(None, min_length=1, max_length=4096)
    """Held-out questions for evaluation (same formats); null turns evaluation off."""
    prompt_field: str = Field("question", min_length=1, max_length=256)
    answer_field: str = Field("answer", min_length=1, max_length=256)
    chat_template: bool = False
    """Wrap each question as a user message and apply the tokenizer's chat template."""
    system_prompt: str | None = Field(None, max_length=100_000)
    """System message put before the question when chat_template is on."""
    metadata_fields: MetadataFields = ()
    """Dataset columns sent with every completion as the reward item's metadata (custom
    verifiers get each one as a keyword, TRL-style); "all": every column but the prompt.
    At most 64 names of 1–256 characters, none a keyword the reward service passes."""

    @field_validator("metadata_fields")
    @classmethod
    def _no_call_keywords(cls, value: tuple[str, ...] | str) -> tuple[str, ...] | str:
        clash = sorted(CALL_KEYWORDS.intersection(value)) if value != "all" else []
        if clash:
            raise ValueError(
                f"columns {clash} collide with the keywords the reward service passes to "
                "reward functions; rename them in the dataset or leave them out"
            )
        return value


class RewardSpec(BaseModel):
    model_config = _STRICT

    url: str | None = Field(None, max_length=2048)
    """A running reward service (http:// or https://); null: the driver starts one with a
    fresh token. A job submitted to the job API must name a URL it allows
    (GRPO_API_ALLOWED_REWARD_URLS)."""
    token_url: str | None = Field(None, max_length=2048)
    """The base URL the token of ``token_env`` is for: it is sent only to URLs of this
    scheme, host and port. The job API sets it to the allowlist entry that ``url``
    matched; null (``grpo train``): the token goes to ``url``."""
    token_env: str | None = Field("GRPO_REWARD_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    """Environment variable holding the bearer token of the service at ``url``."""
    verifiers: tuple[VerifierRef, ...] = Field((VerifierRef(name="math"),), max_length=64)
    supervision: Literal["outcome", "process"] = "outcome"
    """outcome: one reward per completion; process: per-step rewards (§4.1.3)."""
    eval_verifier: str = Field("math", min_length=1, max_length=200)
    """The verifier that decides eval/accuracy (reward ≥ 1 counts as correct)."""
    timeout_s: float = Field(120.0, gt=0, le=MAX_SECONDS)

    @field_validator("url", "token_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else reward_urls.check_url(value)

    @model_validator(mode="after")
    def _verifiers_present(self) -> RewardSpec:
        if not self.verifiers:
            raise ValueError("reward.verifiers is empty; name at least one verifier")
        check_weights(self.verifiers)
        return self

    @model_validator(mode="after")
    def _token_url_fits(self) -> RewardSpec:
        if self.token_url is None:
            return self
        if self.url is None or not reward_urls.may_send_token(self.url, self.token_url):
            raise ValueError(
                "reward.token_url must have the scheme, host and port of reward.url (the "
                "token is sent nowhere else); fix it, or remove it to trust reward.url"
            )
        return self


class TrainSpec(BaseModel):
    model_config = _STRICT

    steps: int = Field(200, ge=1, le=MAX_STEPS)
    questions_per_step: int = Field(16, ge=1, le=10**5)
    updates_per_step: int = Field(1, ge=1, le=10**4)
    """Mini-batch updates per step; above 1 the batch is split and clipping matters."""
    lr: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    micro_batch_tokens: int = Field(4096, ge=16, le=2**24)
    """Most tokens (prompt + completion) in one forward/backward pass of the learner."""
    gradient_checkpointing: bool = False
    mode: Literal["sync", "async"] = "sync"
    """async: generation of step k+1 overlaps training of step k. On CPU the engines then
    take half the node's cores and the learner the rest, unless rollout.threads or
    cluster.learner.threads is set."""
    max_staleness: int = Field(1, ge=0, le=1000)
    """async: rollouts sampled more than this many weight versions ago are dropped."""
    eval_every: int = Field(20, ge=0, le=MAX_STEPS)
    """Evaluate every N steps (and before the first and after the last); 0: only those two."""
    eval_size: int = Field(200, ge=1, le=10**7)
    max_unscorable_frac: float = Field(0.5, ge=0, le=1)
    """A step whose fraction of unscorable completions is above this is a failed step:
    over half the batch without a reward is a reward source that is broken, not noise."""
    max_unscorable_steps: int = Field(3, ge=0, le=MAX_STEPS)
    """The run fails after more consecutive failed steps than this (naming the reward
    source and quoting its first error); 3 rides out a reward service restarting."""


class CheckpointSpec(BaseModel):
    model_config = _STRICT

    every: int = Field(50, ge=0, le=MAX_STEPS)
    """Checkpoint every N steps (0: only at the end and on cancellation)."""
    keep_last: int = Field(2, ge=1, le=10**4)
    resume: str = Field("auto", min_length=1, max_length=4096)
    """auto: continue from the newest checkpoint in output.dir if any; never; or a path."""


class OutputSpec(BaseModel):
    model_config = _STRICT

    dir: str = Field("runs/default", min_length=1, max_length=4096)
    tensorboard: bool = False
    wandb: bool = False
    """Weights & Biases logging (set WANDB_MODE=offline to run without network)."""
    samples_per_step: int = Field(4, ge=0, le=10**4)


ResourceName = Annotated[str, Field(min_length=1, max_length=200)]
ResourceAmount = Annotated[float, Field(ge=0, le=10**6)]


class Resources(BaseModel):
    """Ray resources of one part of the system."""

    model_config = _STRICT

    num_cpus: float | None = Field(None, ge=0, le=10**4)
    num_gpus: float | None = Field(None, ge=0, le=1024)
    resources: dict[ResourceName, ResourceAmount] = Field({}, max_length=64)
    """Custom Ray resources, e.g. {"rollout_node": 1} to pin a part to nodes that have them."""
    threads: int | None = Field(None, ge=1, le=1024)
    """CPU threads: the learner's torch threads, the reward service's verifier
    processes. Engines take theirs from ``rollout.threads``."""


class LearnerResources(Resources):
    """Ray resources of the learner, per rank, and how its ranks form one group."""

    replicas: int = Field(1, ge=1, le=1024)
    """Learner ranks: N actors in one placement group, one torch.distributed group that
    shards policy, reference and optimizer state with FSDP2 (the update equals one
    rank's). On CPU each rank takes the node's cores (in async mode the half the engines
    leave) divided by N unless threads is set."""
    strategy: Literal["pack", "spread"] = "pack"
    """Placement of the ranks: pack them on as few nodes as possible, or spread them."""
    collective_timeout_s: float = Field(600.0, gt=0, le=MAX_SECONDS)
    """A collective of the learner group that waits longer than this fails the step."""
    start_timeout_s: float = Field(300.0, gt=0, le=MAX_SECONDS)
    """The ranks must be placed and started within this, or the run fails naming the
    resources missing."""


class ClusterSpec(BaseModel):
    model_config = _STRICT

    ray_address: str | None = Field(None, max_length=2048)
    """null: start a local Ray; otherwise the address of a running cluster."""
    weight_transport: Literal["auto", "object_store", "broadcast"] = "auto"
    """How new weights reach the engines: broadcast (learner rank 0 to every engine worker
    over a torch.distributed group: gloo on CPU, NCCL on GPU) or the Ray object store
    (safetensors bytes). auto: broadcast, on CPU as on GPU: in bench/weight_sync.py it was
    faster from the 2M-parameter demo model up (7.3x at 100M: 0.38 s against 2.74 s)
    and 4 ms slower only for the 0.3M tiny model."""
    learner: LearnerResources = LearnerResources()
    engines: Resources = Resources()
    reward: Resources = Resources()


class JobSpec(ValidUnicode):
    """A GRPO training job."""

    model_config = _STRICT

    name: str = Field("grpo-job", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seeds the data order, the learner and the engines (engine i gets seed + i)."""
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
    def _engine_seeds_fit(self) -> JobSpec:
        if self.seed + self.rollout.engines - 1 > MAX_SEED:
            raise ValueError(
                f"seed ({self.seed}) + rollout.engines - 1 exceeds {MAX_SEED}: engine i is "
                "seeded with seed + i, and seeds must stay below 2^32; lower seed"
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
            weight_decay=self.train.weight_decay,
            grad_clip=self.train.grad_clip,
            updates_per_step=self.train.updates_per_step,
            micro_batch_tokens=self.train.micro_batch_tokens,
            max_len=self.rollout.max_tokens,
            temperature=self.rollout.temperature,
            gradient_checkpointing=self.train.gradient_checkpointing,
            lora=self.model.lora,
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
