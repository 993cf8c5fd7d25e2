"""Verifiers of the reward service and the registry that names them.

`BUILTIN_VERIFIERS` is a plain dict from name to factory; `build_registry(settings)` adds
the configured regex patterns (`regex`, `regex:<name>`), remote services and custom
functions, and fails at startup (ConfigurationError) on a name clash, an unimportable
function or a missing token variable.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable

from reward.errors import ConfigurationError
from reward.settings import RewardSettings
from reward.verifiers.arithmetic import arithmetic_steps_verifier
from reward.verifiers.base import FunctionVerifier, Verifier, VerifierInput, VerifierOutput
from reward.verifiers.custom import TrlVerifier, VerlVerifier, custom_verifier
from reward.verifiers.math_answer import MathVerifier
from reward.verifiers.remote import RemoteVerifier
from reward.verifiers.text import (
    answer_format_verifier,
    exact_verifier,
    numeric_verifier,
    regex_verifier,
)

__all__ = [
    "BUILTIN_VERIFIERS",
    "FunctionVerifier",
    "MathVerifier",
    "RemoteVerifier",
    "TrlVerifier",
    "Verifier",
    "VerifierInput",
    "VerifierOutput",
    "VerlVerifier",
    "build_registry",
]

BUILTIN_VERIFIERS: dict[str, Callable[[RewardSettings], Verifier]] = {
    "math": lambda s: MathVerifier(workers=s.workers, timeout_s=s.item_timeout_s),
    "exact": lambda s: exact_verifier(),
    "numeric": lambda s: numeric_verifier(s.numeric_rel_tol, s.numeric_abs_tol),
    "answer_format": lambda s: answer_format_verifier(),
    "arithmetic_steps": lambda s: arithmetic_steps_verifier(),
}


def build_registry(
    settings: RewardSettings, *, threads: cf.ThreadPoolExecutor | None = None
) -> dict[str, Verifier]:
    """Every verifier the settings make available, by name (nothing is started yet)."""
    registry: dict[str, Verifier] = {
        name: make(settings) for name, make in BUILTIN_VERIFIERS.items()
    }
    for name, pattern in settings.regex_patterns.items():
        registry[f"regex:{name}"] = regex_verifier(f"regex:{name}", pattern)
    if settings.regex_default in settings.regex_patterns:
        registry["regex"] = regex_verifier("regex", settings.regex_patterns[settings.regex_default])

    def add(name: str, verifier_factory: Callable[[], Verifier]) -> None:
        if name in registry:
            raise ConfigurationError(
                f"verifier name {name!r} is already taken by a built-in verifier; rename it"
            )
        registry[name] = verifier_factory()

    for name, remote in settings.remote_verifiers.items():
        add(name, lambda name=name, remote=remote: RemoteVerifier(name, remote))
    if settings.custom_verifiers:
        # The caller owns `threads` (RewardScorer shuts its pool down on close).
        pool = threads or cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="reward-custom")
        for name, config in settings.custom_verifiers.items():
            add(
                name,
                lambda name=name, config=config: custom_verifier(
                    name, config, timeout_s=settings.custom_timeout_s, threads=pool
                ),
            )
    return registry
