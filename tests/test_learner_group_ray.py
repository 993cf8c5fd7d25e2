"""The learner group as the driver runs it: two Ray actors of the tiny model (FSDP2 over
gloo). A rank whose process dies fails the group's next step at once with an error that
names it, from Ray's actor-death error rather than the collective timeout, and the
other rank is stopped."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from learner_testkit import recorded_rollouts

from services.embedded.tiny_model import tiny_model_dir
from services.spec import validate_spec
from services.train.parts import LearnerRankDied, launch_learner

pytestmark = pytest.mark.ray


def test_a_rank_whose_process_dies_fails_the_step_naming_it_and_stops_the_others(ray_session):
    learner = {"replicas": 2, "collective_timeout_s": 600}
    spec = validate_spec({"model": {"path": str(tiny_model_dir("tiny"))}, "data": {"train": "t"},
                          "train": {"eval_every": 0}, "cluster": {"learner": learner}})  # fmt: skip
    group = launch_learner(spec, spec.learner_config())
    group.wait_ready()
    batch = recorded_rollouts(5, n_steps=1)[0]
    group.train_step(batch)
    ranks = list(group.ranks)
    pid = ray.get(ranks[1].__ray_call__.remote(lambda _: os.getpid()))

    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(LearnerRankDied, match="learner rank 1 of 2 died"):
        group.train_step(batch)  # rank 0 waits in a collective for the dead rank
    assert time.monotonic() - started < 60
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(ranks[0].__ray_ready__.remote(), timeout=30)
    assert group.ranks == []
