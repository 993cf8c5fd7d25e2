"""GRPO math: group-relative advantages, KL estimators and the clipped policy loss.

This module owns every formula of GRPO (DeepSeekMath §4) that the system uses:

- outcome-supervision advantages (§4.1.2), with the Dr. GRPO (``scale="none"``)
  and batch-std (``scale="batch"``) variants, and process-supervision
  advantages (§4.1.3);
- per-token estimators of KL(π_θ‖π_ref): ``k1``, ``k2`` and the paper's ``k3``;
- the clipped surrogate loss with its aggregations (the paper's per-sequence
  mean, DAPO's token mean, Dr. GRPO's constant-length normalization),
  micro-batch normalization and truncated importance-sampling weights.

They are pure functions on torch tensors that import nothing but torch, so the
learner actor, the driver and the tests share them without pulling in Ray, vLLM
or the reward service, and each formula can be checked by hand. The edge cases
(unscorable completions, degenerate groups, empty sequences, padding) are
handled here, once, rather than by every caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

_T = TypeVar("_T")


def _lookup(table: dict[str, _T], name: str, arg: str) -> _T:
    """``table[name]``, or a ValueError that lists the valid names of ``arg``."""
    try:
        return table[name]
    except KeyError:
        valid = ", ".join(repr(k) for k in table)
        raise ValueError(f"unknown {arg} {name!r}; valid values: {valid}") from None


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is true; 0 if there are none."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


# ---------------------------------------------------------------- advantages


def _center(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row minus the mean of its valid entries (0 at invalid ones), and the valid count.

    ``[R, N] -> ([R, N], [R, 1])``.
    """
    count = valid.sum(-1, keepdim=True)
    filled = torch.where(valid, values, torch.zeros_like(values))
    mean = filled.sum(-1, keepdim=True) / count.clamp(min=1)
    return torch.where(valid, values - mean, torch.zeros_like(values)), count


