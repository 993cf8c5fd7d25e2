"""Format patterns in linear time: the regular expressions of the `regex` verifiers.

A configured pattern (GRPO_REWARD_REGEX_PATTERNS) is matched against completions that a
model wrote, so a backtracking engine could spend time quadratic (or worse) in their
length on a single item: Python's `re` takes over a second for the default
`think_answer` pattern on 50 KB of repeated tags. Patterns are compiled with RE2
instead, whose matching time is linear in the text's length whatever the pattern. RE2
has no backreferences or lookaround; a pattern that uses them fails at startup, with
the reason. `.` matches newlines too (like `re.DOTALL`).
"""

from __future__ import annotations

from typing import Any

import re2


def compile_linear(pattern: str) -> Any:
    """`pattern` compiled by RE2 (dot matches newline); ValueError says why it cannot be."""
    options = re2.Options()
    options.dot_nl = True
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as error:
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise ValueError(
            f"pattern {pattern!r} does not compile for RE2 ({reason}); format patterns run "
            "in linear time, without backreferences or lookaround"
        ) from None
