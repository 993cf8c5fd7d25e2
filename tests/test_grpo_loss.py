"""The GRPO loss (learner.grpo.grpo_loss): hand-computed values, gradients, invariances.

Expected values are derived per token with python floats (`math.exp`), written
out below, never by running the code under test.
"""

import math

import pytest
import torch

from learner.grpo import grpo_loss

AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
NAN, INF = float("nan"), float("inf")


def k3(d: float) -> float:
    """The paper's KL estimator for d = ref_logprob - logprob."""
    return math.exp(d) - d - 1


# A tiny batch: two completions of 3 and 2 tokens, padded to T = 3.
LOGPROBS = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
# old = logprobs - log ρ, with log ρ = [[0.3, 0, -0.5], [0, -0.3, (padding)]].
OLD = [[-1.3, -0.5, -1.5], [-0.3, -0.9, 5.0]]
# ref - logprobs = [[-0.2, 0.1, 0.0], [-0.2, 0.2, (padding)]].
REF = [[-1.2, -0.4, -2.0], [-0.5, -1.0, 7.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.5, -0.8]
# The surrogate min(ρÂ, clip(ρ, 0.8, 1.2)Â) per loss token, by hand:
#   seq 0, Â = 1.5:  ρ = e^0.3 = 1.349859 > 1.2 -> clipped: 1.2 · 1.5 = 1.8
#                    ρ = 1                     -> 1.5
#                    ρ = e^-0.5 = 0.606531     -> min(0.909796, 0.8 · 1.5 = 1.2) = 0.909796
#   seq 1, Â = -0.8: ρ = 1                     -> -0.8
#                    ρ = e^-0.3 = 0.740818     -> min(-0.592655, 0.8 · -0.8 = -0.64) = -0.64
SURROGATE = [[1.2 * 1.5, 1.5, math.exp(-0.5) * 1.5], [-0.8, 0.8 * -0.8]]
KL = [[k3(-0.2), k3(0.1), k3(0.0)], [k3(-0.2), k3(0.2)]]
N_TOKENS = 5


def batch(dtype=torch.float64):
    """The tiny batch as tensors; `logprobs` is a leaf that requires grad."""
    logprobs = torch.tensor(LOGPROBS, dtype=dtype, requires_grad=True)
    tensors = [torch.tensor(x, dtype=dtype) for x in (OLD, REF, ADV)]
    return logprobs, *tensors, torch.tensor(MASK, dtype=torch.bool)


def per_token(beta: float, weights=((1.0, 1.0, 1.0), (1.0, 1.0))) -> list[list[float]]:
    """-(surrogate · w) + β·KL for each loss token, by hand."""
    return [
        [-s * w + beta * k for s, w, k in zip(srow, wrow, krow, strict=True)]
        for srow, wrow, krow in zip(SURROGATE, weights, KL, strict=True)
    ]


def aggregate(values: list[list[float]], agg: str, max_len: int = 4, normalizer=None) -> float:
    """The three aggregations, by hand, over ragged per-token lists."""
    if agg == "token_mean":
        return sum(sum(row) for row in values) / (normalizer or sum(len(r) for r in values))
    if agg == "seq_mean_token_mean":
        return sum(sum(row) / len(row) for row in values) / (normalizer or len(values))
    return sum(sum(row) / max_len for row in values) / (normalizer or len(values))


# ---------------------------------------------------------------- hand-computed values


@pytest.mark.parametrize("agg", AGGS)
def test_loss_matches_hand_computation(agg):
    logprobs, old, ref, adv, mask = batch()
    loss, metrics = grpo_loss(logprobs, old, ref, adv, mask, agg=agg, max_len=4)
    expected = aggregate(per_token(0.04), agg)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["loss/policy"] == pytest.approx(aggregate(per_token(0.0), agg), abs=1e-6)
    assert metrics["loss/kl"] == pytest.approx(sum(KL[0] + KL[1]) / N_TOKENS, abs=1e-6)
    assert metrics["loss/clip_frac_low"] == pytest.approx(1 / 5)  # seq 1, token 1
    assert metrics["loss/clip_frac_high"] == pytest.approx(1 / 5)  # seq 0, token 0
    ratios = [math.exp(0.3), 1.0, math.exp(-0.5), 1.0, math.exp(-0.3)]
    assert metrics["loss/ratio_mean"] == pytest.approx(sum(ratios) / 5, abs=1e-6)
    assert all(type(v) is float for v in metrics.values())


def test_loss_literal_value_for_the_paper_aggregation():
    logprobs, old, ref, adv, mask = batch()
    loss, _ = grpo_loss(logprobs, old, ref, adv, mask)
    # seq 0: -(1.8 + 1.5 + 0.909796)/3 + 0.04·(0.018731 + 0.005171 + 0)/3 = -1.402947
    # seq 1: -(-0.8 - 0.64)/2 + 0.04·(0.018731 + 0.021403)/2           =  0.720803
    # mean over the two completions: (-1.402947 + 0.720803) / 2       = -0.341072
    assert loss.item() == pytest.approx(-0.341072, abs=1e-6)


def test_loss_in_float32():
    logprobs, old, ref, adv, mask = batch(torch.float32)
    loss, _ = grpo_loss(logprobs, old, ref, adv, mask, agg="token_mean")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(aggregate(per_token(0.04), "token_mean"), abs=1e-6)


@pytest.mark.parametrize(("agg", "normalizer"), [(a, n) for a in AGGS for n in (4, 10.0)])
def test_normalizer_replaces_the_batch_count(agg, normalizer):
    logprobs, old, ref, adv, mask = batch()
    loss, metrics = grpo_loss(
        logprobs, old, ref, adv, mask, agg=agg, max_len=4, normalizer=normalizer
    )
    expected = aggregate(per_token(0.04), agg, normalizer=normalizer)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    policy = aggregate(per_token(0.0), agg, normalizer=normalizer)
    assert metrics["loss/policy"] == pytest.approx(policy, abs=1e-6)


@pytest.mark.parametrize("agg", AGGS)
def test_is_weights_multiply_the_policy_term_only(agg):
    logprobs, old, ref, adv, mask = batch()
    weights = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.25, 99.0]], dtype=torch.float64)
    loss, _ = grpo_loss(logprobs, old, ref, adv, mask, agg=agg, max_len=4, is_weights=weights)
    hand = per_token(0.04, weights=((0.5, 1.0, 2.0), (1.0, 0.25)))
    assert loss.item() == pytest.approx(aggregate(hand, agg), abs=1e-6)


