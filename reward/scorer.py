"""`RewardScorer`: the work behind every endpoint, as a plain class testable without HTTP.

It resolves each item's verifiers (the service's defaults when the item names none),
runs every verifier once over the items that use it (different verifiers concurrently),
and combines per item: the weighted sum of the verifiers' rewards, step rewards merged
by offset, and failure if any verifier failed. Results of `ok` items are kept in a small
LRU cache keyed by (job_id, step, id) and the item's content, so a retried batch is
answered without re-scoring; determinism does not depend on it, since verifiers are
deterministic.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from reward.errors import (
    BatchFailedError,
    ConfigurationError,
    TooManyItemsError,
    UnknownVerifierError,
)
from reward.metrics import RewardMetrics
from reward.protocol import (
    Item,
    OpenRLHFRequest,
    OpenRLHFResponse,
    Result,
    ScoreRequest,
    ScoreResponse,
    StepReward,
    VerifierInfo,
    VerifierRef,
    VerifiersResponse,
)
from reward.settings import RewardSettings
from reward.verifiers import Verifier, VerifierInput, VerifierOutput, build_registry

logger = logging.getLogger(__name__)

_CacheKey = tuple[str, int, str]


class ResultCache:
    """A bounded, thread-safe LRU of results keyed by (job_id, step, id) + content digest."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[_CacheKey, tuple[str, Result]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: _CacheKey, digest: str) -> Result | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != digest:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: _CacheKey, digest: str, result: Result) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._entries[key] = (digest, result)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def _digest(item: Item, refs: Sequence[VerifierRef]) -> str:
    payload = item.model_dump_json(exclude={"verifiers"}) + repr([(r.name, r.weight) for r in refs])
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


class RewardScorer:
    """Scores protocol-v1 requests (and OpenRLHF-format ones) with the configured verifiers.

    Call `start()` before scoring (it starts the math worker pool) and `close()` after.
    """

    def __init__(
        self,
        settings: RewardSettings,
        *,
        registry: dict[str, Verifier] | None = None,
        metrics: RewardMetrics | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self._threads = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="reward-verifier")
        # Custom functions get threads of their own: a fan-out thread waits on them.
        self._custom_threads = cf.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="reward-custom"
        )
        self.verifiers = (
            registry
            if registry is not None
            else build_registry(settings, threads=self._custom_threads)
        )
        unknown = [name for name in settings.default_verifiers if name not in self.verifiers]
        if unknown:
            raise ConfigurationError(
                f"default_verifiers {unknown} are not verifiers; valid: {sorted(self.verifiers)}"
            )
        self.default_refs = [VerifierRef(name=name) for name in settings.default_verifiers]
        self._cache = ResultCache(settings.cache_size)

    def start(self) -> None:
        """Start the default verifiers (others start on first use)."""
        for ref in self.default_refs:
            self.verifiers[ref.name].start()

    def close(self) -> None:
        for verifier in self.verifiers.values():
            try:
                verifier.close()
            except Exception:
                logger.exception("closing verifier %r failed", verifier.name)
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._custom_threads.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RewardScorer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def describe(self) -> VerifiersResponse:
        infos = [
            VerifierInfo(
                name=name,
                kind=v.kind,
                description=v.description,
                needs_reference=v.needs_reference,
                step_rewards=v.step_rewards,
            )
            for name, v in sorted(self.verifiers.items())
        ]
        return VerifiersResponse(verifiers=infos, default=list(self.settings.default_verifiers))

    def score(self, request: ScoreRequest) -> ScoreResponse:
        items = request.items
        if len(items) > self.settings.max_items:
            raise TooManyItemsError(
                f"request has {len(items)} items, over max_items={self.settings.max_items} "
                "(GRPO_REWARD_MAX_ITEMS); send smaller batches"
            )
        refs = [self._resolve(item) for item in items]
        results: list[Result | None] = [None] * len(items)
        keys: list[tuple[_CacheKey, str] | None] = [None] * len(items)
        if request.job_id is not None and request.step is not None:
            for i, item in enumerate(items):
                key = ((request.job_id, request.step, item.id), _digest(item, refs[i]))
                keys[i] = key
                results[i] = self._cache.get(*key)
        todo = [i for i, result in enumerate(results) if result is None]
        outputs = self._run_verifiers(items, refs, todo, request.job_id, request.step)
        for i in todo:
            result = combine(items[i].id, refs[i], outputs[i])
            results[i] = result
            if keys[i] is not None and result.status == "ok":
                self._cache.put(*keys[i], result)
        return ScoreResponse(results=[r for r in results if r is not None])

    def score_openrlhf(self, request: OpenRLHFRequest) -> OpenRLHFResponse:
        """Score an OpenRLHF `/get_reward` batch; raise BatchFailedError if any item fails."""
        labels = request.labels or [None] * len(request.query)
        failed: list[dict[str, object]] = []
        items: list[Item] = []
        positions: list[int] = []
        for i, (query, prompt, label) in enumerate(
            zip(request.query, request.prompts, labels, strict=True)
        ):
            if not query.startswith(prompt):
                failed.append(
                    {"index": i, "status": "error", "error": "query does not start with its prompt"}
                )
                continue
            items.append(
                Item(id=str(i), prompt=prompt, completion=query[len(prompt) :], reference=label)
            )
            positions.append(i)
        results = self.score(ScoreRequest(items=items)).results
        for position, result in zip(positions, results, strict=True):
            if result.status != "ok":
                failed.append({"index": position, "status": result.status, "error": result.error})
        if failed:
            raise BatchFailedError(sorted(failed, key=lambda entry: int(entry["index"])))
        rewards = [float(r.reward) for r in results if r.reward is not None]
        extra_logs = {
            ref.name: [float(r.details[ref.name]["reward"]) for r in results if r.details]
            for ref in self.default_refs
        }
        return OpenRLHFResponse(rewards=rewards, scores=list(rewards), extra_logs=extra_logs)

    def _resolve(self, item: Item) -> list[VerifierRef]:
        refs = item.verifiers or self.default_refs
        for ref in refs:
            if ref.name not in self.verifiers:
                raise UnknownVerifierError(
                    f"item {item.id!r} names unknown verifier {ref.name!r}; "
                    f"valid verifiers: {sorted(self.verifiers)}"
                )
        return refs

    def _run_verifiers(
        self,
        items: Sequence[Item],
        refs: Sequence[Sequence[VerifierRef]],
        todo: Sequence[int],
        job_id: str | None,
        step: int | None,
    ) -> dict[int, dict[str, VerifierOutput]]:
        """Run each needed verifier once over its items; outputs[i][name] per item."""
        by_verifier: dict[str, list[int]] = {}
        for i in todo:
            for ref in refs[i]:
                if i not in by_verifier.setdefault(ref.name, []):
                    by_verifier[ref.name].append(i)
        outputs: dict[int, dict[str, VerifierOutput]] = {i: {} for i in todo}

        def run(name: str, indices: list[int]) -> None:
            inputs = [_input(items[i]) for i in indices]
            for i, output in zip(indices, self._run_one(name, inputs, job_id, step), strict=True):
                outputs[i][name] = output

        if len(by_verifier) == 1:
            run(*next(iter(by_verifier.items())))
        else:
            futures = [self._threads.submit(run, name, idx) for name, idx in by_verifier.items()]
            for future in futures:
                future.result()
        return outputs

    def _run_one(
        self, name: str, inputs: list[VerifierInput], job_id: str | None, step: int | None
    ) -> list[VerifierOutput]:
        started = time.perf_counter()
        try:
            outputs = self.verifiers[name].score_batch(inputs, job_id=job_id, step=step)
            if len(outputs) != len(inputs):
                raise RuntimeError(f"returned {len(outputs)} outputs for {len(inputs)} inputs")
        except Exception as exc:
            logger.exception("verifier %r failed on a batch of %d", name, len(inputs))
            outputs = [VerifierOutput.failed(f"verifier {name!r} failed: {exc}")] * len(inputs)
        if self.metrics is not None:
            self.metrics.observe_verifier(
                name, [o.status for o in outputs], time.perf_counter() - started
            )
        return outputs


