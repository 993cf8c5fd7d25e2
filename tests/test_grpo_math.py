"""KL estimators, the learner helpers of learner.grpo, and its import boundary.

Expected values are derived with python floats (`math`), never by running the
code under test.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.grpo import kl_estimate, masked_mean, truncated_is_weights

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- KL estimators

LP = [-1.0, -2.0, -0.5]
REF = [-1.5, -1.0, -0.5]
# d = ref - lp = [-0.5, 1.0, 0.0]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("k1", [0.5, -1.0, 0.0]),  # lp - ref
        ("k2", [0.125, 0.5, 0.0]),  # (lp - ref)² / 2
        # exp(d) - d - 1: e^-0.5 + 0.5 - 1 = 0.106531, e^1 - 2 = 0.718282, 0
        ("k3", [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]),
    ],
)
def test_kl_values(kind, expected):
    lp, ref = torch.tensor(LP, dtype=torch.float64), torch.tensor(REF, dtype=torch.float64)
    out = kl_estimate(lp, ref, kind)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_kl_default_is_k3():
    lp, ref = torch.tensor(LP), torch.tensor(REF)
    assert kl_estimate(lp, ref)[0].item() == pytest.approx(0.106531, abs=1e-6)
    assert kl_estimate(lp, ref)[1].item() == pytest.approx(0.718282, abs=1e-6)


logprob = st.floats(-30.0, 0.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(lp=st.lists(logprob, min_size=1, max_size=16), ref=st.lists(logprob, min_size=16))
def test_k3_is_non_negative(lp, ref):
    for dtype in (torch.float32, torch.float64):
        a = torch.tensor(lp, dtype=dtype)
        b = torch.tensor(ref[: len(lp)], dtype=dtype)
        assert (kl_estimate(a, b, "k3") >= 0).all()
        assert (kl_estimate(a, a, "k3") == 0).all()


@settings(max_examples=50, deadline=None)
@given(values=st.lists(logprob, min_size=1, max_size=16))
def test_k3_gradient_vanishes_at_the_reference(values):
    # d/dlp [exp(ref - lp) - (ref - lp) - 1] = -exp(ref - lp) + 1 = 0 at lp = ref.
    lp = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    kl_estimate(lp, lp.detach().clone(), "k3").sum().backward()
    assert (lp.grad == 0).all()


def test_k3_gradient_away_from_the_reference():
    # d/dlp k3 = 1 - exp(ref - lp): at d = ref - lp = 1.0, 1 - e = -1.718282.
    lp = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    kl_estimate(lp, torch.tensor([-1.0], dtype=torch.float64)).sum().backward()
    assert lp.grad.item() == pytest.approx(1 - math.e, abs=1e-9)


def test_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        kl_estimate(torch.zeros(3), torch.zeros(3), "k4")
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        kl_estimate(torch.zeros(3), torch.zeros(2))


# ---------------------------------------------------------------- helpers for the learner


def test_truncated_is_weights():
    old = torch.tensor([[-1.0, -1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    inference = torch.tensor([[-1.5, -0.5, -2.0]], dtype=torch.float64)
    # exp(0.5) = 1.648721 -> capped at 1.5; exp(-0.5) = 0.606531; exp(0) = 1.
    weights = truncated_is_weights(old, inference, cap=1.5)
    expected = torch.tensor([[1.5, math.exp(-0.5), 1.0]], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(old, inference, cap=0.0)
    with pytest.raises(ValueError, match="inference_logprobs has shape"):
        truncated_is_weights(old, inference[:, :2], cap=2.0)


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------- import boundary


def test_import_does_not_pull_in_the_service_stack():
    code = (
        "import sys, learner.grpo\n"
        "heavy = [m for m in ('ray', 'vllm', 'fastapi') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
