"""The reward service against hostile input (issue 17): the string verifiers run in
linear time on 64 KB completions built to be slow, references that give no answer are
errors (never ok/0), and text that is not Unicode or weights that overflow are 422 (or
an item error), never a 500."""

from __future__ import annotations

import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reward_testkit import running_service

from reward import RewardSettings
from reward.protocol import VerifierRef
from reward.scorer import combine
from reward.settings import THINK_ANSWER_PATTERN
from reward.verifiers import VerifierInput, VerifierOutput
from reward.verifiers.arithmetic import arithmetic_steps_verifier
from reward.verifiers.base import last_boxed
from reward.verifiers.math_answer import check_math
from reward.verifiers.text import (
    answer_format_verifier,
    exact_verifier,
    numeric_verifier,
    regex_verifier,
)

SIZE = 64 * 1024
BUDGET_S = 0.5


def of_size(unit: str, head: str = "", tail: str = "") -> str:
    """``head`` + ``unit`` repeated + ``tail``, 64 KB in all."""
    repeats = (SIZE - len(head) - len(tail)) // len(unit)
    return head + unit * repeats + tail


HOSTILE = {
    "open boxes": of_size("\\boxed{"),
    "one box, open braces": of_size("{", head="\\boxed{"),
    "open braces": of_size("{"),
    "close braces": of_size("}"),
    "boxes in boxes": of_size("\\boxed{\\boxed{", tail="}"),
    "box then braces": of_size("{", head="\\boxed{1}"),
    "think tags": of_size("</think><answer>", head="<think>"),
    "think answers": of_size("<think></think><answer></answer>", tail="x"),
    "digits": of_size("1"),
    "digit groups": of_size("1,"),
    "signs": of_size("-", tail="1"),
    "spaces": of_size(" ", tail="x"),
    "decimals": of_size(".1"),
    "exponents": of_size("1e"),
    "fractions": of_size("\\frac{1}{"),
    "steps": of_size("1+1=2\n"),
    "spaced step": of_size(" ", head="1", tail="+"),
    "lines": of_size("\n"),
}
VERIFIERS = {
    "exact": exact_verifier(),
    "numeric": numeric_verifier(1e-6, 1e-12),
    "regex": regex_verifier("regex", THINK_ANSWER_PATTERN),
    "answer_format": answer_format_verifier(),
    "arithmetic_steps": arithmetic_steps_verifier(),
}


@pytest.mark.parametrize("name", VERIFIERS)
@pytest.mark.parametrize("kind", HOSTILE)
def test_a_64kb_hostile_completion_scores_in_linear_time(name, kind):
    item = VerifierInput(id="x", prompt="Q", completion=HOSTILE[kind], reference="42")
    started = time.perf_counter()
    (output,) = VERIFIERS[name].score_batch([item], job_id=None, step=None)
    elapsed = time.perf_counter() - started
    assert output.status == "ok", output.error
    assert elapsed < BUDGET_S, f"{name} took {elapsed:.2f} s on {kind!r}"


def quadratic_last_boxed(text: str) -> tuple[int, int] | None:
    """The old search (rfind, then a forward scan from each candidate): the oracle."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth = 0
        for pos in range(start + len("\\boxed"), len(text)):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            if text[pos] == "}" and depth == 0:
                return start, pos + 1
        start = text.rfind("\\boxed{", 0, start)
    return None


@given(st.lists(st.sampled_from(["\\boxed{", "\\boxed", "{", "}", "x", "1", "\\"]), max_size=30))
def test_the_linear_scan_finds_the_box_the_old_search_found(parts):
    text = "".join(parts)
    assert last_boxed(text) == quadratic_last_boxed(text)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("exact", ""),
        ("exact", "   "),
        ("exact", "\\boxed{3"),
        ("exact", "\\boxed{}"),
        ("numeric", "???"),
        ("numeric", "\\frac{"),
        ("arithmetic_steps", "???"),
    ],
)
def test_references_that_give_no_answer_are_errors(name, reference):
    item = VerifierInput(id="x", prompt="Q", completion="", reference=reference)
    (output,) = VERIFIERS[name].score_batch([item], job_id=None, step=None)
    assert output.status == "error" and output.reward is None, output


@pytest.mark.parametrize("reference", ["\\frac{", "???", "\\sqrt{", "{"])
def test_math_references_that_do_not_parse_are_errors(reference):
    with pytest.raises(ValueError, match="does not parse"):
        check_math(reference, "the answer is \\boxed{3}")
    assert check_math("\\text{Monday}", "\\boxed{\\text{Monday}}")[0] == 1.0


def test_format_patterns_run_on_re2_with_dot_matching_newlines():
    verifier = regex_verifier("regex", THINK_ANSWER_PATTERN)
    good = VerifierInput(id="x", prompt="Q", completion="<think>a\nb</think>\n<answer>1</answer>")
    bad = VerifierInput(id="y", prompt="Q", completion="<answer>1</answer>")
    assert [o.reward for o in verifier.score_batch([good, bad], job_id=None, step=None)] == [1, 0]
    with pytest.raises(ValueError, match="RE2"):
        RewardSettings(regex_patterns={"twice": r"(\w+) \1"})


def test_rewards_whose_weighted_sum_overflows_are_an_item_error():
    refs = [VerifierRef(name="a", weight=1e300), VerifierRef(name="b", weight=1e300)]
    outputs = {"a": VerifierOutput.ok(1e10), "b": VerifierOutput.ok(1.0)}
    result = combine("x", refs, outputs)
    assert result.status == "error" and result.reward is None and "overflows" in result.error


@pytest.fixture(scope="module")
def http():
    with (
        running_service(default_verifiers=["exact"]) as url,
        httpx.Client(base_url=url, headers={"Content-Type": "application/json"}) as client,
    ):
        yield client


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b'{"items": [{"id": "\\ud800", "prompt": "Q", "completion": "1"}]}', "items.0.id"),
        (b'{"items": [{"id": "a", "prompt": "Q", "completion": "\\udfff"}]}', "completion"),
        (b'{"items": [], "job_id": "j\\ud800"}', "job_id"),
        (b'{"items": [{"id": "a", "prompt": "Q", "completion": "1", '
         b'"metadata": {"k": ["\\ud800"]}}]}', "metadata.k.0"),
        (b'{"query": ["\\ud800"], "prompts": [""]}', "query.0"),
    ],
)  # fmt: skip
def test_lone_surrogates_are_422_naming_where(http, raw, where):
    path = "/get_reward" if b"query" in raw else "/v1/score"
    answer = http.post(path, content=raw)
    assert answer.status_code == 422, answer.text
    assert where in answer.json()["detail"] and "surrogate" in answer.json()["detail"]


def test_weights_whose_sum_overflows_are_422(http):
    verifiers = [{"name": "exact", "weight": 1e308}, {"name": "exact", "weight": 1e308}]
    item = {"id": "a", "prompt": "Q", "completion": "1", "reference": "1", "verifiers": verifiers}
    answer = http.post("/v1/score", json={"items": [item]})
    assert answer.status_code == 422 and "weights sum" in answer.text
