"""The Ray edge of a training run: connecting, placing and starting the parts.

Plain classes (``Learner``, ``RewardServer``, ``RolloutPool``) become Ray actors
here and nowhere else. This module owns the resource defaults of the embedded
default (2 CPUs: fractional ``num_cpus`` and explicit thread counts, so nothing
waits for resources), GPU placement when the cluster has GPUs, custom resources
from the spec's ``cluster`` section, and the reward service's address: it binds
127.0.0.1 when it shares the driver's node and that node's address otherwise,
always with the run's fresh token.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

import ray

from learner import Learner, LearnerConfig
from reward import RewardServer, RewardSettings
from services.spec import JobSpec, Resources

log = logging.getLogger(__name__)

REWARD_ENV_PREFIX = "GRPO_REWARD_"


def connect(spec: JobSpec) -> None:
    """Join the cluster at ``cluster.ray_address``, or start a local Ray."""
    if ray.is_initialized():
        return
    address = spec.cluster.ray_address
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    log.info("Ray resources: %s", ray.cluster_resources())


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def actor_options(resources: Resources, *, default_cpus: float, default_gpus: float = 0) -> dict:
    """Ray actor options from a spec's ``Resources``, with the part's defaults."""
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus if resources.num_cpus is not None else default_cpus,
        "num_gpus": resources.num_gpus if resources.num_gpus is not None else default_gpus,
    }
    if resources.resources:
        options["resources"] = dict(resources.resources)
    return options


def cpu_threads(resources: Resources) -> int:
    """Threads for a CPU part: the spec's, else every core of this node."""
    return resources.threads or max(os.cpu_count() or 1, 1)


def start_learner(spec: JobSpec, config: LearnerConfig) -> Any:
    """The learner actor: one GPU when the cluster has GPUs, else a CPU share."""
    gpus = 1 if cluster_has_gpus() else 0
    options = actor_options(spec.cluster.learner, default_cpus=0.5, default_gpus=gpus)
    options["max_concurrency"] = 1
    actor = ray.remote(**options)(Learner).remote(
        spec.model.path,
        config,
        device="cuda" if options["num_gpus"] else "cpu",
        dtype=spec.model.dtype,
        seed=spec.seed,
        threads=cpu_threads(spec.cluster.learner),
    )
    ray.get(actor.__ray_ready__.remote())
    return actor


class RewardService:
    """The reward service inside a Ray actor; binds the right address for its node."""

    def __init__(self, token: str, driver_ip: str) -> None:
        node_ip = ray.util.get_node_ip_address()
        host = "127.0.0.1" if node_ip == driver_ip else node_ip
        settings = RewardSettings(host=host, port=0, token=token, log_level="warning")
        self.server = RewardServer(settings)
        self.url = self.server.start()
        self.node_ip = node_ip

    def address(self) -> tuple[str, str]:
        """``(url, node_ip)`` of the running service."""
        return self.url, self.node_ip

    def stop(self) -> None:
        self.server.stop()


def start_reward_service(spec: JobSpec) -> tuple[Any, str, str]:
    """Start the reward service with a fresh token: ``(actor, url, token)``."""
    token = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if k.startswith(REWARD_ENV_PREFIX)}
    env.pop(REWARD_ENV_PREFIX + "TOKEN", None)
    options = actor_options(spec.cluster.reward, default_cpus=0.25)
    options["runtime_env"] = {"env_vars": env}
    actor = ray.remote(**options)(RewardService).remote(token, ray.util.get_node_ip_address())
    url, node_ip = ray.get(actor.address.remote())
    log.info("reward service at %s (node %s)", url, node_ip)
    return actor, url, token
