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
    """Join the cluster at ``cluster.ray_address`` (or ``RAY_ADDRESS``, which Ray's job
    system sets for the drivers it runs), or start a local Ray."""
    if ray.is_initialized():
        return
    address = spec.cluster.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray nices its workers to 15 by default; the engines and the learner are the
        # job's real work, so on the embedded default they run at normal priority.
        ray.init(
            include_dashboard=False,
            log_to_driver=True,
            _system_config={"worker_niceness": 0},
        )
    log.info("Ray resources: %s", ray.cluster_resources())


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def actor_options(resources: Resources, **defaults: float) -> dict[str, Any]:
    """Ray actor options from a spec's ``Resources``; unset fields take ``defaults``.

    Fields that are neither set nor defaulted are left out, so that the part's
    own defaults apply (the rollout pool picks a GPU per engine on GPU clusters).
    """
    options: dict[str, Any] = dict(defaults)
    if resources.num_cpus is not None:
        options["num_cpus"] = resources.num_cpus
    if resources.num_gpus is not None:
        options["num_gpus"] = resources.num_gpus
    if resources.resources:
        options["resources"] = dict(resources.resources)
    return options


def cpu_env() -> dict[str, str]:
    """OpenMP waits passively (unless ``OMP_WAIT_POLICY`` says otherwise): in sync mode
    the engines idle while the learner trains and the reverse, and spinning idle
    threads took the cores from the busy part (measured: 5.9 s → 3.2 s a demo step)."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def engine_actor_options(resources: Resources) -> dict[str, Any]:
    """Engine actor options: the spec's resources, passive OpenMP waits, and vLLM's log
    level (WARNING unless ``VLLM_LOGGING_LEVEL`` is set) so that a run's console shows
    progress, not engine chatter."""
    options = actor_options(resources)
    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    options["runtime_env"] = {"env_vars": {"VLLM_LOGGING_LEVEL": level, **cpu_env()}}
    return options


def node_of(actor: Any) -> str:
    """The Ray node id an actor runs on."""
    return ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))


def placement(learner: Any, reward_actor: Any | None, engine_nodes: list[str]) -> dict:
    """Where each part runs: node ids, the reward service's URL, and each node's address."""
    return {
        "learner": node_of(learner),
        "reward": node_of(reward_actor) if reward_actor is not None else None,
        "reward_url": _reward_url(reward_actor),
        "engines": engine_nodes,
        "nodes": {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]},
    }


def _reward_url(reward_actor: Any | None) -> str | None:
    return ray.get(reward_actor.address.remote())[0] if reward_actor is not None else None


def cpu_threads(resources: Resources) -> int:
    """Threads for a CPU part: the spec's, else every core of this node."""
    return resources.threads or max(os.cpu_count() or 1, 1)


def start_learner(spec: JobSpec, config: LearnerConfig) -> Any:
    """The learner actor: one GPU when the cluster has GPUs, else a CPU share."""
    gpus = 1 if cluster_has_gpus() else 0
    options = actor_options(spec.cluster.learner, num_cpus=0.5, num_gpus=gpus)
    options["max_concurrency"] = 1
    options["runtime_env"] = {"env_vars": cpu_env()}
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

    def __init__(self, token: str, driver_node_id: str) -> None:
        # Loopback only when this is the driver's own Ray node; any other node (even one
        # on the same machine, as in tests/test_multinode.py) binds its node address.
        node_ip = ray.util.get_node_ip_address()
        same_node = ray.get_runtime_context().get_node_id() == driver_node_id
        host = "127.0.0.1" if same_node else node_ip
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
    options = actor_options(spec.cluster.reward, num_cpus=0.25)
    options["runtime_env"] = {"env_vars": env}
    driver_node_id = ray.get_runtime_context().get_node_id()
    actor = ray.remote(**options)(RewardService).remote(token, driver_node_id)
    url, node_ip = ray.get(actor.address.remote())
    log.info("reward service at %s (node %s)", url, node_ip)
    return actor, url, token
