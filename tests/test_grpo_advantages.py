"""Outcome and process advantages (learner.grpo), against hand-computed values.

Expected values are derived in the tests with python floats and the `statistics`
module (whose `stdev` uses Bessel's correction, like torch.std), never by running
the code under test.
"""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.grpo import outcome_advantages, process_advantages

NAN = float("nan")
EPS = 1e-6


def normalized(values: list[float], eps: float = EPS) -> list[float]:
    """(v - mean) / (stdev + eps), the paper's group normalization, by hand."""
    mean, std = statistics.mean(values), statistics.stdev(values)
    return [(v - mean) / (std + eps) for v in values]


def assert_close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    expected_t = torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected_t, atol=atol, rtol=0)


# ---------------------------------------------------------------- outcome


def test_outcome_normal_groups_are_normalized_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.8, 0.5, 0.5]], dtype=torch.float64)
    # Group 0: mean 0.5, deviations ±0.5, var = 4·0.25/3 = 1/3, std = 0.577350.
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    # Group 1: mean 0.5, deviations -0.3, 0.3, 0, 0, var = 0.18/3 = 0.06, std = 0.244949.
    b = 0.3 / (math.sqrt(0.06) + EPS)
    assert a == pytest.approx(0.866024, abs=1e-6)
    assert b == pytest.approx(1.224740, abs=1e-6)
    expected = [[a, -a, -a, a], [-b, b, 0.0, 0.0]]
    assert_close(outcome_advantages(rewards), expected)
    assert_close(outcome_advantages(rewards), [normalized(row) for row in rewards.tolist()])


def test_outcome_float32_matches_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert_close(outcome_advantages(rewards), [[a, -a, -a, a]])


def test_outcome_unscorable_completion_is_left_out_and_gets_zero():
    rewards = torch.tensor([[1.0, NAN, 0.0, 0.5]], dtype=torch.float64)
    # Valid 1, 0, 0.5: mean 0.5, deviations 0.5, -0.5, 0; var = 0.5/2 = 0.25, std = 0.5.
    a = 0.5 / (0.5 + EPS)
    assert_close(outcome_advantages(rewards), [[a, 0.0, -a, 0.0]])


def test_outcome_zero_variance_group_gets_zero():
    # 0.7 is not exact in binary: a computed mean of 0.7s can differ from 0.7 by
    # rounding, which must not turn into a non-zero advantage.
    rewards = torch.tensor([[0.7, 0.7, 0.7], [1.0, NAN, 1.0], [0.1, 0.1, 0.1]])
    assert_close(outcome_advantages(rewards), [[0.0] * 3] * 3, atol=0)
    for scale in ("batch", "none"):
        assert_close(outcome_advantages(rewards, scale=scale), [[0.0] * 3] * 3, atol=0)


def test_outcome_group_of_two():
    rewards = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # mean 0.5, std = sqrt((0.25 + 0.25) / 1) = 0.707107; 0.5 / 0.707107 = 0.707106.
    a = 0.5 / (math.sqrt(0.5) + EPS)
    assert a == pytest.approx(0.707106, abs=1e-6)
    assert_close(outcome_advantages(rewards), [[a, -a]])


def test_outcome_fewer_than_two_valid_entries_gives_zero():
    rewards = torch.tensor([[NAN, 3.0, NAN], [NAN, NAN, NAN], [1.0, 0.0, NAN]])
    a = 0.5 / (math.sqrt(0.5) + EPS)  # the third group is a normal group of two
    expected = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [a, -a, 0.0]]
    assert_close(outcome_advantages(rewards), expected)
    out = outcome_advantages(rewards, scale="batch")
    assert not out.isnan().any()
    assert_close(out[:2], expected[:2], atol=0)


def test_outcome_scale_none_is_mean_centering_only():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, NAN, 0.5, 1.0]], dtype=torch.float64)
    # Group 1 valid: 2, 0.5, 1 -> mean 3.5/3 = 1.166667.
    m = 3.5 / 3
    expected = [[0.5, -0.5, -0.5, 0.5], [2.0 - m, 0.0, 0.5 - m, 1.0 - m]]
    assert_close(outcome_advantages(rewards, scale="none"), expected)


