"""The `math` verifier: answer equivalence with math-verify, in a pool of worker processes.

`check_math(reference, completion)` parses both with math-verify (`\\boxed{}`, LaTeX,
fractions, plain final answers) and calls `verify(gold, answer)`; it runs in a worker's
main thread under the pool's deadline (`reward.verifiers.pool`), with math-verify's own
signal timeout disabled because that one reports a timeout as a wrong answer. Text with
no parsable answer is a wrong answer (reward 0), not an error; a reference that does not
parse is an error, since no completion could ever match it. math-verify answers text it
cannot read (`???`, `\\frac{`) with the text itself and no expression: such a reference
does not parse either.

math-verify (and sympy) are imported where they run: in the workers, preloaded once by
the fork server. The service process itself never imports them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any, Literal

from reward.verifiers.base import VerifierInput, VerifierOutput, missing_reference
from reward.verifiers.pool import DeadlinePool

_DETAIL_CHARS = 120

# math-verify warns once per process that its timeout is off; ours replaces it.
logging.getLogger("math_verify").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str) -> tuple:
    """The reference as math-verify targets. A bare reference is read as the content of a
    `\\boxed{}`, i.e. as one LaTeX expression: `2^{1/2}` is sqrt(2), not its last number."""
    from math_verify import parse

    if "$" in reference or "\\boxed" in reference:
        return tuple(parse(reference, parsing_timeout=None))
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    return tuple(gold or parse(reference, parsing_timeout=None))


def _shown(parsed: Sequence[Any]) -> str | None:
    if not parsed:
        return None
    text = str(parsed[-1])
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "…"


def check_math(reference: str, completion: str) -> tuple[float, dict[str, Any]]:
    """`(1.0 or 0.0, details)`: whether the completion's final answer equals the reference."""
    from math_verify import parse, verify

    gold = _parse_reference(reference)
    if all(isinstance(target, str) for target in gold):
        raise ValueError(f"reference {reference[:_DETAIL_CHARS]!r} does not parse as math")
    answer = parse(completion, parsing_timeout=None)
    correct = bool(answer) and verify(list(gold), answer, timeout_seconds=None)
    return (1.0 if correct else 0.0), {"answer": _shown(answer)}


def warm_worker() -> None:
    """Worker initializer: pay math-verify's first-call costs before the first request."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    check_math("\\frac{1}{2}", "so the answer is \\boxed{0.5}")


class MathVerifier:
    """Answer equivalence with math-verify; needs `reference`."""

    name = "math"
    kind: Literal["builtin"] = "builtin"
    description = (
        "1 if the completion's final answer (\\boxed{} first, else the last expression) is "
        "mathematically equal to the reference (math-verify: fractions, decimals, LaTeX), else 0"
    )
    needs_reference = True
    step_rewards = False

    def __init__(self, workers: int, timeout_s: float):
        self.pool = DeadlinePool(
            workers, timeout_s, initializer=warm_worker, preload=["math_verify", __name__]
        )

    def start(self) -> None:
        self.pool.start()

    def close(self) -> None:
        self.pool.close()

    def score_batch(
        self, inputs: Sequence[VerifierInput], *, job_id: str | None, step: int | None
    ) -> list[VerifierOutput]:
        outputs: list[VerifierOutput] = [missing_reference(self.name)] * len(inputs)
        positions = [i for i, item in enumerate(inputs) if item.reference is not None]
        tasks = [(inputs[i].reference, inputs[i].completion) for i in positions]
        for position, outcome in zip(positions, self.pool.map(check_math, tasks), strict=True):
            if outcome.status == "ok":
                reward, details = outcome.value
                outputs[position] = VerifierOutput.ok(reward, details=details)
            elif outcome.status == "timeout":
                outputs[position] = VerifierOutput.timed_out(outcome.error or "timeout")
            else:
                outputs[position] = VerifierOutput.failed(outcome.error or "error")
        return outputs
