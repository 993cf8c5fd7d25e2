"""Settings of the job API, read from the environment (prefix ``GRPO_API_``).

This module owns every knob of ``grpo serve``: where it listens and how the drivers
reach it back, the admin token, the store, the Ray cluster it submits to, how many
jobs run at once, the roots that the spec's paths must stay under, the reward services
that jobs may name, the request body limit, the cancel grace period, the scheduler's
lease, and ``dry`` (validate and queue, never launch). List fields are JSON in the
environment, e.g. ``GRPO_API_ALLOWED_ROOTS='["/data"]'``. Numbers are bounded and
finite.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services import reward_urls

DAY_S = 86_400.0


class ApiSettings(BaseSettings):
    """Settings of the job API (``grpo serve``, ``create_app``)."""

    model_config = SettingsConfigDict(
        env_prefix="GRPO_API_", extra="forbid", frozen=True, allow_inf_nan=False
    )

    token: SecretStr = Field(
        min_length=16,
        description="Admin bearer token: every route but /healthz needs "
        "`Authorization: Bearer <token>`.",
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port; 0 picks a free one.")
    public_url: str | None = Field(
        default=None,
        description="The URL drivers on the cluster use to reach this API; default "
        "http://HOST:PORT (set it when the cluster runs on other machines).",
    )
    state_dir: Path = Field(
        default=Path(".grpo-api"),
        description="Where the SQLite store and each run's spec file live.",
    )
    db_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the store, e.g. postgresql+psycopg://…; default "
        "SQLite at STATE_DIR/jobs.db.",
    )
    ray_address: str = Field(
        default="http://127.0.0.1:8265",
        description="Ray's job submission (dashboard) address.",
    )
    ray_token: SecretStr | None = Field(
        default=None,
        description="Ray's auth token (`ray get-auth-token`) when the cluster uses token "
        "authentication; default: Ray's own lookup (RAY_AUTH_TOKEN, ~/.ray/auth_token).",
    )
    max_running: int = Field(default=1, ge=1, le=1024, description="Jobs handed to Ray at once.")
    allowed_roots: list[Path] = Field(
        default_factory=lambda: [Path.cwd()],
        min_length=1,
        description="Path fields of a spec must resolve under one of these; relative paths "
        "are taken relative to the first.",
    )
    allowed_reward_urls: list[str] = Field(
        default_factory=list,
        description="Reward services (http:// or https:// base URLs) that a job's reward.url "
        "may name: it must have the scheme, host and port of one of them, and the driver "
        "sends the reward token to that origin only. Default: none (jobs use reward.url: "
        "null, a reward service their driver starts).",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, le=2**30, description="Larger request bodies get 413."
    )
    cancel_grace_s: float = Field(
        default=300.0,
        ge=0,
        le=DAY_S,
        description="Seconds a cancelled driver has to checkpoint and exit before its "
        "Ray job is stopped.",
    )
    poll_interval_s: float = Field(
        default=2.0, gt=0, le=3600, description="Period of the scheduler and reconciler loop."
    )
    scheduler_lease_s: float = Field(
        default=30.0,
        gt=0,
        le=DAY_S,
        description="How long one replica's hold on the scheduler lasts unless renewed "
        "(every pass renews it); another replica of the API on the same store takes over "
        "after it lapses. At least twice poll_interval_s.",
    )
    dry: bool = Field(
        default=False,
        description="Validate and queue jobs but never launch them (for schema fuzzing).",
    )
    log_level: str = Field(default="info", description="uvicorn's log level.")

    @field_validator("allowed_reward_urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        return [reward_urls.check_url(url) for url in urls]

    @model_validator(mode="after")
    def _lease_outlasts_a_pass(self) -> ApiSettings:
        if self.scheduler_lease_s < 2 * self.poll_interval_s:
            raise ValueError(
                f"scheduler_lease_s ({self.scheduler_lease_s}) must be at least twice "
                f"poll_interval_s ({self.poll_interval_s}), or the lease lapses between passes"
            )
        return self

    @field_validator("allowed_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[Path]) -> list[Path]:
        return [root.expanduser().resolve() for root in roots]

    @property
    def base_dir(self) -> Path:
        """Relative spec paths are relative to this directory (the first allowed root)."""
        return self.allowed_roots[0]

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{self.state_dir.expanduser().resolve() / 'jobs.db'}"

    def driver_url(self, port: int | None = None) -> str:
        """Where drivers send their reports."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port if port is not None else self.port}"