def test_outcome_scale_batch_divides_by_std_of_all_valid_rewards():
    rewards = torch.tensor(
        [[1.0, 0.0, 0.0, 1.0], [0.2, 0.8, 0.5, NAN], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64
    )
    valid = [1.0, 0.0, 0.0, 1.0, 0.2, 0.8, 0.5, 3.0, 3.0, 3.0, 3.0]
    # 11 values, sum 15.5, mean 1.409091; stdev (Bessel) of those values:
    batch_std = statistics.stdev(valid)
    mean_sq = sum((v - 15.5 / 11) ** 2 for v in valid) / 10
    assert batch_std == pytest.approx(math.sqrt(mean_sq))
    s = batch_std + EPS
    # Group means: 0.5; (0.2 + 0.8 + 0.5)/3 = 0.5; group 2 has zero variance -> 0.
    expected = [
        [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s],
        [-0.3 / s, 0.3 / s, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    assert_close(outcome_advantages(rewards, scale="batch"), expected)


def test_outcome_eps_is_added_to_the_std():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1e-3]], dtype=torch.float64)
    # std of [1, 0] = sqrt(0.5); std of [0, 1e-3] = 1e-3·sqrt(0.5) = 7.071068e-4.
    for eps in (1e-6, 1e-2, 1.0):
        a = 0.5 / (math.sqrt(0.5) + eps)
        b = 0.5e-3 / (0.5e-3 * math.sqrt(2) + eps)
        assert_close(outcome_advantages(rewards, eps=eps), [[a, -a], [-b, b]])
    # A tiny but real spread is amplified with a small eps and damped by a large one.
    assert outcome_advantages(rewards, eps=1e-6)[1, 1] == pytest.approx(0.70610, abs=1e-5)
    assert outcome_advantages(rewards, eps=1e-2)[1, 1] == pytest.approx(0.04670, abs=1e-5)


