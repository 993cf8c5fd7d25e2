"""N engine actors behind one object: spread groups, sync weights, replace failures.

:class:`RolloutPool` is the only part of ``rollout`` that knows Ray. Each engine
is a :class:`RolloutEngine` in its own actor (:class:`EngineActor`, which adds
what the pool needs to supervise it). The pool

- spreads the groups of a call over the engines in balanced contiguous chunks
  (a group never leaves its engine: one vLLM request with ``n=G``) and returns
  them in request order;
- updates weights all-or-nothing: a malformed update is refused before any
  engine changes; a valid one returns only once every engine serves it;
- watches every call with a timeout: an engine whose actor died, whose vLLM
  engine died, or that did not answer in ``call_timeout_s`` is killed, its
  processes reaped, and a new engine started that loads the current weights
  before it serves; its unfinished groups are issued again, so the caller sees
  each group exactly once.

The pool is driven from one thread. ``submit``/``collect`` let generation
overlap other work (the asynchronous training mode).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from rollout.config import RolloutConfig
from rollout.engine import RolloutEngine
from rollout.lora import adapter_spec
from rollout.records import GroupRequest, RolloutRecord, SamplingSpec
from rollout.transport import ObjectStoreTransport, WeightTransport
from rollout.weights import WeightUpdateError, checkpoint_spec

logger = logging.getLogger(__name__)


class EngineFailure(RuntimeError):
    """An engine can no longer serve (its vLLM engine died); the pool replaces it."""


class EngineActor(RolloutEngine):
    """A :class:`RolloutEngine` as the pool runs it inside a Ray actor.

    A replacement engine receives the pool's current weights in its constructor
    (``weights``/``weights_version``) and so never serves an older version.
    """

    def __init__(
        self, *args: Any, weights: bytes | None = None, weights_version: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)  # RolloutEngine's arguments
        if weights is not None:
            self.load_weights(weights, weights_version)

    def generate(self, requests, sampling):
        return self._guarded(super().generate, requests, sampling)

    def load_weights(self, payload, version):
        return self._guarded(super().load_weights, payload, version)

    def load_broadcast(self, version, group=None):
        return self._guarded(super().load_broadcast, version, group)

    def get_weights_version(self) -> int:
        return self.weights_version

    def process_info(self) -> dict[str, Any]:
        """This actor's pid, node, vLLM child processes (pid, start time) and start-up
        phases (``RolloutEngine.start_phases_s``)."""
        import psutil

        me = psutil.Process()
        return {
            "pid": me.pid,
            "create_time": me.create_time(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "children": [(c.pid, c.create_time()) for c in me.children(recursive=True)],
            "start_phases_s": self.start_phases_s,
        }

    @staticmethod
    def _guarded(fn, *args):
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return fn(*args)
        except EngineDeadError as exc:
            raise EngineFailure(f"vLLM engine died: {exc}") from exc


@dataclass
class _Slot:
    """One engine position in the pool; its actor changes when it is replaced."""

    index: int
    actor: Any
    generation: int
    ready: Any  # ObjectRef of process_info(), resolved once the engine serves
    info: dict[str, Any] | None = None


@dataclass
class _Call:
    slot: int
    generation: int
    start: int
    end: int
    ref: Any
    deadline: float


@dataclass
class GenerationHandle:
    """An in-flight :meth:`RolloutPool.submit`; pass it to :meth:`RolloutPool.collect`."""

    requests: list[GroupRequest]
    sampling: SamplingSpec
    calls: list[_Call] = field(default_factory=list)
    collected: bool = False


def split_balanced(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` chunks, sizes differing by at most one; no empty ones."""
    if n_parts < 1:
        raise ValueError(f"n_parts must be at least 1, got {n_parts}")
    base, extra = divmod(n_items, n_parts)
    chunks, start = [], 0
    for part in range(n_parts):
        size = base + (1 if part < extra else 0)
        if size:
            chunks.append((start, start + size))
        start += size
    return chunks


