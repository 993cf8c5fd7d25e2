"""Cheap string verifiers that run in the service process: `exact`, `numeric`, `regex`
and `answer_format`.

Each is a pure per-item function wrapped in a `FunctionVerifier`. Each runs in time
linear in the completion's length (one right-to-left scan for the last `\\boxed{}`,
regular expressions without nested or adjacent unbounded repeats, and RE2 for the
configured format patterns), so they need no worker process or deadline. A reference
that gives no answer to compare with (empty, or an unbalanced `\\boxed{`) is an error.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from reward.patterns import compile_linear
from reward.verifiers.base import (
    FunctionVerifier,
    VerifierInput,
    VerifierOutput,
    boxed_content,
    last_boxed,
)

_NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
    r"|(?<![\w.])[-+]?\.\d+(?:[eE][-+]?\d+)?"
)
_FRACTION = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")
_LATEX_FRACTION = re.compile(r"([-+]?)\\d?frac\{\s*([-+]?\d+)\s*\}\{\s*(\d+)\s*\}")


def reference_answer(reference: str | None) -> str:
    """The answer a reference gives: its last `\\boxed{}` content if it has one, else the
    stripped text. ValueError (the item's error) when that is empty or the box unbalanced."""
    text = (reference or "").strip()
    content = boxed_content(text)
    if content is None and "\\boxed{" in text:
        raise ValueError(f"reference {text[:80]!r} has an unbalanced \\boxed{{; fix the data")
    answer = (text if content is None else content).strip()
    if not answer:
        raise ValueError("the reference is empty; give the answer to compare with")
    return answer


def exact(item: VerifierInput) -> VerifierOutput:
    """1 if the stripped completion, or its last `\\boxed{}` content, equals the reference."""
    reference = reference_answer(item.reference)
    completion = item.completion.strip()
    boxed = boxed_content(completion)
    if completion == reference or completion == (item.reference or "").strip():
        return VerifierOutput.ok(1.0, details={"matched": "completion"})
    if boxed is not None and boxed.strip() == reference:
        return VerifierOutput.ok(1.0, details={"matched": "boxed"})
    return VerifierOutput.ok(0.0, details={"matched": None})


def to_number(text: str) -> float | None:
    """The number written in `text` (`-1,234.5`, `3e-2`, `1/2`, `\\frac{1}{2}`), or None."""
    cleaned = text.strip().strip("$").strip().rstrip(".").replace(" ", "")
    if match := _LATEX_FRACTION.fullmatch(cleaned):
        sign, numerator, denominator = match.groups()
        value = _fraction(numerator, denominator)
        return None if value is None else (-value if sign == "-" else value)
    if match := _FRACTION.fullmatch(cleaned):
        return _fraction(*match.groups())
    if _NUMBER.fullmatch(cleaned):
        return float(cleaned.replace(",", ""))
    return None


def _fraction(numerator: str, denominator: str) -> float | None:
    if int(denominator) == 0:
        return None
    return float(Fraction(int(numerator), int(denominator)))


def final_number(completion: str) -> float | None:
    """The completion's final number: the last `\\boxed{}` if it holds one, else the last
    number in the text."""
    boxed = boxed_content(completion)
    if boxed is not None:
        value = to_number(boxed)
        if value is not None:
            return value
        completion = boxed
    numbers = _NUMBER.findall(completion)
    return float(numbers[-1].replace(",", "")) if numbers else None


def make_numeric(rel_tol: float, abs_tol: float):
    def numeric(item: VerifierInput) -> VerifierOutput:
        reference = to_number(reference_answer(item.reference))
        if reference is None:
            return VerifierOutput.failed(f"reference {item.reference!r} is not a number")
        value = final_number(item.completion)
        hit = value is not None and math.isclose(value, reference, rel_tol=rel_tol, abs_tol=abs_tol)
        return VerifierOutput.ok(1.0 if hit else 0.0, details={"answer": value})

    return numeric


def make_regex(pattern: str):
    compiled = compile_linear(pattern)

    def regex(item: VerifierInput) -> VerifierOutput:
        return VerifierOutput.ok(1.0 if compiled.search(item.completion) else 0.0)

    return regex


def answer_format(item: VerifierInput) -> VerifierOutput:
    """1 if the completion ends (trailing whitespace aside) with a balanced `\\boxed{...}`."""
    text = item.completion.rstrip()
    span = last_boxed(text)
    return VerifierOutput.ok(1.0 if span is not None and span[1] == len(text) else 0.0)


def exact_verifier() -> FunctionVerifier:
    return FunctionVerifier(
        "exact",
        exact,
        description="1 if the stripped completion, or its last \\boxed{} content, equals the "
        "stripped reference (or its \\boxed{} content), else 0",
        needs_reference=True,
    )


def numeric_verifier(rel_tol: float, abs_tol: float) -> FunctionVerifier:
    return FunctionVerifier(
        "numeric",
        make_numeric(rel_tol, abs_tol),
        description=f"1 if the final number (last \\boxed{{}}, else last number) is within "
        f"rel_tol={rel_tol:g} / abs_tol={abs_tol:g} of the reference, else 0",
        needs_reference=True,
    )


def regex_verifier(name: str, pattern: str) -> FunctionVerifier:
    return FunctionVerifier(
        name,
        make_regex(pattern),
        description=f"format reward: 1 if the completion matches {pattern!r} "
        "(RE2 search, dot matches newline), else 0",
        needs_reference=False,
    )


def answer_format_verifier() -> FunctionVerifier:
    return FunctionVerifier(
        "answer_format",
        answer_format,
        description="1 if the completion ends with a final answer \\boxed{...} "
        "(trailing whitespace ignored), else 0",
        needs_reference=False,
    )