def _masked_std(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std over the valid entries of each row: ``[R, N] -> [R, 1]``.

    Rows with fewer than 2 valid entries get 0 (callers zero those rows anyway).
    """
    centered, count = _center(values, valid)
    return (centered.square().sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()


def _scale_group(
    centered: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor, eps: float
) -> torch.Tensor:
    return centered / (_masked_std(rewards, valid) + eps)


def _scale_batch(
    centered: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor, eps: float
) -> torch.Tensor:
    return centered / (_masked_std(rewards.reshape(1, -1), valid.reshape(1, -1)) + eps)


def _scale_none(
    centered: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor, eps: float
) -> torch.Tensor:
    return centered


_SCALES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "group": _scale_group,
    "batch": _scale_batch,
    "none": _scale_none,
}


def outcome_advantages(
    rewards: torch.Tensor, *, eps: float = 1e-6, scale: str = "group"
) -> torch.Tensor:
    """Outcome-supervision advantages, one per completion (DeepSeekMath §4.1.2).

    Args:
        rewards: float ``[num_groups, group_size]``; NaN marks an unscorable completion.
        eps: added to the standard deviation before dividing.
        scale: ``"group"`` — ``(r - mean) / (std + eps)`` within each group (the
            paper); ``"batch"`` — ``(r - mean) / (std_batch + eps)``, with the std
            of all valid rewards of the batch; ``"none"`` — ``r - mean`` (Dr. GRPO).
            Means and stds are over the valid entries only, stds with Bessel's
            correction (as ``torch.std``).

    Returns:
        ``[num_groups, group_size]``. NaN entries get 0; a group with fewer than 2
        valid entries or with all valid rewards equal gets 0 everywhere.
    """
    scale_fn = _lookup(_SCALES, scale, "scale")
    if rewards.dim() != 2 or not rewards.is_floating_point():
        raise ValueError(
            "rewards must be a float tensor [num_groups, group_size], got "
            f"dtype {rewards.dtype} and shape {tuple(rewards.shape)}"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rewards.numel() == 0:
        return torch.zeros_like(rewards)
    valid = ~torch.isnan(rewards)
    centered, _ = _center(rewards, valid)
    informative = valid & ~zero_variance_groups(rewards).unsqueeze(-1)
    scaled = scale_fn(centered, rewards, valid, eps)
    return torch.where(informative, scaled, torch.zeros_like(scaled))


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """``[num_groups]`` bool: groups that carry no learning signal under outcome
    supervision — fewer than 2 valid (non-NaN) rewards, or all valid rewards equal.

    Equality is exact: the centered values of a constant group can be rounding noise
    (the mean of 0.7s is not 0.7), which dividing by the std would amplify.
    """
    valid = ~torch.isnan(rewards)
    highest = torch.where(valid, rewards, -torch.inf).amax(-1)
    lowest = torch.where(valid, rewards, torch.inf).amin(-1)
    return (valid.sum(-1) < 2) | ~(highest > lowest)


def _check_steps(
    step_rewards: Sequence[torch.Tensor], step_ends: Sequence[torch.Tensor], seq_len: int
) -> None:
    """Raise a ValueError naming the offending completion if the ragged inputs disagree."""
    if len(step_rewards) != len(step_ends):
        raise ValueError(
            f"step_rewards has {len(step_rewards)} completions but step_ends has "
            f"{len(step_ends)}; give one entry per completion of the group in both"
        )
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    for i, (rewards, ends) in enumerate(zip(step_rewards, step_ends, strict=True)):
        if rewards.dim() != 1 or ends.dim() != 1:
            raise ValueError(
                f"step_rewards[{i}] and step_ends[{i}] must be 1-D, got shapes "
                f"{tuple(rewards.shape)} and {tuple(ends.shape)}"
            )
        if rewards.numel() != ends.numel():
            raise ValueError(
                f"completion {i} has {rewards.numel()} step rewards but {ends.numel()} step ends"
            )
        if ends.is_floating_point():
            raise ValueError(f"step_ends[{i}] must hold integer token indices, got {ends.dtype}")
        if ends.numel() and (int(ends.min()) < 0 or int(ends.max()) >= seq_len):
            raise ValueError(
                f"step_ends[{i}] must lie in [0, seq_len={seq_len}), got "
                f"{int(ends.min())}..{int(ends.max())}"
            )


def process_advantages(
    step_rewards: Sequence[torch.Tensor],
    step_ends: Sequence[torch.Tensor],
    seq_len: int,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Process-supervision advantages for one group (DeepSeekMath §4.1.3).

    Args:
        step_rewards: per completion i, a 1-D tensor ``[K_i]`` of its step rewards
            (ragged: K_i may differ, and may be 0). NaN marks an unscorable step; it
            is left out of the statistics and contributes nothing.
        step_ends: per completion i, a 1-D integer tensor ``[K_i]``: the token index
            (0-based, within the completion) of the last token of each step.
        seq_len: length of the returned token axis; every end must be < seq_len.
        eps: added to the standard deviation before dividing.

    Returns:
        ``[group_size, seq_len]``. All step rewards R of the group are normalized
        together, ``r̃ = (r - mean(R)) / (std(R) + eps)`` (Bessel); token t of
        completion i gets the sum of r̃ over the steps of i that end at or after t,
        hence 0 past its last step. Fewer than 2 valid steps in the group, or all
        equal, give 0 everywhere.
    """
    step_rewards = [torch.as_tensor(r) for r in step_rewards]
    step_ends = [torch.as_tensor(e) for e in step_ends]
    _check_steps(step_rewards, step_ends, seq_len)
    if not step_rewards:
        return torch.zeros(0, seq_len)
    flat = torch.cat(step_rewards)
    if not flat.is_floating_point():
        flat = flat.to(torch.get_default_dtype())
    normalized = outcome_advantages(flat.reshape(1, -1), eps=eps).reshape(-1)
    rows = torch.repeat_interleave(
        torch.arange(len(step_rewards), device=flat.device),
        torch.tensor([r.numel() for r in step_rewards], device=flat.device),
    )
    ends = torch.cat(step_ends).to(device=flat.device, dtype=torch.long)
    at_end = torch.zeros(len(step_rewards), seq_len, dtype=flat.dtype, device=flat.device)
    at_end.index_put_((rows, ends), normalized, accumulate=True)
    # Reverse cumulative sum: token t collects every step that ends at or after t.
    return at_end.flip(-1).cumsum(-1).flip(-1)


# ---------------------------------------------------------------- KL


def _kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def _kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()


def _kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    # exp(d) - d - 1 via expm1 for precision near d = 0; the clamp removes the
    # rounding noise that could otherwise make the (non-negative) estimate < 0.
    log_ratio = ref_logprobs - logprobs
    return (torch.expm1(log_ratio) - log_ratio).clamp(min=0)


_KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
}


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(π_θ‖π_ref) from sampled tokens' log-probabilities.

    With ``d = ref_logprobs - logprobs``: ``k1 = -d``, ``k2 = d²/2``,
    ``k3 = exp(d) - d - 1`` (the paper's estimator: non-negative and unbiased
    under samples of π_θ). Inputs have equal shapes; the output has that shape.
    """
    estimator = _lookup(_KL_ESTIMATORS, kind, "kl")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected "
            f"{tuple(logprobs.shape)} (the shape of logprobs)"
        )
    return estimator(logprobs, ref_logprobs)


# ---------------------------------------------------------------- loss


def _count(flags: torch.Tensor, normalizer: float | None) -> torch.Tensor | float:
    """The divisor of an aggregation: ``normalizer`` if given, else how many flags are set."""
    if normalizer is not None:
        return normalizer
    return flags.sum().clamp(min=1)


def _agg_seq_mean_token_mean(
    per_token: torch.Tensor, mask: torch.Tensor, max_len: int | None, normalizer: float | None
) -> torch.Tensor:
    tokens = mask.sum(-1)
    per_seq = (per_token * mask).sum(-1) / tokens.clamp(min=1)
    return per_seq.sum() / _count(tokens > 0, normalizer)


def _agg_token_mean(
    per_token: torch.Tensor, mask: torch.Tensor, max_len: int | None, normalizer: float | None
) -> torch.Tensor:
    return (per_token * mask).sum() / _count(mask, normalizer)


def _agg_seq_mean_token_sum_norm(
    per_token: torch.Tensor, mask: torch.Tensor, max_len: int | None, normalizer: float | None
) -> torch.Tensor:
    assert max_len is not None  # checked by _check_loss_options
    per_seq = (per_token * mask).sum(-1) / max_len
    return per_seq.sum() / _count(mask.any(-1), normalizer)


_AGGREGATIONS: dict[
    str, Callable[[torch.Tensor, torch.Tensor, int | None, float | None], torch.Tensor]
] = {
    "seq_mean_token_mean": _agg_seq_mean_token_mean,
    "token_mean": _agg_token_mean,
    "seq_mean_token_sum_norm": _agg_seq_mean_token_sum_norm,
}


def _check_loss_shapes(
    logprobs: torch.Tensor, advantages: torch.Tensor, **same_shape: torch.Tensor | None
) -> None:
    """Raise a ValueError naming the first argument whose shape does not fit ``logprobs``."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [batch, seq], got shape {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    for name, tensor in same_shape.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {shape} (the shape of logprobs)"
            )
    if tuple(advantages.shape) not in (shape, shape[:1]):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected {shape} (per token) "
            f"or {shape[:1]} (per sequence)"
        )


