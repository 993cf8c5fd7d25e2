"""Session-wide fixtures: one local Ray instance shared by every test that needs Ray.

Ray's CPU count here is logical: the actors of the rollout pool, a training
driver (learner, reward service, engines) and the tests themselves all fit at
once without waiting, while the real threads are set per actor. Ray runs its
workers at niceness 15 by default; here they run at the tests' own priority, or
engines starve beside the test process.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=6,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            log_to_driver=False,
            _system_config={"worker_niceness": 0},
        )
    yield ray
    if started:
        ray.shutdown()
