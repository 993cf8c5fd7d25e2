"""The reward function of the TRL comparison: one plain function both systems call.

It has TRL's reward-function signature, which is also the reward service's custom
verifier signature (docs/reward-protocol.md): ``grpo train`` loads it through
``GRPO_REWARD_CUSTOM_VERIFIERS``, TRL's ``GRPOTrainer`` takes it in ``reward_funcs``.
It imports nothing but the standard library, so it runs in TRL's virtual environment too.
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_answer(prompts, completions, **kwargs):
    """1.0 when the last \\boxed{...} of the completion equals the reference, else 0.0."""
    rewards = []
    for completion, reference in zip(completions, kwargs["reference"], strict=True):
        if reference is None:
            rewards.append(None)
            continue
        found = _BOXED.findall(completion)
        answer = found[-1].strip() if found else None
        rewards.append(1.0 if answer is not None and answer == str(reference).strip() else 0.0)
    return rewards