def _check_loss_options(
    *,
    has_ref: bool,
    clip_low: float,
    clip_high: float,
    beta: float,
    kl: str,
    agg: str,
    max_len: int | None,
    normalizer: float | None,
) -> None:
    """Raise a ValueError naming the first hyperparameter that is out of range."""
    _lookup(_KL_ESTIMATORS, kl, "kl")
    _lookup(_AGGREGATIONS, agg, "agg")
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and not has_ref:
        raise ValueError("ref_logprobs is required when beta > 0; pass beta=0 to drop the KL term")
    if agg == "seq_mean_token_sum_norm" and (max_len is None or max_len <= 0):
        raise ValueError(
            f"agg='seq_mean_token_sum_norm' (Dr. GRPO) needs max_len > 0, got {max_len}; "
            "pass the generation's max_tokens"
        )
    if normalizer is not None and normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.04,
    kl: str = "k3",
    agg: str = "seq_mean_token_mean",
    max_len: int | None = None,
    is_weights: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss (DeepSeekMath eq. 3, negated for minimization).

    Per token: ``-[min(ρ·Â, clip(ρ, 1-clip_low, 1+clip_high)·Â)·w - β·KL]`` with
    ``ρ = exp(logprobs - old_logprobs)``, ``w`` the ``is_weights`` (1 if None) and
    KL the ``kl`` estimator against ``ref_logprobs``.

    Args:
        logprobs: ``[B, T]`` log-probabilities of the sampled tokens under π_θ (with grad).
        old_logprobs: ``[B, T]`` the same under the policy that the ratio is taken against.
        ref_logprobs: ``[B, T]`` the same under π_ref; may be None when ``beta == 0``.
        advantages: ``[B, T]`` per token, or ``[B]`` broadcast over each sequence.
        loss_mask: ``[B, T]``; nonzero marks the completion tokens that count.
            Masked-out positions may hold anything (padding, inf, NaN).
        agg: ``"seq_mean_token_mean"`` (the paper: token mean per completion, then
            mean over completions), ``"token_mean"`` (DAPO: mean over all tokens) or
            ``"seq_mean_token_sum_norm"`` (Dr. GRPO: token sum / ``max_len`` per
            completion, then mean over completions).
        is_weights: ``[B, T]`` importance weights on the policy term (not on KL),
            e.g. :func:`truncated_is_weights`; treated as constants.
        normalizer: replaces this batch's own divisor — the number of completions
            with at least one loss token (``seq_*`` modes) or of loss tokens
            (``token_mean``) — so that micro-batch losses computed with the full
            batch's count sum to the full-batch loss.

    Returns:
        ``(loss, metrics)``: the scalar loss, and python floats ``loss/policy`` (the
        aggregated policy term, so ``loss = loss/policy + β·aggregated KL``),
        ``loss/kl`` (mean KL estimate over loss tokens, before β; 0.0 without
        ``ref_logprobs``), ``loss/clip_frac_low``, ``loss/clip_frac_high`` (fraction
        of loss tokens where the lower/upper clip is active) and ``loss/ratio_mean``.
    """
    _check_loss_shapes(
        logprobs,
        advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        loss_mask=loss_mask,
        is_weights=is_weights,
    )
    _check_loss_options(
        has_ref=ref_logprobs is not None,
        clip_low=clip_low,
        clip_high=clip_high,
        beta=beta,
        kl=kl,
        agg=agg,
        max_len=max_len,
        normalizer=normalizer,
    )
    mask = loss_mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)

    def keep(values: torch.Tensor) -> torch.Tensor:
        # Zero the masked-out positions before any arithmetic so that padding
        # (even inf/NaN) reaches neither the loss nor the gradient.
        return torch.where(mask, values, torch.zeros_like(values))

    ratio = keep(logprobs - old_logprobs).exp()
    advantages = keep(advantages)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    policy_loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if is_weights is not None:
        policy_loss = policy_loss * keep(is_weights.detach())
    kl_per_token = None
    if ref_logprobs is not None:
        kl_per_token = kl_estimate(keep(logprobs), keep(ref_logprobs), kl)
    per_token = policy_loss if beta == 0 else policy_loss + beta * kl_per_token

    aggregate = _AGGREGATIONS[agg]
    loss = aggregate(per_token, mask, max_len, normalizer)
    with torch.no_grad():
        metrics = {
            "loss/policy": float(aggregate(policy_loss, mask, max_len, normalizer)),
            "loss/kl": 0.0 if kl_per_token is None else float(masked_mean(kl_per_token, mask)),
            "loss/clip_frac_low": float(
                masked_mean(((advantages < 0) & (ratio < 1 - clip_low)).to(ratio.dtype), mask)
            ),
            "loss/clip_frac_high": float(
                masked_mean(((advantages > 0) & (ratio > 1 + clip_high)).to(ratio.dtype), mask)
            ),
            "loss/ratio_mean": float(masked_mean(ratio, mask)),
        }
    return loss, metrics


# ---------------------------------------------------------------- helpers for the learner


def truncated_is_weights(
    old_logprobs: torch.Tensor, inference_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights ``min(exp(old - inference), cap)``, detached.

    They correct for the mismatch between the sampler (vLLM, ``inference_logprobs``)
    and the trainer's own log-probabilities of the same policy (``old_logprobs``);
    both ``[B, T]``, as is the result.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if old_logprobs.shape != inference_logprobs.shape:
        raise ValueError(
            f"inference_logprobs has shape {tuple(inference_logprobs.shape)}, expected "
            f"{tuple(old_logprobs.shape)} (the shape of old_logprobs)"
        )
    return (old_logprobs - inference_logprobs).detach().exp().clamp(max=cap)
