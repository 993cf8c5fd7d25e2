"""The `arithmetic_steps` verifier: per-step rewards for the project's arithmetic task.

A completion is one step per line, e.g. `23+45=68\\n68-17=51\\n\\boxed{51}`. Each
non-blank line is a step whose reward is 1.0 when it is right and 0.0 otherwise:

- `a OP b = c` (integers, OP one of + - *): right when the arithmetic is correct;
- `\\boxed{N}`: right when N equals the reference (the final answer);
- anything else: a step that does not parse, 0.0.

A step ends (exclusive character offset) at the end of its line's text, trailing
whitespace and the newline excluded. The item's reward is the outcome: 1.0 when the last
non-blank line is `\\boxed{N}` with N equal to the reference, else 0.0. An empty
completion scores 0 with no steps.
"""

from __future__ import annotations

import operator
import re

from reward.verifiers.base import FunctionVerifier, VerifierInput, VerifierOutput, boxed_content

_INT = r"[-+]?\d{1,100}"
_STEP = re.compile(rf"\s*({_INT})\s*([-+*])\s*({_INT})\s*=\s*({_INT})\s*")
_FINAL = re.compile(rf"\s*\\boxed\{{\s*({_INT})\s*\}}\s*")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def parse_reference(reference: str) -> int | None:
    text = reference.strip()
    boxed = boxed_content(text)
    text = (boxed if boxed is not None else text).strip()
    return int(text) if re.fullmatch(_INT, text) else None


def score_line(text: str, reference: int) -> tuple[float, bool, int | None]:
    """`(reward, is_final_answer, final_value)` of one line."""
    if match := _STEP.fullmatch(text):
        a, op, b, c = match.groups()
        return (1.0 if _OPS[op](int(a), int(b)) == int(c) else 0.0), False, None
    if match := _FINAL.fullmatch(text):
        value = int(match.group(1))
        return (1.0 if value == reference else 0.0), True, value
    return 0.0, False, None


def arithmetic_steps(item: VerifierInput) -> VerifierOutput:
    reference = parse_reference(item.reference or "")
    if reference is None:
        return VerifierOutput.failed(f"reference {item.reference!r} is not an integer")
    steps: list[tuple[int, float]] = []
    outcome, final_value, offset = 0.0, None, 0
    for line in item.completion.split("\n"):
        start, offset = offset, offset + len(line) + 1
        text = line.rstrip()
        if not text.strip():
            continue
        reward, is_final, value = score_line(text, reference)
        steps.append((start + len(text), reward))
        outcome = reward if is_final else 0.0
        final_value = value if is_final else None
    details = {"steps": len(steps), "final_answer": final_value}
    return VerifierOutput.ok(outcome, step_rewards=steps, details=details)


def arithmetic_steps_verifier() -> FunctionVerifier:
    return FunctionVerifier(
        "arithmetic_steps",
        arithmetic_steps,
        description="process rewards for the arithmetic task: one step per line "
        "('a+b=c' right → 1, else 0; final '\\boxed{N}' → 1 if N equals the reference); "
        "the item's reward is the final answer's",
        needs_reference=True,
        step_rewards=True,
    )
