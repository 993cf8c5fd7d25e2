"""The learner: GRPO math (``learner.grpo``) and the policy-update class ``Learner``.

Public names are imported lazily (PEP 562): the job spec imports ``learner.config``
for the ``algorithm`` and ``model.lora`` sections, and that must not load torch (the
job API and the CLI's validation stay light). This package never imports ``rollout``, ``reward`` or
``services``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AlgorithmConfig": "learner.config",
    "DistContext": "learner.distributed",
    "LearnerConfig": "learner.config",
    "LoraConfig": "learner.config",
    "Learner": "learner.learner",
    "TrainSample": "learner.batching",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'learner' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:
    from learner.batching import TrainSample as TrainSample
    from learner.config import AlgorithmConfig as AlgorithmConfig
    from learner.config import LearnerConfig as LearnerConfig
    from learner.config import LoraConfig as LoraConfig
    from learner.distributed import DistContext as DistContext
    from learner.learner import Learner as Learner
