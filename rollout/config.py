"""The job spec's ``rollout`` section: sampling parameters and engine options.

One frozen pydantic model, validated once and never mutated. The sampling
fields (``group_size``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``)
describe what a training step samples; the engine fields size and place the
vLLM engines. Defaults suit the embedded CPU setup (tiny models, 1 GiB of KV
cache per engine); on GPUs only ``gpu_memory_utilization`` matters for memory.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class RolloutConfig(BaseModel):
    """How many engines run, what they sample, and how they are supervised."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    engines: int = Field(1, ge=1, le=1024)
    """Number of vLLM engine actors in the pool."""

    group_size: int = Field(8, ge=2, le=4096)
    """G: completions sampled per question (vLLM ``n``). GRPO needs at least 2."""

    max_tokens: int = Field(64, ge=1, le=2**20)
    """Most tokens generated per completion."""

    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature for training rollouts (greedy evaluation uses
    ``SamplingSpec.greedy``). The learner must divide its logits by the same value."""

    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass. Below 1 the reported log-probabilities are those of
    the truncated, renormalised distribution (see docs/rollout.md)."""

    stop: tuple[str, ...] = Field((), max_length=64)
    """Stop strings; the completion text ends before the first one."""

    max_model_len: int | None = Field(None, ge=16, le=2**24)
    """Context length of the engine (prompt + completion); None: the model's own."""

    kv_cache_gib: int = Field(1, ge=1, le=4096)
    """KV cache per engine on the CPU backend, in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE).
    Ignored on GPUs, where ``gpu_memory_utilization`` sizes the cache."""

    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)
    """Fraction of GPU memory vLLM may take; None: 0.85 on a GPU, 0.05 on CPU
    (where it only bounds a start-up memory check)."""

    threads: int | None = Field(None, ge=1, le=1024)
    """CPU threads per engine (OpenMP); None: the node's cores (in async mode, half of
    them) divided among the engines. Ignored on GPUs."""

    bind_threads: bool = True
    """On CPU, pin each engine's threads to its own cores
    (VLLM_CPU_OMP_THREADS_BIND); False leaves placement to the OS."""

    enforce_eager: bool = False
    """Run the model without torch.compile: engines start about 20 s faster on
    CPU, at some cost in generation speed."""

    call_timeout_s: float = Field(600.0, gt=0.0, le=86_400.0)
    """Longest any single call to an engine (generate, weight load) may take
    before the engine is declared hung, killed and replaced."""

    start_timeout_s: float = Field(900.0, gt=0.0, le=86_400.0)
    """Longest an engine may take to start (imports, model load, warm-up)."""

    max_retries: int = Field(2, ge=0, le=100)
    """How many times a failed engine is replaced within one pool call before
    the call gives up with an error."""

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in stop):
            raise ValueError("rollout.stop must not contain an empty string; remove it")
        return stop

    @model_validator(mode="after")
    def _room_for_completion(self) -> RolloutConfig:
        if self.max_model_len is not None and self.max_tokens >= self.max_model_len:
            raise ValueError(
                f"rollout.max_tokens ({self.max_tokens}) leaves no room for the prompt in "
                f"rollout.max_model_len ({self.max_model_len}); raise max_model_len or "
                "lower max_tokens"
            )
        return self
