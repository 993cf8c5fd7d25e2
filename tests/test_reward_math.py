"""The built-in verifiers through a running reward service (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import time

import httpx
import pytest
from reward_testkit import item, running_service

from reward import RewardClient


@pytest.fixture(scope="module")
def url():
    # cache_size=0: determinism below must not come from the result cache.
    with running_service(workers=2, item_timeout_s=2.0, cache_size=0) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    with RewardClient(url, max_batch=64) as c:
        yield c


MATH_CASES = [
    # (completion, reference, expected reward)
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("The answer is \\boxed{0.5}", "1/2", 1.0),
    ("so the answer is 1/2", "\\frac{1}{2}", 1.0),
    ("\\boxed{2/4}", "$\\frac{1}{2}$", 1.0),
    ("We get $\\frac{3}{6}$.", "0.5", 1.0),
    ("\\boxed{\\sqrt{2}}", "2^{1/2}", 1.0),
    ("\\boxed{3.0}", "3", 1.0),
    ("\\boxed{1+x}", "x+1", 1.0),
    ("23+45=68\n68-17=51\n\\boxed{51}", "51", 1.0),
    ("Final answer: 42", "42", 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("\\boxed{x-1}", "x+1", 0.0),
    ("I have no idea, sorry!", "42", 0.0),
    ("}}}{{{\\frac{ \\boxed{ $$ \\\\", "7", 0.0),
    ("", "7", 0.0),
]


@pytest.mark.parametrize(("completion", "reference", "expected"), MATH_CASES)
def test_math_answers(client, completion, reference, expected):
    [result] = client.score([item("x", completion, reference)])
    assert result.status == "ok", result.error
    assert result.reward == expected


def test_math_batch_keeps_order(client):
    items = [item(f"i{n}", c, r) for n, (c, r, _) in enumerate(MATH_CASES)]
    results = client.score(items)
    assert [r.id for r in results] == [i["id"] for i in items]
    assert [r.reward for r in results] == [expected for _, _, expected in MATH_CASES]


def test_unparsable_reference_is_an_error_not_zero(client):
    [result] = client.score([item("x", "\\boxed{1}", "}{")])
    assert result.status == "error"
    assert result.reward is None
    assert "reference" in result.error


def test_missing_reference_is_an_error(client):
    [result] = client.score([item("x", "\\boxed{1}")])
    assert result.status == "error" and result.reward is None
    assert "needs the item's 'reference'" in result.error


def test_runaway_answer_times_out_and_pool_recovers(client, url):
    started = time.monotonic()
    results = client.score(
        [item("slow", "\\boxed{9^{9^{9^{9}}}}", "3"), item("fine", "\\boxed{3}", "3")]
    )
    assert results[0].status == "timeout" and results[0].reward is None
    assert results[1].status == "ok" and results[1].reward == 1.0
    assert time.monotonic() - started < 10
    [after] = client.score([item("after", "\\boxed{\\frac{2}{3}}", "4/6")])
    assert after.status == "ok" and after.reward == 1.0
    assert httpx.get(f"{url}/healthz", timeout=2).status_code == 200


def test_same_item_twice_gives_same_result(client):
    items = [item(f"d{n}", c, r) for n, (c, r, _) in enumerate(MATH_CASES[:6])]
    items.append(
        item("steps", "1+2=3\n3*3=8\n\\boxed{9}", "9", verifiers=[{"name": "arithmetic_steps"}])
    )
    first = client.score(items, job_id="job", step=3)
    second = client.score(items, job_id="job", step=3)
    assert [r.model_dump() for r in first] == [r.model_dump() for r in second]


def test_weighted_sum_of_verifiers(client):
    completion = "<think>easy</think> <answer>\\boxed{4}</answer>"
    verifiers = [{"name": "math", "weight": 1.0}, {"name": "regex", "weight": 0.25}]
    [both] = client.score([item("a", completion, "4", verifiers=verifiers)])
    assert both.status == "ok" and both.reward == pytest.approx(1.25)
    assert both.details["math"]["reward"] == 1.0 and both.details["regex"]["reward"] == 1.0
    [format_only] = client.score([item("b", "\\boxed{4}", "4", verifiers=verifiers)])
    assert format_only.reward == pytest.approx(1.0)


def test_any_failed_verifier_fails_the_item(client):
    verifiers = [{"name": "answer_format"}, {"name": "exact"}]
    [result] = client.score([item("a", "\\boxed{4}", None, verifiers=verifiers)])
    assert result.status == "error" and result.reward is None
    assert result.error.startswith("exact:")


@pytest.mark.parametrize(
    ("name", "completion", "reference", "expected"),
    [
        ("exact", "  Paris ", "Paris", 1.0),
        ("exact", "It is \\boxed{Paris}", "Paris", 1.0),
        ("exact", "It is \\boxed{Paris}", "\\boxed{Paris}", 1.0),
        ("exact", "paris", "Paris", 0.0),
        ("numeric", "so 1,000.5 apples", "1000.5", 1.0),
        ("numeric", "\\boxed{1/3}", "0.3333333333", 1.0),
        ("numeric", "x = 3.1", "3.14", 0.0),
        ("numeric", "no numbers", "3", 0.0),
        ("answer_format", "work...\n\\boxed{12}  \n", None, 1.0),
        ("answer_format", "\\boxed{12} and more", None, 0.0),
        ("answer_format", "\\boxed{12", None, 0.0),
        ("regex", "<think>hmm</think>\n<answer>4</answer>", None, 1.0),
        ("regex:think_answer", "<answer>4</answer>", None, 0.0),
        ("arithmetic_steps", "2+2=4\n\\boxed{4}", "4", 1.0),
    ],
)
def test_builtin_verifiers(client, name, completion, reference, expected):
    [result] = client.score([item("x", completion, reference, verifiers=[{"name": name}])])
    assert result.status == "ok", result.error
    assert result.reward == expected


def test_numeric_reference_must_be_a_number(client):
    [result] = client.score([item("x", "3", "three", verifiers=[{"name": "numeric"}])])
    assert result.status == "error" and "not a number" in result.error


def test_arithmetic_steps_over_http(client):
    completion = "23+45=68\n68-17=50\n\\boxed{50}"
    [result] = client.score([item("a", completion, "51", verifiers=[{"name": "arithmetic_steps"}])])
    assert result.status == "ok" and result.reward == 0.0
    assert [(s.end, s.reward) for s in result.step_rewards] == [(8, 1.0), (17, 0.0), (28, 0.0)]
    assert completion[: result.step_rewards[1].end].endswith("68-17=50")


def test_verifiers_listing(client):
    listing = client.verifiers()
    by_name = {v.name: v for v in listing.verifiers}
    assert listing.default == ["math"]
    assert {"math", "exact", "numeric", "regex", "answer_format", "arithmetic_steps"} <= set(
        by_name
    )
    assert by_name["math"].needs_reference and not by_name["regex"].needs_reference
    assert by_name["arithmetic_steps"].step_rewards


def test_metrics_count_items_per_verifier(client, url):
    client.score([item("m", "\\boxed{1}", "1")])
    text = httpx.get(f"{url}/metrics").text
    assert 'reward_items_total{status="ok",verifier="math"}' in text
    assert 'reward_verifier_errors_total{verifier="math"}' in text
    assert 'reward_requests_total{code="200",route="/v1/score"}' in text
    assert "reward_request_duration_seconds_bucket" in text