class RolloutPool:
    """``config.engines`` vLLM engines in Ray actors (see the module docstring).

    ``placement(index)`` gives the Ray actor options of engine ``index``
    (resources, ``runtime_env`` with its threads and cores): placement policy is
    the caller's (``services.train.parts.engine_placement``). Ray must be
    initialised by the caller. ``lora`` (a PEFT adapter config, see
    :class:`RolloutEngine`) makes every engine serve LoRA adapters: each update
    is an adapter, validated, loaded and rolled back like full weights.
    """

    def __init__(
        self,
        model_path: str | Path,
        config: RolloutConfig,
        *,
        placement: Callable[[int], dict[str, Any]],
        dtype: str = "float32",
        seed: int = 0,
        transport: WeightTransport | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        self.model_path = str(model_path)
        self.config = config
        self.dtype = dtype
        self.seed = seed
        self.transport = transport or ObjectStoreTransport()
        self.lora = lora
        self._spec = _local_spec(self.model_path, lora)
        self._placement = placement
        self._version = 0
        self._staged: Any = None
        self.restarts = 0
        self._slots = [self._start(i, generation=0) for i in range(config.engines)]
        try:
            self._wait_ready(self._slots)
        except BaseException:
            self.shutdown()
            raise

    # ----------------------------------------------------------------- generation

    def generate(
        self, requests: Sequence[GroupRequest], sampling: SamplingSpec
    ) -> list[list[RolloutRecord]]:
        """One group of ``sampling.n`` records per request, in request order."""
        return self.collect(self.submit(requests, sampling))

    def submit(self, requests: Sequence[GroupRequest], sampling: SamplingSpec) -> GenerationHandle:
        """Start generating and return at once; :meth:`collect` the handle later."""
        requests = list(requests)
        ids = [r.group_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("group_id values must be unique within one call")
        handle = GenerationHandle(requests, sampling)
        chunks = split_balanced(len(requests), len(self._slots))
        for slot, (start, end) in zip(self._slots, chunks, strict=False):
            handle.calls.append(self._issue(handle, slot, start, end))
        return handle

    def collect(self, handle: GenerationHandle) -> list[list[RolloutRecord]]:
        """Wait for a submitted call; replaces failed engines and re-issues their groups."""
        if handle.collected:
            raise RuntimeError("this GenerationHandle was already collected")
        done: dict[int, list[list[RolloutRecord]]] = {}
        retries: dict[int, int] = {}  # chunk start -> times re-issued
        pending = list(handle.calls)
        while pending:
            failed = self._poll(pending, done)
            for call in failed:
                retries[call.start] = retries.get(call.start, 0) + 1
                if retries[call.start] > self.config.max_retries:
                    raise RuntimeError(
                        f"groups {call.start}..{call.end - 1} failed {retries[call.start]} times "
                        "(engines kept dying or hanging; see the warnings above); "
                        "rollout.max_retries sets how many re-issues are allowed"
                    )
                self._replace_if_current(call.slot, call.generation)
            for call in failed:
                target = self._least_busy(pending, prefer=call.slot)
                pending.append(self._issue(handle, target, call.start, call.end))
        handle.collected = True
        return [group for start in sorted(done) for group in done[start]]

    def _poll(self, pending: list[_Call], done: dict[int, Any]) -> list[_Call]:
        """Wait for the next result or deadline; move finished calls into ``done`` and
        return (and remove from ``pending``) the calls whose engine failed or hung."""
        timeout = max(0.0, min(c.deadline for c in pending) - time.monotonic())
        ray.wait([c.ref for c in pending], num_returns=1, timeout=timeout)
        now = time.monotonic()
        failed = []
        for call in list(pending):
            if _is_ready(call.ref):
                pending.remove(call)
                try:
                    done[call.start] = ray.get(call.ref)
                except Exception as exc:
                    if not _is_engine_failure(exc):
                        raise
                    logger.warning("engine %d failed during generate: %s", call.slot, exc)
                    failed.append(call)
            elif call.deadline <= now:
                logger.warning("engine %d did not answer in time; replacing it", call.slot)
                pending.remove(call)
                failed.append(call)
        return failed

    # -------------------------------------------------------------------- weights

    def update_weights(self, update: Any, version: int) -> None:
        """Load ``update`` into every engine as ``version``; all-or-nothing.

        ``update`` is what the pool's transport takes: safetensors bytes or an
        ``ObjectRef`` to them for the default transport, ``None`` for the
        broadcast transport (the learner's sender holds the weights).

        Raises :class:`WeightUpdateError` for a malformed update, after which every
        engine still serves the previous version."""
        staged = self.transport.stage(update, self._spec)
        starting = not all(self._serving(s) for s in self._slots)
        loads = self.transport.load([s.actor for s in self._slots], staged, version)
        refs = {s.index: ref for s, ref in zip(self._slots, loads, strict=True)}
        generations = {s.index: s.generation for s in self._slots}
        limit = self.config.call_timeout_s + (self.config.start_timeout_s if starting else 0.0)
        outcome = self._wait_loads(refs, staged, version, generations, limit)
        self.transport.finish(staged)
        if outcome is not None:
            self._roll_back(outcome)
            raise outcome
        self._staged, self._version = staged, version

    def weights_versions(self) -> list[int]:
        """The version each engine serves (all equal outside an update)."""
        refs = [s.actor.get_weights_version.remote() for s in self._slots]
        return ray.get(refs, timeout=self.config.call_timeout_s)

    @property
    def weights_version(self) -> int:
        """The version the pool serves (the last successful update, 0 at start)."""
        return self._version

    # ------------------------------------------------------------------ lifecycle

    def process_infos(self) -> list[dict[str, Any]]:
        """Pid, node and vLLM child processes of each engine (for tests and debugging)."""
        for slot in self._slots:
            if slot.info is None:
                slot.info = ray.get(slot.ready, timeout=self.config.call_timeout_s)
        return [dict(s.info or {}) for s in self._slots]

    def shutdown(self) -> None:
        """Stop every engine, then kill whatever vLLM processes they left behind."""
        slots, self._slots = list(getattr(self, "_slots", [])), []
        closing = [(s, s.actor.close.remote()) for s in slots]
        for slot, ref in closing:
            try:
                ray.get(ref, timeout=30)
            except Exception as exc:  # already dead or hung: killing it below is enough
                logger.debug("engine %d did not close cleanly: %s", slot.index, exc)
        for slot in slots:
            self._kill(slot)
        self._staged = None

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ internals

    def _start(self, index: int, generation: int) -> _Slot:
        # The pool supervises and replaces its engines itself, one call at a time each.
        options = {**self._placement(index), "max_restarts": 0, "max_concurrency": 1}
        extra = self.transport.restore(self._staged, self._version) if self._version else {}
        actor = (
            ray.remote(EngineActor)
            .options(**options)
            .remote(
                self.model_path,
                self.config,
                dtype=self.dtype,
                seed=self.seed + index,
                lora=self.lora,
                **extra,
            )
        )
        return _Slot(index, actor, generation, ready=actor.process_info.remote())

    def _wait_ready(self, slots: list[_Slot]) -> None:
        for slot in slots:
            try:
                slot.info = ray.get(slot.ready, timeout=self.config.start_timeout_s)
            except GetTimeoutError as exc:
                raise RuntimeError(
                    f"engine {slot.index} did not start within rollout.start_timeout_s="
                    f"{self.config.start_timeout_s}; raise it or check the actor's log"
                ) from exc

    def _issue(self, handle: GenerationHandle, slot: _Slot, start: int, end: int) -> _Call:
        limit = self.config.call_timeout_s
        if not self._serving(slot):
            limit += self.config.start_timeout_s  # a replacement is still starting
        ref = slot.actor.generate.remote(handle.requests[start:end], handle.sampling)
        return _Call(slot.index, slot.generation, start, end, ref, time.monotonic() + limit)

    def _least_busy(self, pending: list[_Call], prefer: int) -> _Slot:
        """A serving engine with the fewest calls in flight (``prefer`` if none serves)."""
        serving = [s for s in self._slots if self._serving(s)]
        if not serving:
            return self._slots[prefer]
        load = {s.index: sum(c.slot == s.index for c in pending) for s in serving}
        return min(serving, key=lambda s: (load[s.index], s.index != prefer))

    @staticmethod
    def _serving(slot: _Slot) -> bool:
        """Whether the slot's engine has started (and record its processes if so)."""
        if slot.info is not None:
            return True
        if not _is_ready(slot.ready):
            return False
        try:
            slot.info = ray.get(slot.ready, timeout=0)
        except Exception:
            return False  # it died while starting; its next call fails and is handled
        return True

    def _replace_if_current(self, index: int, generation: int) -> None:
        slot = self._slots[index]
        if slot.generation != generation:
            return  # already replaced after an earlier failure
        self._kill(slot)
        self.restarts += 1
        logger.warning("starting a replacement for engine %d (version %d)", index, self._version)
        self._slots[index] = self._start(index, generation + 1)

    def _kill(self, slot: _Slot) -> None:
        self._serving(slot)  # records the engine's processes if it got far enough to report
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception as exc:
            logger.debug("ray.kill of engine %d: %s", slot.index, exc)
        if slot.info is not None:
            reap(slot.info)

    def _wait_loads(
        self,
        refs: dict[int, Any],
        staged: Any,
        version: int,
        generations: dict[int, int],
        limit: float,
    ) -> WeightUpdateError | None:
        """Wait for every engine's load; replace failed ones; return a refusal if any."""
        deadline = time.monotonic() + limit
        refused: WeightUpdateError | None = None
        attempts = dict.fromkeys(refs, 0)
        pending = dict(refs)
        while pending:
            timeout = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout)
            for index, ref in list(pending.items()):
                if ref not in ready and time.monotonic() < deadline:
                    continue
                del pending[index]
                error = self._load_error(ref) if ref in ready else TimeoutError("timed out")
                if error is None:
                    continue
                if isinstance(error, WeightUpdateError):
                    refused = refused or error
                    continue
                attempts[index] += 1
                if attempts[index] > self.config.max_retries + 1:
                    raise RuntimeError(
                        f"engine {index} could not load weights version {version}: {error}"
                    )
                pending[index] = self._retry_load(index, staged, version, generations, error)
                deadline = max(deadline, time.monotonic() + self._restart_budget())
        return refused

    @staticmethod
    def _load_error(ref: Any) -> Exception | None:
        try:
            ray.get(ref)
        except Exception as exc:
            cause = exc.cause if isinstance(exc, RayTaskError) else exc
            if isinstance(cause, WeightUpdateError):
                return WeightUpdateError(*cause.args)
            return exc
        return None

    def _retry_load(
        self, index: int, staged: Any, version: int, generations: dict[int, int], error: Any
    ) -> Any:
        slot = self._slots[index]
        if not _is_engine_failure(error) and slot.generation == generations[index]:
            generations[index] = -1  # one retry on the same engine, then replace it
            logger.warning("engine %d failed to load weights (%s); retrying once", index, error)
            return self.transport.load([slot.actor], staged, version)[0]
        logger.warning("engine %d failed to load weights (%s); replacing it", index, error)
        self._kill(slot)
        self.restarts += 1
        previous = (self._staged, self._version)
        self._staged, self._version = staged, version  # the replacement starts at `version`
        try:
            self._slots[index] = self._start(index, slot.generation + 1)
        finally:
            self._staged, self._version = previous
        return self._slots[index].actor.get_weights_version.remote()

    def _roll_back(self, error: WeightUpdateError) -> None:
        """After a refusal, put any engine that did load back on the previous version.

        Engines validate against the same checkpoint, so either all refuse or none
        does; this only matters if an engine was replaced in the middle of the update."""
        for slot in list(self._slots):
            try:
                served = ray.get(
                    slot.actor.get_weights_version.remote(), timeout=self._restart_budget()
                )
            except Exception:
                served = None
            if served != self._version:
                logger.warning(
                    "engine %d is not on version %d; restoring it", slot.index, self._version
                )
                self._replace_if_current(slot.index, slot.generation)
        self._wait_ready(self._slots)
        logger.warning("weight update refused: %s", error)

    def _restart_budget(self) -> float:
        return self.config.start_timeout_s + self.config.call_timeout_s


def reap(info: dict[str, Any]) -> list[int]:
    """Kill an engine actor's recorded process and its vLLM children; return the pids killed.

    A pid is only killed if its start time matches the recorded one (pids get
    reused). Processes on another node are reaped by a task pinned to that node (none
    if the node is gone: its processes went with it)."""
    targets = [(info["pid"], info["create_time"]), *info.get("children", [])]
    node = info.get("node_id")
    if node is not None and node != ray.get_runtime_context().get_node_id():
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        task = ray.remote(num_cpus=0)(_kill_processes).options(scheduling_strategy=strategy)
        try:
            return ray.get(task.remote(targets), timeout=60)
        except ray.exceptions.TaskUnschedulableError:
            return []  # the node is gone, and its processes with it
    return _kill_processes(targets)


def _kill_processes(targets: list[tuple[int, float]]) -> list[int]:
    import psutil

    procs = []
    for pid, created in targets:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1e-3:
                proc.kill()
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


def _is_engine_failure(exc: BaseException) -> bool:
    """True when an error means the engine is gone or unusable (replace it), False for
    an error of the call itself (a bad request), which goes back to the caller."""
    if isinstance(exc, RayTaskError):
        return isinstance(exc.cause, EngineFailure)
    return isinstance(exc, RayError | EngineFailure | TimeoutError)


def _is_ready(ref: Any) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def _local_spec(model_path: str, lora: dict[str, Any] | None):
    """The checkpoint's spec (with LoRA: the adapter's) if the driver can read the model
    directory, else None (each engine still validates before it changes anything)."""
    try:
        spec = checkpoint_spec(model_path)
    except (FileNotFoundError, OSError):
        logger.info("model directory %s not readable here; engines validate updates", model_path)
        return None
    return spec if lora is None else adapter_spec(spec, lora)
