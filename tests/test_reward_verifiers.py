"""Verifiers, the deadline pool and the scorer as plain Python (no HTTP)."""

from __future__ import annotations

import time

import pytest
import reward_pool_tasks
from pydantic import ValidationError

from reward import Result, RewardSettings, ScoreRequest
from reward.protocol import Item, VerifierRef
from reward.scorer import RewardScorer, combine
from reward.verifiers import VerifierInput, VerifierOutput
from reward.verifiers.arithmetic import arithmetic_steps
from reward.verifiers.base import boxed_content, last_boxed
from reward.verifiers.pool import DeadlinePool
from reward.verifiers.text import final_number, to_number


def steps_of(completion: str, reference: str = "51") -> VerifierOutput:
    return arithmetic_steps(
        VerifierInput(
            id="x", prompt="Q: 23+45-17\nA:\n", completion=completion, reference=reference
        )
    )


ARITHMETIC_CASES = [
    # (completion, reference, reward, [(end, step reward), ...])
    ("23+45=68\n68-17=51\n\\boxed{51}", "51", 1.0, [(8, 1.0), (17, 1.0), (28, 1.0)]),
    ("23+45=67\n67-17=50\n\\boxed{50}", "51", 0.0, [(8, 0.0), (17, 1.0), (28, 0.0)]),
    ("23+45=68\n68-17=51\n\\boxed{50}", "51", 0.0, [(8, 1.0), (17, 1.0), (28, 0.0)]),
    ("23+45=68\nso then\n\\boxed{51}", "51", 1.0, [(8, 1.0), (16, 0.0), (27, 1.0)]),
    ("3-10=-7\n-7*-2=14\n\\boxed{14}", "14", 1.0, [(7, 1.0), (16, 1.0), (27, 1.0)]),
    ("5 * 6 = 30  \n\\boxed{ 30 }\n", "\\boxed{30}", 1.0, [(10, 1.0), (25, 1.0)]),
    ("\\boxed{51}\n23+45=68", "51", 0.0, [(10, 1.0), (19, 1.0)]),
    ("2+2=4\n\n\\boxed{4}\n\n", "4", 1.0, [(5, 1.0), (16, 1.0)]),
    ("68/4=17\n\\boxed{17}", "17", 1.0, [(7, 0.0), (18, 1.0)]),
    ("", "51", 0.0, []),
    ("\n  \n", "51", 0.0, []),
]


@pytest.mark.parametrize(("completion", "reference", "reward", "steps"), ARITHMETIC_CASES)
def test_arithmetic_steps(completion, reference, reward, steps):
    output = steps_of(completion, reference)
    assert output.status == "ok"
    assert output.reward == reward
    assert output.step_rewards == steps
    for end, _ in steps:
        assert not completion[end - 1].isspace() and (
            end == len(completion) or completion[end] in " \n"
        )


def test_arithmetic_reference_must_be_an_integer():
    output = steps_of("\\boxed{1}", "one")
    assert output.status == "error" and "not an integer" in output.error


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("a \\boxed{1} b \\boxed{\\frac{1}{2}} c", "\\frac{1}{2}"),
        ("\\boxed{{x}}", "{x}"),
        ("\\boxed{1} \\boxed{2", "1"),
        ("no box", None),
    ],
)
def test_boxed_content(text, content):
    assert boxed_content(text) == content


def test_last_boxed_span():
    text = "so \\boxed{12}"
    assert last_boxed(text) == (3, len(text))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234.5", 1234.5),
        ("-3", -3.0),
        ("1/4", 0.25),
        ("\\frac{3}{4}", 0.75),
        ("-\\frac{1}{2}", -0.5),
        ("$2$", 2.0),
        ("2e3", 2000.0),
        ("1/0", None),
        ("abc", None),
    ],
)
def test_to_number(text, value):
    assert to_number(text) == value


def test_final_number_ignores_subtraction_signs():
    assert final_number("68-17=51 so it is 51") == 51.0
    assert final_number("68-17") == 17.0
    assert final_number("result: -4") == -4.0


def test_result_never_carries_a_reward_when_failed():
    with pytest.raises(ValidationError, match="must not carry a reward"):
        Result(id="a", status="error", reward=0.0)
    with pytest.raises(ValidationError, match="finite reward"):
        Result(id="a", status="ok", reward=None)


def test_combine_merges_step_rewards_by_offset():
    refs = [VerifierRef(name="a", weight=1.0), VerifierRef(name="b", weight=0.5)]
    outputs = {
        "a": VerifierOutput.ok(1.0, step_rewards=[(3, 1.0), (7, 0.0)]),
        "b": VerifierOutput.ok(1.0, step_rewards=[(7, 1.0)]),
    }
    result = combine("x", refs, outputs)
    assert result.reward == 1.5
    assert [(s.end, s.reward) for s in result.step_rewards] == [(3, 1.0), (7, 0.5)]


def test_combine_fails_if_any_verifier_failed():
    refs = [VerifierRef(name="a"), VerifierRef(name="b"), VerifierRef(name="c")]
    outputs = {
        "a": VerifierOutput.ok(1.0),
        "b": VerifierOutput.timed_out("slow"),
        "c": VerifierOutput.failed("bad"),
    }
    result = combine("x", refs, outputs)
    assert result.status == "error" and result.reward is None
    assert result.error == "b: slow; c: bad"
    only_timeout = combine("x", refs[:2], outputs)
    assert only_timeout.status == "timeout"


def test_scorer_without_http_is_deterministic():
    settings = RewardSettings(workers=1, cache_size=0, default_verifiers=["exact"])
    with RewardScorer(settings) as scorer:
        request = ScoreRequest(
            items=[Item(id="a", prompt="p", completion="\\boxed{7}", reference="7")],
            job_id="j",
            step=1,
        )
        first, second = scorer.score(request), scorer.score(request)
    assert first == second and first.results[0].reward == 1.0


def test_pool_deadline_inside_worker():
    pool = DeadlinePool(workers=1, timeout_s=0.3)
    try:
        outcomes = pool.map(reward_pool_tasks.sleep_then_return, [(5.0,), (0.0,)])
        assert [o.status for o in outcomes] == ["timeout", "ok"]
        assert pool.restarts == 0
    finally:
        pool.close()


def test_pool_restarts_when_a_worker_ignores_the_deadline():
    pool = DeadlinePool(workers=1, timeout_s=0.2)
    try:
        started = time.monotonic()
        outcomes = pool.map(reward_pool_tasks.sleep_ignoring_alarm, [(30.0,), (0.0,), (0.0,)])
        assert [o.status for o in outcomes] == ["timeout", "ok", "ok"]
        assert pool.restarts == 1
        assert time.monotonic() - started < 10
        assert [o.status for o in pool.map(reward_pool_tasks.sleep_then_return, [(0.0,)])] == ["ok"]
    finally:
        pool.close()