def _input(item: Item) -> VerifierInput:
    return VerifierInput(
        id=item.id,
        prompt=item.prompt,
        completion=item.completion,
        reference=item.reference,
        metadata=item.metadata,
        completion_ids=item.completion_ids,
    )


def combine(
    item_id: str, refs: Sequence[VerifierRef], outputs: dict[str, VerifierOutput]
) -> Result:
    """One item's result from its verifiers' outputs: weighted sum; fails if any failed."""
    details = {
        ref.name: {**(outputs[ref.name].details or {}), "status": outputs[ref.name].status}
        for ref in refs
    }
    failures = [(ref.name, outputs[ref.name]) for ref in refs if outputs[ref.name].status != "ok"]
    if failures:
        status = "error" if any(o.status == "error" for _, o in failures) else "timeout"
        error = "; ".join(f"{name}: {o.error or o.status}" for name, o in failures)
        return Result(id=item_id, status=status, details=details, error=error)
    reward = 0.0
    steps: dict[int, float] = {}
    has_steps = False
    for ref in refs:
        output = outputs[ref.name]
        reward += ref.weight * (output.reward or 0.0)
        details[ref.name]["reward"] = output.reward
        if output.step_rewards is not None:
            has_steps = True
            for end, value in output.step_rewards:
                steps[end] = steps.get(end, 0.0) + ref.weight * value
    if not math.isfinite(reward) or not all(map(math.isfinite, steps.values())):
        error = "the weighted sum of the verifiers' rewards overflows; use smaller weights"
        return Result(id=item_id, status="error", details=details, error=error)
    step_rewards = (
        [StepReward(end=end, reward=steps[end]) for end in sorted(steps)] if has_steps else None
    )
    return Result(
        id=item_id, status="ok", reward=reward, step_rewards=step_rewards, details=details
    )
