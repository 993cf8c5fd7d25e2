"""Evaluation: greedy accuracy on held-out questions under one verifier.

``eval/accuracy`` is the fraction of eval questions whose greedy completion gets
reward ≥ 1 from ``reward.eval_verifier`` alone (DESIGN.md): a completion that
could not be scored counts as wrong, and ``eval/unscorable_frac`` says how many
there were. It runs on the training engines, so it measures the weights version
they serve.
"""

from __future__ import annotations

import logging

from reward.protocol import VerifierRef
from rollout import GroupRequest, SamplingSpec
from services.spec import JobSpec
from services.train.batch import reward_items
from services.train.data import Question
from services.train.parts import Parts

log = logging.getLogger(__name__)


def evaluate(spec: JobSpec, parts: Parts, questions: list[Question], step: int) -> dict[str, float]:
    """``eval/accuracy`` and ``eval/unscorable_frac`` of the engines' current weights."""
    requests = [GroupRequest(f"eval-{q.index}", q.prompt, seed=None) for q in questions]
    sampling = SamplingSpec.greedy(spec.rollout.max_tokens, spec.rollout.stop)
    groups = parts.pool.generate(requests, sampling)
    verifier = [VerifierRef(name=spec.reward.eval_verifier)]
    items = reward_items(questions, groups, verifier)
    results = parts.reward.score(items, job_id=f"{spec.name}-eval", step=step)
    correct = [r.status == "ok" and (r.reward or 0.0) >= 1.0 for r in results]
    unscorable = sum(r.status != "ok" for r in results) / max(len(results), 1)
    accuracy = sum(correct) / max(len(correct), 1)
    log.info("step %d: eval/accuracy %.3f", step, accuracy)
    return {"eval/accuracy": accuracy, "eval/unscorable_frac": unscorable}
