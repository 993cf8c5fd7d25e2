"""Reward functions, in TRL's and verl's conventions, that the reward tests configure by
import path."""

from __future__ import annotations

import asyncio
import re


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


# --- TRL's calling convention -----------------------------------------------------------

CALLS: list[dict] = []


def trl_docs_reward(completions, ground_truth, **kwargs):
    """The example of TRL's docs: 1.0 if the \\boxed{} content equals `ground_truth`."""
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth, strict=True)]


def keyword_probe(*, prompts, completions, reference, **kwargs):
    """Records each call's keywords; 1.0 when the item's `expect` metadata equals its text."""
    CALLS.append({"prompts": prompts, "completions": completions, "reference": reference,
                  **kwargs})  # fmt: skip
    return [1.0 if kwargs["expect"][i] == completions[i] else 0.0 for i in range(len(prompts))]


async def async_boxed(prompts, completions, reference, **kwargs):
    """An async TRL-style function: 1.0 if the reference is boxed in the completion."""
    await asyncio.sleep(0)
    return [None if ref is None else float(f"\\boxed{{{ref}}}" in text)
            for text, ref in zip(completions, reference, strict=True)]  # fmt: skip


# --- verl's calling convention ----------------------------------------------------------


def verl_compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl-style: the last number of the solution equals the ground truth."""
    if extra_info and extra_info.get("explode"):
        raise ValueError(f"cannot score item {extra_info['explode']}")
    numbers = re.findall(r"-?\d+", solution_str)
    correct = bool(numbers) and numbers[-1] == ground_truth
    if data_source == "with_details":
        return {"score": float(correct), "acc": correct, "pred": numbers[-1] if numbers else None}
    return float(correct)


def math_of_answer_column(completions, answer, **kwargs):
    """TRL-style: the built-in math check against the dataset's `answer` column (sent as
    item metadata through `data.metadata_fields`)."""
    from reward.verifiers.math_answer import check_math

    return [check_math(str(a), c)[0] for a, c in zip(answer, completions, strict=True)]