def test_beta_term():
    logprobs, old, ref, adv, mask = batch()
    no_ref, metrics = grpo_loss(logprobs, old, None, adv, mask, beta=0.0)
    assert no_ref.item() == pytest.approx(aggregate(per_token(0.0), "seq_mean_token_mean"))
    assert metrics["loss/kl"] == 0.0
    # With a reference but beta = 0 the KL is still reported, not added.
    with_ref, metrics = grpo_loss(logprobs, old, ref, adv, mask, beta=0.0)
    assert with_ref.item() == pytest.approx(no_ref.item(), abs=1e-12)
    assert metrics["loss/kl"] == pytest.approx(sum(KL[0] + KL[1]) / N_TOKENS, abs=1e-6)
    # β scales the aggregated KL: loss(β) - loss(0) = β · agg(KL).
    kl_agg = aggregate([KL[0], KL[1]], "seq_mean_token_mean")
    big, _ = grpo_loss(logprobs, old, ref, adv, mask, beta=0.5)
    assert big.item() - no_ref.item() == pytest.approx(0.5 * kl_agg, abs=1e-6)


def test_kl_kind_is_passed_through():
    logprobs, old, ref, adv, mask = batch()
    loss, metrics = grpo_loss(logprobs, old, ref, adv, mask, kl="k1", agg="token_mean")
    k1 = [[0.2, -0.1, 0.0], [0.2, -0.2]]  # logprobs - ref
    expected = sum(
        -s + 0.04 * k for s, k in zip(SURROGATE[0] + SURROGATE[1], k1[0] + k1[1], strict=True)
    )
    assert loss.item() == pytest.approx(expected / N_TOKENS, abs=1e-6)
    assert metrics["loss/kl"] == pytest.approx(0.1 / N_TOKENS, abs=1e-6)


def test_per_token_and_per_sequence_advantages_agree():
    logprobs, old, ref, adv, mask = batch()
    per_seq, _ = grpo_loss(logprobs, old, ref, adv, mask)
    per_tok, _ = grpo_loss(logprobs, old, ref, adv[:, None].expand(2, 3).clone(), mask)
    assert per_tok.item() == pytest.approx(per_seq.item(), abs=1e-12)


# ---------------------------------------------------------------- padding and empty rows


