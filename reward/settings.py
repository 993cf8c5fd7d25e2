"""Settings of the reward service, read from the environment (prefix `GRPO_REWARD_`).

This module owns every knob of the service: where it listens, its bearer token (without
one it listens on loopback addresses only), request limits, the math worker pool, and
the configured verifiers (remote services, custom in-process functions and their
calling convention, regex patterns). Complex fields are JSON in the environment, e.g.
`GRPO_REWARD_REMOTE_HOSTS='["rm.internal"]'`. Validation here rejects settings that
cannot work, with messages that say what to change; checks that need imports or the
environment (custom functions, token variables) happen when the app is built.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reward.patterns import compile_linear

THINK_ANSWER_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
DAY_S = 86_400.0
"""Longest timeout or delay of any setting."""


def _default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cpus or 1))


class RemoteVerifierSettings(BaseModel):
    """A user's scoring service that a `remote` verifier calls over HTTP."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    url: str = Field(
        description="Endpoint URL; with no path, `/v1/score` (format v1) or `/get_reward` "
        "(format openrlhf) is appended."
    )
    format: Literal["v1", "openrlhf"] = Field(
        default="v1", description="Protocol the service speaks."
    )
    token_env: str | None = Field(
        default=None,
        description="Name of an environment variable holding a bearer token for the service.",
    )
    timeout_s: float = Field(
        default=30.0, gt=0, le=DAY_S, description="Timeout of one HTTP attempt."
    )
    retries: int = Field(
        default=2, ge=0, le=10, description="Extra attempts on 408, 429, 5xx and connection errors."
    )
    backoff_s: float = Field(
        default=0.25, ge=0, le=DAY_S, description="First retry delay; doubles with each retry."
    )
    max_batch: int = Field(default=256, ge=1, le=10**5, description="Most items sent in one call.")
    description: str = Field(default="", description="Shown by GET /v1/verifiers.")
    needs_reference: bool = Field(
        default=False, description="Items without a reference fail instead of being sent."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {value!r} must be an absolute http:// or https:// URL")
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def endpoint(self) -> str:
        parts = urlsplit(self.url)
        if parts.path not in ("", "/"):
            return self.url
        path = "/v1/score" if self.format == "v1" else "/get_reward"
        return f"{parts.scheme}://{parts.netloc}{path}"


class CustomVerifierSettings(BaseModel):
    """A user's function, called in the service's process in the calling convention of
    TRL's `GRPOTrainer` (style `trl`, a batch per call) or of verl's `compute_score`
    (style `verl`, an item per call). See docs/reward-protocol.md."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    path: str = Field(description='Import path "pkg.mod:fn" of the function.')
    style: Literal["trl", "verl"] = Field(
        default="trl", description="Calling convention: TRL's reward functions or verl's."
    )
    conversational: bool = Field(
        default=False,
        description="Style trl only: pass prompts and completions as one-message chat lists "
        '(`[{"role": "assistant", "content": ...}]`), as TRL does for chat datasets.',
    )
    data_source: str | None = Field(
        default=None,
        description="Style verl only: `data_source` for items whose metadata has none.",
    )

    @field_validator("path")
    @classmethod
    def _import_path(cls, value: str) -> str:
        module, _, attr = value.partition(":")
        if not module or not attr:
            raise ValueError(f"{value!r} is not an import path 'pkg.mod:fn'")
        return value

    @model_validator(mode="after")
    def _options_fit_style(self) -> CustomVerifierSettings:
        if self.style == "verl" and self.conversational:
            raise ValueError("conversational applies to style 'trl' only; remove it or use 'trl'")
        if self.style == "trl" and self.data_source is not None:
            raise ValueError("data_source applies to style 'verl' only; remove it or use 'verl'")
        return self


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RewardSettings(BaseSettings):
    """Settings of `grpo reward serve`, the driver's embedded service and `create_app`."""

    model_config = SettingsConfigDict(
        env_prefix="GRPO_REWARD_", extra="forbid", frozen=True, allow_inf_nan=False
    )

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port; 0 picks a free one.")
    token: SecretStr | None = Field(
        default=None,
        description="When set, every route but /healthz needs `Authorization: Bearer <token>`; "
        "without it the service binds loopback addresses only.",
    )
    path_token: SecretStr | None = Field(
        default=None,
        description="A second secret for clients that cannot send headers (OpenRLHF): "
        "`POST /openrlhf/<path_token>/get_reward` needs no Authorization header. It opens "
        "that route only.",
    )
    max_request_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        le=2**31,
        description="Larger bodies get 413. 16 MiB holds a full batch of the driver's client "
        "(256 items) at 64 KB per item, a 16K-token completion with its prompt, and keeps "
        "what one request makes the service parse and hold (several times the body's "
        "bytes) in tens of MiB; raise it for longer completions.",
    )
    max_items: int = Field(
        default=4096, ge=1, le=10**6, description="More items per request get 413."
    )
    workers: int = Field(
        default_factory=_default_workers,
        ge=1,
        le=1024,
        description="Processes checking math answers.",
    )
    item_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=DAY_S,
        description="Per-item deadline of local verifiers → status timeout.",
    )
    custom_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=DAY_S,
        description="Deadline of one call of a custom verifier function.",
    )
    remote_hosts: list[str] = Field(
        default_factory=list, description="Hosts remote verifiers may call (exact hostnames)."
    )
    remote_verifiers: dict[str, RemoteVerifierSettings] = Field(
        default_factory=dict, description="Remote verifiers by name."
    )
    custom_verifiers: dict[str, CustomVerifierSettings] = Field(
        default_factory=dict,
        description='In-process functions by name: an import path "pkg.mod:fn" (style trl) '
        'or `{"path", "style": "trl" | "verl", "conversational", "data_source"}`.',
    )
    regex_patterns: dict[str, str] = Field(
        default_factory=lambda: {"think_answer": THINK_ANSWER_PATTERN},
        description="Format patterns by name; each is the verifier `regex:<name>`.",
    )
    regex_default: str = Field(
        default="think_answer", description="The pattern the plain `regex` verifier uses."
    )
    default_verifiers: list[str] = Field(
        default_factory=lambda: ["math"],
        min_length=1,
        description="Verifiers (weight 1 each) for items that name none.",
    )
    numeric_rel_tol: float = Field(default=1e-6, ge=0, description="Relative tolerance of numeric.")
    numeric_abs_tol: float = Field(
        default=1e-12, ge=0, description="Absolute tolerance of numeric."
    )
    cache_size: int = Field(
        default=16384,
        ge=0,
        le=10**7,
        description="Results kept by (job_id, step, id); 0 disables.",
    )
    log_level: str = Field(default="info", description="uvicorn's log level.")

    @field_validator("regex_patterns")
    @classmethod
    def _patterns_compile(cls, value: dict[str, str]) -> dict[str, str]:
        for name, pattern in value.items():
            try:
                compile_linear(pattern)
            except ValueError as exc:
                raise ValueError(f"regex pattern {name!r}: {exc}") from None
        return value

    @field_validator("path_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("path_token must be at least 16 characters (it is a password)")
        return value

    @field_validator("custom_verifiers", mode="before")
    @classmethod
    def _paths_are_trl_style(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        return {name: {"path": v} if isinstance(v, str) else v for name, v in value.items()}

    @model_validator(mode="after")
    def _tokenless_on_loopback_only(self) -> RewardSettings:
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address and no token is set: anyone "
                "who reaches it could use the service; set GRPO_REWARD_TOKEN (and "
                "GRPO_REWARD_PATH_TOKEN for OpenRLHF's client), or listen on 127.0.0.1"
            )
        return self

    @model_validator(mode="after")
    def _remote_hosts_allowed(self) -> RewardSettings:
        allowed = set(self.remote_hosts)
        for name, remote in self.remote_verifiers.items():
            if remote.host not in allowed:
                raise ValueError(
                    f"remote verifier {name!r} calls host {remote.host!r}, which is not in "
                    f"remote_hosts {sorted(allowed)}; add it to GRPO_REWARD_REMOTE_HOSTS"
                )
        clash = set(self.remote_verifiers) & set(self.custom_verifiers)
        if clash:
            raise ValueError(
                f"verifier names {sorted(clash)} are both remote and custom; rename one"
            )
        return self