def test_outcome_rejects_bad_input():
    with pytest.raises(ValueError, match=r"'group', 'batch', 'none'"):
        outcome_advantages(torch.zeros(2, 3), scale="std")
    with pytest.raises(ValueError, match="rewards"):
        outcome_advantages(torch.zeros(6))
    with pytest.raises(ValueError, match="rewards"):
        outcome_advantages(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        outcome_advantages(torch.zeros(2, 3), eps=-1.0)


def test_outcome_empty_batch():
    assert outcome_advantages(torch.zeros(0, 4)).shape == (0, 4)


# ---------------------------------------------------------------- outcome invariances

# Rewards on a grid of quarters keep every float64 sum exact, so the only
# rounding left is in divisions; spreads on that grid are never degenerate.
quarter_rewards = st.lists(
    st.lists(st.integers(0, 8).map(lambda k: k / 4), min_size=2, max_size=8),
    min_size=1,
    max_size=4,
).filter(lambda rows: len({len(r) for r in rows}) == 1)


@settings(max_examples=60, deadline=None)
@given(rows=quarter_rewards, shift=st.integers(-40, 40).map(lambda k: k / 4))
def test_outcome_shift_invariance(rows, shift):
    rewards = torch.tensor(rows, dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        base = outcome_advantages(rewards, scale=scale)
        shifted = outcome_advantages(rewards + shift, scale=scale)
        torch.testing.assert_close(shifted, base, atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(rows=quarter_rewards, factor=st.floats(0.5, 50.0))
def test_outcome_scale_invariance_of_group_normalization(rows, factor):
    rewards = torch.tensor(rows, dtype=torch.float64)
    base = outcome_advantages(rewards)
    scaled = outcome_advantages(rewards * factor)
    # Equal up to the effect of eps on the std, which is below 1e-4 here.
    torch.testing.assert_close(scaled, base, atol=1e-4, rtol=0)


def test_outcome_is_vectorized_over_groups():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(5, 6, generator=generator, dtype=torch.float64)
    rewards[1, 2] = NAN
    together = outcome_advantages(rewards)
    for g in range(5):
        torch.testing.assert_close(together[g : g + 1], outcome_advantages(rewards[g : g + 1]))


# ---------------------------------------------------------------- process


def test_process_token_gets_sum_of_steps_ending_at_or_after_it():
    step_rewards = [
        torch.tensor([1.0, 0.25], dtype=torch.float64),
        torch.tensor([0.5], dtype=torch.float64),
        torch.tensor([0.0, 0.75, 1.0], dtype=torch.float64),
    ]
    step_ends = [torch.tensor([1, 4]), torch.tensor([2]), torch.tensor([0, 3, 5])]
    # All six step rewards are normalized together:
    # R = 1, 0.25, 0.5, 0, 0.75, 1: mean 3.5/6 = 0.583333; squared deviations sum to
    # 0.833333, so the stdev (Bessel) is sqrt(0.833333 / 5) = sqrt(1/6) = 0.408248.
    n = normalized([1.0, 0.25, 0.5, 0.0, 0.75, 1.0])
    assert statistics.stdev([1.0, 0.25, 0.5, 0.0, 0.75, 1.0]) == pytest.approx(0.408248, abs=1e-6)
    c0s0, c0s1, c1s0, c2s0, c2s1, c2s2 = n
    expected = [
        # completion 0: steps end at tokens 1 and 4; nothing after token 4
        [c0s0 + c0s1, c0s0 + c0s1, c0s1, c0s1, c0s1, 0.0],
        # completion 1: one step ending at token 2
        [c1s0, c1s0, c1s0, 0.0, 0.0, 0.0],
        # completion 2: steps end at tokens 0, 3 and 5
        [c2s0 + c2s1 + c2s2, c2s1 + c2s2, c2s1 + c2s2, c2s1 + c2s2, c2s2, c2s2],
    ]
    assert_close(process_advantages(step_rewards, step_ends, seq_len=6), expected)
    # Padding beyond the longest completion stays 0.
    padded = process_advantages(step_rewards, step_ends, seq_len=8)
    assert_close(padded, [[*row, 0.0, 0.0] for row in expected])


def test_process_completion_without_steps_and_unscorable_steps_get_zero():
    step_rewards = [torch.tensor([1.0, NAN]), torch.tensor([]), torch.tensor([0.0, 0.5])]
    step_ends = [torch.tensor([0, 2]), torch.tensor([], dtype=torch.long), torch.tensor([1, 2])]
    # Valid steps 1, 0, 0.5: mean 0.5, std 0.5 -> 1/(1+2e-6), -1/(1+2e-6), 0.
    a = 0.5 / (0.5 + EPS)
    expected = [[a, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-a, -a, 0.0, 0.0]]
    assert_close(process_advantages(step_rewards, step_ends, seq_len=4), expected)


def test_process_fewer_than_two_steps_in_the_group_gives_zero():
    one_step = process_advantages(
        [torch.tensor([1.0]), torch.tensor([])],
        [torch.tensor([2]), torch.tensor([], dtype=torch.long)],
        seq_len=3,
    )
    assert_close(one_step, [[0.0] * 3] * 2, atol=0)
    no_steps = process_advantages([torch.tensor([])], [torch.tensor([], dtype=torch.long)], 3)
    assert_close(no_steps, [[0.0] * 3], atol=0)


def test_process_zero_variance_gives_zero():
    out = process_advantages(
        [torch.tensor([0.7, 0.7]), torch.tensor([0.7])],
        [torch.tensor([0, 1]), torch.tensor([2])],
        seq_len=3,
    )
    assert_close(out, [[0.0] * 3] * 2, atol=0)


def test_process_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 completions but step_ends has 1"):
        process_advantages([torch.tensor([1.0]), torch.tensor([0.0])], [torch.tensor([0])], 4)
    with pytest.raises(ValueError, match="completion 1 has 2 step rewards but 1 step ends"):
        process_advantages(
            [torch.tensor([1.0]), torch.tensor([0.0, 1.0])],
            [torch.tensor([0]), torch.tensor([3])],
            4,
        )
    with pytest.raises(ValueError, match=r"step_ends\[0\] must lie in \[0, seq_len=4\)"):
        process_advantages([torch.tensor([1.0, 0.0])], [torch.tensor([0, 4])], 4)
    with pytest.raises(ValueError, match=r"step_ends\[0\] must lie"):
        process_advantages([torch.tensor([1.0, 0.0])], [torch.tensor([-1, 2])], 4)
    with pytest.raises(ValueError, match="1-D"):
        process_advantages([torch.tensor([[1.0, 0.0]])], [torch.tensor([[0, 1]])], 4)
    with pytest.raises(ValueError, match="integer"):
        process_advantages([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])], 4)
