"""The Ray edge of a training run: connecting, placing and starting the parts.

All placement policy lives here and nowhere else: the resource defaults of the
embedded default (2 CPUs: fractional ``num_cpus`` and explicit thread counts,
so nothing waits for resources), one GPU per engine and for the learner when
the cluster has GPUs, each engine's CPU threads and cores, custom resources
from the spec's ``cluster`` section, and the reward service's address (it binds
127.0.0.1 on the driver's node and that node's address elsewhere, always with
the run's fresh token). Plain classes (``Learner``, ``RewardServer``,
``RolloutPool``'s engines) become Ray actors here; the step loop sees only the
typed handles :class:`LearnerGroup` and :class:`Parts`.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner import DistContext, Learner, LearnerConfig
from reward import RewardClient, RewardClientError, RewardServer, RewardSettings
from reward.protocol import Item, Result
from rollout import BroadcastSender, BroadcastTransport, RolloutConfig, RolloutPool
from services.reward_urls import redact_url
from services.spec import JobSpec, LearnerResources, Resources

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


# ------------------------------------------------------------------ placement policy


def actor_options(resources: Resources, **defaults: Any) -> dict[str, Any]:
    """Ray actor options from a spec's ``Resources``; unset fields take ``defaults``."""
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


def learner_cpu_env() -> dict[str, str]:
    """``cpu_env``, and the learner's OpenMP threads spin briefly before they sleep
    (``GOMP_SPINCOUNT``; the driver's own setting wins): between the many short
    parallel regions of a step a passive thread sleeps and wakes, a short spin
    catches the next region, and it is too short to take the cores from the
    engines while the learner waits. Measured on the demo batch (2 cores): a learner
    step 1.08-1.12 s passive, 0.82-0.84 s with 100000 spins, 0.81-0.84 s with
    OpenMP's default; 10-step demo runs, passive → 100000 spins: step 2.17 → 1.93 s
    (median), training 0.83 → 0.68 s, reference log-probs 0.23 → 0.19 s, generation
    0.96 → 0.95 s."""
    key = "GOMP_SPINCOUNT"
    return {**cpu_env(), key: os.environ.get(key, "100000")}


def cpu_engine_runtime() -> dict[str, str]:
    """A CPU engine runs vLLM's engine core inside the actor's own process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; the driver's own setting wins): no second
    process that imports vLLM again and then busy-polls its shared-memory queues while
    the learner trains. bench/engine_runtime.py measured it on the demo's batch: engine
    creation 18-21 s → 2.5-2.8 s, generation 0.85 → 0.90 s; a 10-step demo run with
    ``rollout.enforce_eager`` went from 102 s to 70 s (steps 3.09 → 2.89 s). Preloading the venv's
    Intel OpenMP (vLLM's start-up advice) sped generation up only with the engine core
    in its own process, and slowed it in process, so it is not done; this machine has
    no tcmalloc."""
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    return {key: os.environ.get(key, "0")}


def cpu_engine_env(
    index: int, threads: int, cpu_ids: Sequence[int], *, bind: bool
) -> dict[str, str]:
    """Environment of CPU engine ``index``: its thread count and, if bound, its cores.

    Engines take consecutive blocks of ``threads`` cores from ``cpu_ids``
    (wrapping around when there are more threads than cores)."""
    env = {"OMP_NUM_THREADS": str(threads)}
    if not bind or not cpu_ids:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        return env
    cores: list[int] = []
    for k in range(threads):
        core = cpu_ids[(index * threads + k) % len(cpu_ids)]
        if core not in cores:
            cores.append(core)
    env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores)
    env["OMP_NUM_THREADS"] = str(len(cores))
    return env


@dataclass(frozen=True)
class CpuShare:
    """How this node's cores are shared out on CPU: the cores the engines take (in
    blocks, one per engine) and the threads of each learner rank."""

    engine_cores: list[int]
    learner_threads: int
    split: bool
    """Whether the engines and the learner have cores of their own (async on CPU)."""


