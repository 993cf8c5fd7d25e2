"""Shared fixtures of the rollout tests: one Ray instance and one engine pool per session.

A vLLM engine costs 40-60 s to start on CPU, so every test that needs engines
uses the same ``rollout_pool`` (two engines on the "tiny" model); only the
kill test replaces an engine. The fixtures are session-scoped and prefixed
``rollout_`` so they can move up to ``tests/conftest.py`` unchanged.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def rollout_ray(ray_session):
    """The suite's one Ray instance (tests/conftest.py)."""
    return ray_session


@pytest.fixture(scope="session")
def rollout_tiny_model_dir():
    from services.embedded.tiny_model import tiny_model_dir

    return tiny_model_dir("tiny")


@pytest.fixture(scope="session")
def rollout_config():
    from rollout import RolloutConfig

    return RolloutConfig(
        engines=2,
        group_size=4,
        max_tokens=16,
        enforce_eager=True,
        kv_cache_gib=1,
        call_timeout_s=120,
        start_timeout_s=400,
    )


@pytest.fixture(scope="session")
def rollout_process_alive():
    """``alive(pid, create_time)``: whether that process still runs (zombies are dead)."""
    return _process_alive


@pytest.fixture(scope="session")
def rollout_pool(rollout_ray, rollout_tiny_model_dir, rollout_config):
    """Two engines on the tiny model; shut down (and checked for leftovers) at the end."""
    from rollout import RolloutPool
    from services.train.parts import engine_placement

    pool = RolloutPool(
        rollout_tiny_model_dir,
        rollout_config,
        dtype="float32",
        seed=0,
        placement=engine_placement(rollout_config),
    )
    yield pool
    infos = pool.process_infos()
    pool.shutdown()
    leftovers = [
        pid
        for info in infos
        for pid, created in [(info["pid"], info["create_time"]), *info["children"]]
        if _process_alive(pid, created)
    ]
    assert not leftovers, f"engine processes left after shutdown: {leftovers}"


def _process_alive(pid: int, created: float) -> bool:
    """Whether the process that had ``pid`` at ``created`` still runs (zombies are dead)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - created) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
