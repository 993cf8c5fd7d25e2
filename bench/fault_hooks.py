"""What the fault suite (``bench/faults.py``) plants inside the system under test.

``scoring_signal`` is a custom verifier (TRL style, ``GRPO_REWARD_CUSTOM_VERIFIERS``)
that the suite's runs list beside ``math`` with weight 0, so every reward is exactly
math's. It lets the suite kill the reward service's actor *while it scores*: when the
file ``arm`` exists in the directory named by ``GRPO_REWARD_FAULT_SIGNAL_DIR`` (the
driver hands only ``GRPO_REWARD_*`` variables to the reward actor), the call removes
it, writes its process id to ``scoring`` and waits, so the suite knows whom to kill
and that a scoring call is in flight. Unarmed it returns at once. Standard library
only: it runs in the reward service's process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SIGNAL_DIR_ENV = "GRPO_REWARD_FAULT_SIGNAL_DIR"
ARMED_WAIT_S = 60.0
"""How long an armed call holds the batch (the suite kills the process long before)."""


def scoring_signal(prompts, completions, **kwargs):
    """0.0 for every completion; when armed, first say "scoring now" and wait."""
    directory = os.environ.get(SIGNAL_DIR_ENV)
    if directory:
        arm = Path(directory) / "arm"
        try:
            arm.unlink()
        except FileNotFoundError:
            pass
        else:
            ready = Path(directory) / ".scoring"
            ready.write_text(str(os.getpid()))
            ready.replace(Path(directory) / "scoring")
            time.sleep(ARMED_WAIT_S)
    return [0.0] * len(completions)