def cpu_share(spec: JobSpec) -> CpuShare:
    """In sync mode the engines and the learner take turns, so each may use every core.
    In async mode they run at once; on CPU, unless ``rollout.threads`` or
    ``cluster.learner.threads`` is set, the engines then take the first half of the
    cores and the learner ranks share the rest. Measured on the demo (2 cores of an
    Intel Xeon, bench/step_breakdown.py): async 1.76 s a step on shared cores, 1.57 s
    split; sync 1.98 s (and 2.49 s split, which is why sync keeps every core). On an
    AMD EPYC (bench/trl_compare.py's settings): async split 2.10 s, sync 2.84 s."""
    cores = sorted(os.sched_getaffinity(0))
    learner = spec.cluster.learner
    split = (
        spec.train.mode == "async"
        and len(cores) >= 2
        and spec.rollout.threads is None
        and learner.threads is None
        and not (learner.num_gpus or spec.cluster.engines.num_gpus or cluster_has_gpus())
    )
    engine_cores = cores[: len(cores) // 2] if split else cores
    learner_cores = len(cores) - len(engine_cores) if split else len(cores)
    threads = learner.threads or max(1, learner_cores // learner.replicas)
    return CpuShare(engine_cores, threads, split)


def engine_placement(
    config: RolloutConfig, resources: Resources | None = None, cores: Sequence[int] = ()
) -> Callable[[int], dict[str, Any]]:
    """Ray actor options of engine ``index``: on a cluster with GPUs one GPU and one CPU
    per engine; otherwise half a CPU and explicit threads (``rollout.threads``, default
    ``cores``, or this node's, divided among the engines), each engine on its own cores.
    The spec's ``cluster.engines`` resources override the defaults; vLLM logs at
    WARNING unless ``VLLM_LOGGING_LEVEL`` says otherwise."""
    resources = resources or Resources()
    on_gpu = resources.num_gpus > 0 if resources.num_gpus is not None else cluster_has_gpus()
    defaults = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": 0.5}
    base = actor_options(resources, **defaults)
    cpu_ids = list(cores) or sorted(os.sched_getaffinity(0))
    threads = config.threads or max(1, len(cpu_ids) // config.engines)
    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")

    def options(index: int) -> dict[str, Any]:
        env = {"VLLM_LOGGING_LEVEL": level, **cpu_env()}
        if not on_gpu:
            env.update(cpu_engine_runtime())
            env.update(cpu_engine_env(index, threads, cpu_ids, bind=config.bind_threads))
        return {**base, "runtime_env": {"env_vars": env}}

    return options


def node_of(actor: Any) -> str:
    """The Ray node id an actor runs on."""
    return ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))


# ------------------------------------------------------------------------- learner


class LearnerRankDied(RuntimeError):
    """A learner rank's actor died; the group cannot go on (resume from a checkpoint)."""


class LearnerRank(Learner):
    """One learner rank as Ray runs it (the actor the group is made of). Rank 0 also holds
    the broadcast transport's weight sender, made on first use, on the learner's device
    (so NCCL on GPUs); :class:`rollout.ActorSenderLink` names the methods it calls."""

    weight_sender: BroadcastSender | None = None

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def weight_sender_endpoint(self) -> dict[str, Any]:
        if self.weight_sender is None:
            self.weight_sender = BroadcastSender(device=self.device.type)
        return self.weight_sender.endpoint

    def open_weight_group(self, prefix: str, world_size: int) -> None:
        self.weight_sender.open(prefix, world_size)

    def send_weights(self, version: int) -> dict[str, Any] | None:
        """Rank 0 broadcasts the gathered weights; the other ranks help gather them."""
        named = self.named_weights()  # a collective over the learner's ranks
        if self.weight_sender is None:
            for _ in named:
                pass
            return None
        return self.weight_sender.send(named, version)

    def weights_snapshot(self, version: int) -> bytes:
        return self.weight_sender.snapshot(version)


class LearnerGroup:
    """The learner's ranks behind one typed handle; the step loop makes no Ray calls.

    Every method is a collective: it calls all ranks together and returns rank 0's
    answer. A rank that dies fails the call at once with an error naming it (Ray's
    actor-death error, not a collective timeout), and the other ranks are stopped.
    """

    def __init__(
        self, ranks: Sequence[Any], placement_group: Any | None = None, *, broadcast: bool = False
    ) -> None:
        self.ranks = list(ranks)
        self.placement_group = placement_group
        self.broadcast = broadcast
        self._helpers: list[Any] = []  # the other ranks' share of the last broadcast

    def train_step(self, samples: Sequence[Any]) -> dict[str, float]:
        """One GRPO update on the step's samples (stored once, read by every rank)."""
        batch = ray.put(list(samples))
        return self._all("train_step", batch)[0]

    def sync_weights(self, pool: RolloutPool, version: int) -> None:
        """Make every engine serve the policy's current weights as ``version`` (by the
        pool's transport: this group is the broadcast transport's sender link)."""
        if self.broadcast:
            pool.update_weights(None, version)
            self._wait(self._helpers)
            self._helpers = []
            return
        exports = [rank.export_safetensors.remote() for rank in self.ranks]
        pool.update_weights(exports[0], version)  # rank 0 holds the gathered tensors
        self._wait(exports)

    # ------------------------------------------- rollout.broadcast.SenderLink

    @property
    def endpoint(self) -> dict[str, Any]:
        return ray.get(self.ranks[0].weight_sender_endpoint.remote())

    def open(self, prefix: str, world_size: int) -> Any:
        return self.ranks[0].open_weight_group.remote(prefix, world_size)

    def send(self, version: int) -> Any:
        self._helpers += [rank.send_weights.remote(version) for rank in self.ranks[1:]]
        return self.ranks[0].send_weights.remote(version)

    def snapshot(self, version: int) -> Any:
        return self.ranks[0].weights_snapshot.remote(version)

    def save_checkpoint(self, path: str) -> None:
        self._all("save_checkpoint", path)

    def load_checkpoint(self, path: str) -> None:
        self._all("load_checkpoint", path)

    def save_pretrained(self, path: str, tokenizer_dir: str) -> None:
        self._all("save_pretrained", path, tokenizer_dir)

    def node(self) -> str:
        return self._all("node")[0]

    def shutdown(self) -> None:
        for rank in self.ranks:
            quietly(lambda rank=rank: ray.kill(rank))
        if self.placement_group is not None:
            quietly(lambda: ray.util.remove_placement_group(self.placement_group))
        self.ranks, self.placement_group = [], None

    def wait_ready(self) -> None:
        """Wait until every rank has loaded its models; on failure stop the group."""
        try:
            self._wait([rank.__ray_ready__.remote() for rank in self.ranks])
        except BaseException:
            self.shutdown()
            raise

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._wait([getattr(rank, method).remote(*args) for rank in self.ranks])

    def _wait(self, refs: list[Any]) -> list[Any]:
        """Every rank's answer; the first rank found dead fails the call and the group."""
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as error:
                index = refs.index(ready[0])
                self.shutdown()
                raise LearnerRankDied(
                    f"learner rank {index} of {len(refs)} died ({error.__class__.__name__}); "
                    "the other ranks were stopped: resume the run from its last checkpoint"
                ) from error
        return ray.get(refs)


def launch_learner(spec: JobSpec, config: LearnerConfig) -> LearnerGroup:
    """``cluster.learner.replicas`` ranks in one placement group, forming one group: the
    ranks are placed and their actors started; ``LearnerGroup.wait_ready`` waits for
    them to have loaded the models (so the engines start meanwhile)."""
    learner = spec.cluster.learner
    group = ray.util.placement_group(
        [_rank_bundle(learner)] * learner.replicas, strategy=learner.strategy.upper()
    )
    try:
        ray.get(group.ready(), timeout=learner.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise RuntimeError(
            f"cluster.learner.replicas={learner.replicas}: Ray could not place "
            f"{learner.replicas} learner ranks of {_rank_bundle(learner)} each within "
            f"cluster.learner.start_timeout_s={learner.start_timeout_s:g} (the cluster has "
            f"{ray.available_resources()} free); lower replicas or their resources"
        ) from None
    contexts = _rank_contexts(learner, group)
    ranks = [_start_rank(spec, config, group, context) for context in contexts]
    return LearnerGroup(ranks, group, broadcast=weight_transport(spec) == "broadcast")


def weight_transport(spec: JobSpec) -> str:
    """``cluster.weight_transport`` resolved: ``auto`` is broadcast (bench/weight_sync.py:
    faster from the 2M demo model up, 7.3x at 100M on CPU; 4 ms slower at 0.3M)."""
    chosen = spec.cluster.weight_transport
    return "broadcast" if chosen == "auto" else chosen


def _rank_bundle(learner: LearnerResources) -> dict[str, float]:
    gpus = learner.num_gpus if learner.num_gpus is not None else float(cluster_has_gpus())
    cpus = learner.num_cpus if learner.num_cpus is not None else 0.5
    bundle = {"CPU": cpus, **learner.resources}
    return {**bundle, "GPU": gpus} if gpus else bundle


def _rank_contexts(learner: LearnerResources, group: Any) -> list[DistContext | None]:
    """Each rank's place in the group; one rank is a plain process (no group at all)."""
    if learner.replicas == 1:
        return [None]
    address, port = ray.get(_free_port.options(scheduling_strategy=_in(group, 0)).remote())
    return [
        DistContext(r, learner.replicas, address, port, "auto", learner.collective_timeout_s)
        for r in range(learner.replicas)
    ]


def _start_rank(spec: JobSpec, config: LearnerConfig, group: Any, context: Any) -> Any:
    learner = spec.cluster.learner
    bundle = _rank_bundle(learner)
    options = {
        "num_cpus": bundle["CPU"],
        "num_gpus": bundle.get("GPU", 0),
        "resources": dict(learner.resources),
        "max_concurrency": 1,
        "scheduling_strategy": _in(group, context.rank if context else 0),
        "runtime_env": {"env_vars": learner_cpu_env()},
    }
    threads = cpu_share(spec).learner_threads
    return ray.remote(**options)(LearnerRank).remote(
        spec.model.path,
        config,
        device="cuda" if options["num_gpus"] else "cpu",
        dtype=spec.model.dtype,
        seed=spec.seed,
        threads=threads,
        dist_context=context,
    )


def _in(group: Any, bundle: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)


@ray.remote(num_cpus=0)
def _free_port() -> tuple[str, int]:
    """This node's address and a port free on it, below the kernel's ephemeral range:
    ports there go to outgoing connections (Ray opens many) and one could take the port
    in the seconds before rank 0 listens on it."""
    address = ray.util.get_node_ip_address()
    first_ephemeral = _first_ephemeral_port()
    for port in random.sample(range(max(1024, first_ephemeral - 10_000), first_ephemeral), 100):
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return address, port
    raise RuntimeError("no free port for the learner group below the ephemeral port range")


def _first_ephemeral_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# -------------------------------------------------------------------------- reward


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


class RewardSource:
    """Where a run's rewards come from: the client of the service at ``reward.url``, or of
    the service the driver started (``reward.url: null``).

    ``score`` never raises for a service that is away: a call that still fails after the
    client's retries makes its items unscorable (status ``error``, the reason quoted), so
    the run goes on and the unscorable limits decide. A driver-started service whose actor
    died is restarted once, with a fresh token, and the call is made again.
    """

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.actor: Any | None = None
        self.restarted = False
        self.client = self._connect()

    @property
    def name(self) -> str:
        origin = "started by the driver" if self.spec.reward.url is None else "reward.url"
        return f"the reward service at {redact_url(self.client.url)} ({origin})"

    def score(self, items: Sequence[Item], *, job_id: str, step: int) -> list[Result]:
        try:
            return self.client.score(items, job_id=job_id, step=step)
        except RewardClientError as error:
            if self._restart_if_dead():
                return self.score(items, job_id=job_id, step=step)
            log.warning(
                "step %d: %s failed; its %d items are unscorable", step, self.name, len(items)
            )
            return [Result(id=i.id, status="error", error=str(error)) for i in items]

    def probe(self, item: Item) -> None:
        """Before the first step: ``/healthz`` answers and one item gets a result (a
        refused token or an unknown verifier fails the run here, not step by step)."""
        if not self.client.health():
            raise RewardSourceError(f"{self.name} does not answer GET /healthz")
        try:
            self.client.score([item], job_id=f"{self.spec.name}-probe", step=0)
        except RewardClientError as error:
            raise RewardSourceError(f"{self.name} refused a probe item: {error}") from None

    def close(self) -> None:
        quietly(self.client.close)
        if self.actor is not None:
            quietly(lambda: ray.get(self.actor.stop.remote(), timeout=30))
            quietly(lambda: ray.kill(self.actor))
            self.actor = None

    def _connect(self) -> RewardClient:
        reward = self.spec.reward
        if reward.url is None:
            self.actor, url, token = start_reward_service(self.spec)
        else:
            # The spec guarantees that reward.url has the origin the job API allowed
            # (reward.token_url); a local run's own spec is trusted as it is.
            url = reward.url
            token = os.environ.get(reward.token_env) if reward.token_env else None
        return RewardClient(url, token, timeout_s=reward.timeout_s)

    def _restart_if_dead(self) -> bool:
        if self.actor is None or self.restarted or _alive(self.actor):
            return False
        log.warning("%s died; starting a new one with a fresh token (once)", self.name)
        self.restarted = True
        quietly(self.client.close)
        quietly(lambda: ray.kill(self.actor))
        self.client = self._connect()
        return True


class RewardSourceError(RuntimeError):
    """The reward source cannot score this run's completions."""


def _alive(actor: Any) -> bool:
    try:
        ray.get(actor.address.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        return False
    return True


# --------------------------------------------------------------------------- parts


class StartupClock:
    """Seconds from the start of :func:`start_parts` until each part was ready, and
    ``before_parts``: the process's age then (imports, spec, data)."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        age = time.time() - psutil.Process().create_time()
        self.seconds: dict[str, Any] = {"before_parts": round(age, 2)}

    def mark(self, part: str) -> None:
        self.seconds[part] = round(time.perf_counter() - self.began, 2)

    def timed(self, part: str, start: Callable[..., Any]) -> Callable[..., Any]:
        """``start``, marking ``part`` when it returns."""

        def run(*args: Any) -> Any:
            started = start(*args)
            self.mark(part)
            return started

        return run


@dataclass
class Parts:
    """A run's started parts: the engine pool, the reward source and, for training,
    the learner; ``startup_s``: when each was ready (:class:`StartupClock`)."""

    pool: RolloutPool
    reward: RewardSource
    learner: LearnerGroup | None = None
    startup_s: dict[str, Any] = field(default_factory=dict)
    cpu_share: CpuShare | None = None

    def placement(self) -> dict[str, Any]:
        """Where each part runs: node ids, the reward service's URL, each node's address,
        and the start-up times."""
        actor = self.reward.actor
        engines = self.pool.process_infos()
        return {
            "learner": self.learner.node() if self.learner else None,
            "reward": node_of(actor) if actor is not None else None,
            "reward_url": self.reward.client.url if actor is not None else None,
            "engines": [info["node_id"] for info in engines],
            "nodes": {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]},
            "cpu_share": asdict(self.cpu_share) if self.cpu_share else None,
            "startup_s": {
                **self.startup_s,
                "engine_phases": [info["start_phases_s"] for info in engines],
            },
        }

    def shutdown(self) -> None:
        """Stop the engines, the reward service and the learner (each failure logged)."""
        quietly(self.pool.shutdown)
        quietly(self.reward.close)
        if self.learner is not None:
            quietly(self.learner.shutdown)


def start_parts(spec: JobSpec, *, with_learner: bool) -> Parts:
    """Connect to Ray, then start the reward service, the learner and the engine pool
    together: each loads in its own actors, so start-up waits for the slowest part (the
    engines), not for their sum."""
    clock = StartupClock()
    connect(spec)
    clock.mark("ray")
    share = cpu_share(spec)
    starter = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpo-start")
    reward_started = starter.submit(clock.timed("reward", RewardSource), spec)
    pool = learner = learner_ready = None
    try:
        if with_learner:
            learner = launch_learner(spec, spec.learner_config())
            learner_ready = starter.submit(clock.timed("learner", learner.wait_ready))
        pool = RolloutPool(
            spec.model.path,
            spec.rollout,
            dtype="float32" if spec.model.dtype == "auto" else spec.model.dtype,
            seed=spec.seed,
            placement=engine_placement(spec.rollout, spec.cluster.engines, share.engine_cores),
            transport=BroadcastTransport(learner) if learner and learner.broadcast else None,
            lora=engine_lora(spec),
        )
        clock.mark("engines")
        if learner_ready is not None:
            learner_ready.result()
        reward = reward_started.result()
    except BaseException:
        _stop_started(pool, learner, reward_started)
        raise
    finally:
        starter.shutdown(wait=True)
    return Parts(pool, reward, learner, startup_s=clock.seconds, cpu_share=share)


def engine_lora(spec: JobSpec) -> dict[str, Any] | None:
    """With ``model.lora``: the adapter config the engines serve (what the learner trains)."""
    if spec.model.lora is None:
        return None
    from learner.lora import adapter_config

    return adapter_config(spec.model.path, spec.model.lora)


def _stop_started(
    pool: RolloutPool | None, learner: LearnerGroup | None, reward_started: Future
) -> None:
    """Stop the parts that did start, after one of them failed to."""
    if pool is not None:
        quietly(pool.shutdown)
    if learner is not None:
        quietly(learner.shutdown)
    quietly(lambda: reward_started.result().close())


def quietly(action: Callable[[], Any]) -> None:
    """Run a shutdown action; log instead of raising (the part may already be gone)."""
    try:
        action()
    except Exception as error:  # shutdown must finish even when a part is already gone
        log.debug("ignored during shutdown: %s", error)
