"""TRL-style reward functions that the reward tests configure by import path."""

from __future__ import annotations


def mentions_reference(prompts, completions, **kwargs):
    """1 if the completion mentions the reference, scaled by metadata `scale`; None if the
    item has no reference."""
    references = kwargs["reference"]
    scales = kwargs.get("scale") or [None] * len(completions)
    rewards = []
    for completion, reference, scale in zip(completions, references, scales, strict=True):
        if reference is None:
            rewards.append(None)
        else:
            rewards.append((1.0 if reference in completion else 0.0) * (scale or 1.0))
    return rewards


def too_few(prompts, completions, **kwargs):
    """Returns one value too few."""
    return [1.0] * (len(completions) - 1)


def raises(prompts, completions, **kwargs):
    """Always raises."""
    raise RuntimeError("custom verifier exploded")
