"""What goes into the rollout pool and what comes out (plain data, no vLLM).

- :class:`GroupRequest`: one question; the pool samples a group of G completions for it.
- :class:`SamplingSpec`: the sampling parameters of one call.
- :class:`RolloutRecord`: one completion, the record of DESIGN.md's contract.

Everything here pickles cheaply: these objects cross Ray actor boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollout.config import RolloutConfig


@dataclass(frozen=True)
class GroupRequest:
    """One question. ``prompt`` is raw text (tokenized as is) or chat messages
    (``[{"role": ..., "content": ...}]``, rendered with the tokenizer's chat
    template and a generation prompt). ``seed`` makes the group reproducible:
    completion i is sampled with seed ``seed + i`` whatever the batch."""

    group_id: str
    prompt: str | list[dict[str, Any]]
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str | list):
            raise TypeError(
                f"GroupRequest {self.group_id!r}: prompt must be a str or a list of chat "
                f"messages, got {type(self.prompt).__name__}"
            )


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters of one generate call.

    ``temperature == 0`` means greedy decoding; log-probabilities are then those of
    the model's unscaled distribution. ``ignore_eos`` keeps generating past the
    end-of-sequence token (benchmarks use it to make every completion
    ``max_tokens`` long)."""

    n: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingSpec.n must be at least 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingSpec.max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(
                f"SamplingSpec.temperature must be >= 0 (0 is greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def from_config(cls, config: RolloutConfig) -> SamplingSpec:
        """The training sampling parameters of a rollout config (G samples per question)."""
        return cls(
            n=config.group_size,
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            stop=tuple(config.stop),
        )

    @classmethod
    def greedy(cls, max_tokens: int, stop: tuple[str, ...] | list[str] = ()) -> SamplingSpec:
        """One greedy completion per question (evaluation)."""
        return cls(n=1, max_tokens=max_tokens, temperature=0.0, top_p=1.0, stop=tuple(stop))


@dataclass
class RolloutRecord:
    """One completion.

    ``token_ids`` are the generated tokens (the end-of-sequence token included when
    the model emitted it; the tokens that produced a stop string included too).
    ``inference_logprobs[t]`` is the engine's log-probability of ``token_ids[t]``
    under the distribution it sampled from (see docs/rollout.md). ``text`` is the
    detokenized completion without special tokens and without the stop string.
    ``finish_reason`` is ``"stop"`` (EOS or a stop string) or ``"length"``.
    ``weights_version`` is the version of the weights that produced it."""

    group_id: str
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    inference_logprobs: list[float]
    text: str
    finish_reason: str
    weights_version: int

    @property
    def truncated(self) -> bool:
        """True when the completion hit ``max_tokens``."""
        return self.finish_reason == "length"