@pytest.mark.parametrize("agg", AGGS)
def test_masked_positions_and_empty_sequences_are_harmless(agg):
    logprobs, old, ref, adv, mask = batch()
    reference, _ = grpo_loss(logprobs, old, ref, adv, mask, agg=agg, max_len=4)
    # Add a completion with no loss tokens, and junk everywhere the mask is 0.
    junk_lp = torch.tensor(
        [[-1.0, -0.5, -2.0], [-0.3, -1.2, -INF], [NAN, -INF, 0.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    junk_old = torch.cat([old, torch.tensor([[INF, NAN, 1.0]], dtype=torch.float64)])
    junk_old[1, 2] = -INF
    junk_ref = torch.cat([ref, torch.tensor([[NAN, -INF, INF]], dtype=torch.float64)])
    junk_adv = torch.tensor(
        [[1.5, 1.5, 1.5], [-0.8, -0.8, NAN], [NAN, INF, 3.0]], dtype=torch.float64
    )
    junk_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    loss, metrics = grpo_loss(junk_lp, junk_old, junk_ref, junk_adv, junk_mask, agg=agg, max_len=4)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    assert all(math.isfinite(v) for v in metrics.values())
    loss.backward()
    assert torch.isfinite(junk_lp.grad).all()
    assert (junk_lp.grad[~junk_mask] == 0).all()


@pytest.mark.parametrize("agg", AGGS)
def test_batch_without_loss_tokens_gives_zero(agg):
    logprobs = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, metrics = grpo_loss(
        logprobs, zeros, zeros, torch.ones(2).double(), mask, agg=agg, max_len=4
    )
    assert loss.item() == 0.0
    assert all(v == 0.0 for v in metrics.values())
    loss.backward()
    assert (logprobs.grad == 0).all()


# ---------------------------------------------------------------- validation


def test_loss_rejects_bad_arguments():
    logprobs, old, ref, adv, mask = batch()

    def call(**overrides):
        args = dict(
            logprobs=logprobs, old_logprobs=old, ref_logprobs=ref, advantages=adv, loss_mask=mask
        )
        kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in args}
        args.update(overrides)
        return grpo_loss(*args.values(), **kwargs)

    with pytest.raises(ValueError, match="clip_low"):
        call(clip_low=1.0)
    with pytest.raises(ValueError, match="clip_low"):
        call(clip_low=-0.1)
    with pytest.raises(ValueError, match="clip_high"):
        call(clip_high=-0.1)
    with pytest.raises(ValueError, match="beta"):
        call(beta=-0.1)
    with pytest.raises(ValueError, match="ref_logprobs is required when beta > 0"):
        call(ref_logprobs=None)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        call(old_logprobs=old[:, :2])
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        call(ref_logprobs=ref[:1])
    with pytest.raises(ValueError, match="loss_mask has shape"):
        call(loss_mask=mask[:, :2])
    with pytest.raises(ValueError, match="is_weights has shape"):
        call(is_weights=torch.ones(3, 3))
    with pytest.raises(ValueError, match="advantages has shape"):
        call(advantages=torch.ones(3))
    with pytest.raises(ValueError, match=r"logprobs must be \[batch, seq\]"):
        call(logprobs=logprobs[0], old_logprobs=old[0], ref_logprobs=ref[0], loss_mask=mask[0])
    with pytest.raises(ValueError, match="'seq_mean_token_mean', 'token_mean'"):
        call(agg="sum")
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        call(kl="k4")
    with pytest.raises(ValueError, match="max_len"):
        call(agg="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="normalizer"):
        call(normalizer=0)


# ---------------------------------------------------------------- gradients


def test_gradient_is_zero_exactly_where_ppo_clips():
    # Six tokens of one completion, token_mean, β = 0, ε = 0.2:
    #   Â = +1, ρ = 1.5 > 1.2 -> clipped, grad 0    Â = -1, ρ = 0.5 < 0.8 -> clipped, grad 0
    #   Â = +1, ρ = 0.5       -> grad -Â·ρ/6        Â = -1, ρ = 1.5       -> grad -Â·ρ/6
    #   Â = +1, ρ = 1.1       -> grad -Â·ρ/6        Â = -1, ρ = 0.9       -> grad -Â·ρ/6
    # (d/dlogprob of -ρÂ/6 is -ρÂ/6, since dρ/dlogprob = ρ.)
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1, 0.9]
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    logprobs = torch.full((1, 6), -1.0, dtype=torch.float64, requires_grad=True)
    old = logprobs.detach() - torch.tensor([ratios], dtype=torch.float64).log()
    mask = torch.ones(1, 6, dtype=torch.bool)
    loss, metrics = grpo_loss(logprobs, old, None, adv, mask, beta=0.0, agg="token_mean")
    loss.backward()
    expected = [0.0, 0.0, -0.5 / 6, 1.5 / 6, -1.1 / 6, 0.9 / 6]
    torch.testing.assert_close(
        logprobs.grad[0], torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert metrics["loss/clip_frac_high"] == pytest.approx(1 / 6)
    assert metrics["loss/clip_frac_low"] == pytest.approx(1 / 6)


def test_clip_bounds_are_independent():
    # ρ = 1.25 with Â > 0 is clipped by ε_high = 0.2 but not by ε_high = 0.28 (DAPO's
    # clip-higher); ρ = 0.75 with Â < 0 is clipped by ε_low = 0.2 whatever ε_high is.
    logprobs = torch.full((1, 2), -1.0, dtype=torch.float64, requires_grad=True)
    old = logprobs.detach() - torch.tensor([[1.25, 0.75]], dtype=torch.float64).log()
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for clip_high, grad0 in ((0.2, 0.0), (0.28, -1.25 / 2)):
        logprobs.grad = None
        loss, _ = grpo_loss(
            logprobs, old, None, adv, mask, beta=0.0, agg="token_mean", clip_high=clip_high
        )
        loss.backward()
        assert logprobs.grad[0, 0].item() == pytest.approx(grad0, abs=1e-12)
        assert logprobs.grad[0, 1].item() == 0.0


class TinyPolicy(torch.nn.Module):
    """A linear 'language model': features of each position -> logits over a vocab."""

    def __init__(self, features: int = 3, vocab: int = 7, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(features, vocab).double()

    def logprobs(self, inputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, F], [B, T] -> [B, T] log-probabilities of `tokens`."""
        logp = torch.log_softmax(self.head(inputs), dim=-1)
        return logp.gather(-1, tokens[..., None]).squeeze(-1)


def rollouts(batch_size: int, seq: int, lengths: list[int], seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, seq, 3, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, 7, (batch_size, seq), generator=generator)
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    return inputs, tokens, mask, generator


def test_on_policy_gradient_is_reinforce():
    # ρ = 1 and β = 0: ∇ loss = -Σ_i Â_i / (G·|o_i|) Σ_t ∇ log π(o_i,t).
    policy = TinyPolicy()
    lengths = [5, 2, 4, 1]
    inputs, tokens, mask, _ = rollouts(4, 5, lengths)
    adv = torch.tensor([1.2, -0.4, 0.3, -1.1], dtype=torch.float64)

    logprobs = policy.logprobs(inputs, tokens)
    loss, metrics = grpo_loss(logprobs, logprobs.detach(), None, adv, mask, beta=0.0)
    grpo_grads = torch.autograd.grad(loss, list(policy.parameters()))

    logprobs = policy.logprobs(inputs, tokens)
    weights = adv / (len(lengths) * torch.tensor(lengths, dtype=torch.float64))
    reinforce = -(weights[:, None] * logprobs * mask).sum()
    reinforce_grads = torch.autograd.grad(reinforce, list(policy.parameters()))

    assert metrics["loss/ratio_mean"] == pytest.approx(1.0)
    for ours, theirs in zip(grpo_grads, reinforce_grads, strict=True):
        assert theirs.abs().max() > 1e-3  # the comparison is not between zeros
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_with_normalizer_accumulate_to_the_full_batch_gradient(agg):
    lengths = [5, 1, 3, 0, 4, 2]  # includes a completion with no loss tokens
    inputs, tokens, mask, generator = rollouts(6, 5, lengths, seed=2)
    policy = TinyPolicy(seed=3)
    with torch.no_grad():
        base = policy.logprobs(inputs, tokens)
    shape = base.shape
    # Off-policy, with clipping active on some tokens, a KL term and IS weights.
    old = base + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    ref = base + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    adv = torch.randn(shape, generator=generator, dtype=torch.float64)
    is_weights = 0.5 + torch.rand(shape, generator=generator, dtype=torch.float64)
    options = dict(agg=agg, max_len=5, beta=0.04)

    def loss_on(rows: slice, **extra):
        logprobs = policy.logprobs(inputs[rows], tokens[rows])
        return grpo_loss(
            logprobs,
            old[rows],
            ref[rows],
            adv[rows],
            mask[rows],
            is_weights=is_weights[rows],
            **options,
            **extra,
        )[0]

    full_loss = loss_on(slice(None))
    full_grads = torch.autograd.grad(full_loss, list(policy.parameters()))

    # The full batch's count: completions with loss tokens, or loss tokens.
    normalizer = int(mask.sum()) if agg == "token_mean" else int(mask.any(-1).sum())
    assert normalizer == (15 if agg == "token_mean" else 5)
    policy.zero_grad()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        micro = loss_on(rows, normalizer=normalizer)
        micro.backward()
        total += micro.item()
    assert total == pytest.approx(full_loss.item(), abs=1e-10)
    for param, full in zip(policy.parameters(), full_grads, strict=True):
        assert full.abs().max() > 1e-4
        torch.testing.assert_close(param.grad, full, atol=1e-10, rtol=1e-8)
