"""The one place that reaches into vLLM's worker: loading new weights in place.

vLLM mixes this class into its worker class when the engine is created with
``worker_extension_cls="rollout.worker_extension.WeightLoaderExtension"``; the
engine then calls its methods through ``LLM.collective_rpc``, which runs them
in every worker of the engine (each tensor-parallel rank). Updates arrive two
ways:

- ``grpo_load_weights(payload)``: safetensors bytes (the object-store
  transport; tensors passed as ``collective_rpc`` arguments would arrive as
  lists);
- ``grpo_join_weight_group(group)`` once per group, then
  ``grpo_receive_weights(version)`` per update: the broadcast transport. Each
  worker joins the learner's weight-sync group as its own rank
  (``rank_offset`` + its rank in the engine) and receives the **full** tensors;
  the model's ``load_weights`` shards them for its tensor-parallel rank as it
  does when reading a checkpoint (see :mod:`rollout.broadcast`).

The update is validated against the model's checkpoint before anything is
touched; a refused update returns an error message (the engine raises
:class:`rollout.weights.WeightUpdateError`) and the worker keeps serving the
weights it had. A valid update goes through
``model_runner.reload_weights(weights_iterator=...)``, vLLM's in-place
layerwise reload, which also redoes the CPU backend's weight packing.

Method names carry a ``grpo_`` prefix: vLLM refuses an extension whose
attributes clash with the worker's own.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)


class _HarmlessReloadWarnings(logging.Filter):
    """Drops vLLM's ``RotaryEmbedding: Failed to load weights`` and ``ParallelLMHead:
    Failed to load weights`` (two per update, from its layerwise reload), and only those.

    They are harmless: those layers have no weights of their own to load. The rotary
    embedding's cos/sin cache is a buffer computed from the config, and the tied LM
    head shares the embedding's weight, which ``_grpo_refresh_tied_head`` re-packs
    (an untied head receives its own tensor and never warns). The same warning for
    any other layer still shows."""

    LAYERS = ("RotaryEmbedding", "ParallelLMHead")

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        harmless = len(args) == 1 and args[0] in self.LAYERS
        return not (harmless and record.msg == "%s: Failed to load weights")


_RELOAD_LOGGER = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
if not any(isinstance(f, _HarmlessReloadWarnings) for f in _RELOAD_LOGGER.filters):
    _RELOAD_LOGGER.addFilter(_HarmlessReloadWarnings())


class WeightLoaderExtension:
    """Worker mix-in: safetensors payloads and broadcast updates, loaded in place."""

    def grpo_load_weights(self, payload: bytes) -> dict[str, Any]:
        """Validate and load a safetensors payload; report what happened."""
        from rollout.weights import (
            WeightUpdateError,
            deserialize_weights,
            read_header,
            validate_update,
        )

        start = time.perf_counter()
        spec = self._grpo_checkpoint_spec()
        try:
            names = validate_update(read_header(payload), spec)
        except WeightUpdateError as exc:
            return {"ok": False, "error": str(exc)}
        tensors = deserialize_weights(payload)
        return self._grpo_reload([(name, tensors[name]) for name in names], start)

    def grpo_join_weight_group(self, group: dict[str, Any]) -> int:
        """Join the learner's weight-sync group (``rollout.broadcast``); return this rank."""
        from rollout.broadcast import BroadcastReceiver

        workers = self.vllm_config.parallel_config.world_size
        if group["workers_per_engine"] != workers:
            raise ValueError(
                f"the broadcast transport counts {group['workers_per_engine']} worker(s) per "
                f"engine but this engine has {workers}; set the transport's workers_per_engine"
            )
        rank = group["rank_offset"] + self.rank
        self._grpo_receiver = None  # leave the previous group first
        self._grpo_receiver = BroadcastReceiver(group, rank, self.device)
        return rank

    def grpo_receive_weights(self, version: int) -> dict[str, Any]:
        """Receive one broadcast update as ``version`` and load it; report what happened.

        A refused header returns ``ok: False`` with the reason (every rank of the
        group refuses together); a broken transfer raises ``WeightSyncError``.
        Either way the model is untouched."""
        from rollout.weights import WeightUpdateError

        receiver = getattr(self, "_grpo_receiver", None)
        if receiver is None:
            raise RuntimeError("this worker has not joined a weight-sync group")
        start = time.perf_counter()
        try:
            weights = receiver.receive(self._grpo_checkpoint_spec(), version)
        except WeightUpdateError as exc:
            return {"ok": False, "error": str(exc)}
        return self._grpo_reload(weights, start)

    def _grpo_checkpoint_spec(self):
        from rollout.weights import checkpoint_spec

        spec = getattr(self, "_grpo_spec", None)
        if spec is None:
            spec = self._grpo_spec = checkpoint_spec(self.model_config.model)
        return spec

    def _grpo_reload(self, weights: list, start: float) -> dict[str, Any]:
        """vLLM's in-place layerwise reload of validated ``(name, tensor)`` pairs.

        ``seconds`` counts from ``start`` (the update's arrival), ``load_s`` the reload."""
        loading = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(weights))
        if self._grpo_checkpoint_spec().tied_embeddings:
            self._grpo_refresh_tied_head()
        done = time.perf_counter()
        logger.info("loaded %d tensors in %.3f s", len(weights), done - start)
        seconds = done - start
        return {"ok": True, "tensors": len(weights), "seconds": seconds, "load_s": done - loading}

    def _grpo_refresh_tied_head(self) -> None:
        # A tied lm_head shares the embedding tensor but receives no weights of its
        # own, so the layerwise reload skips its post-processing. On the CPU backend
        # that post-processing packs a private copy of the weight for the logits
        # GEMM: without redoing it, the logits keep using the old embeddings.
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod,
        )

        head = getattr(self.model_runner.get_model(), "lm_head", None)
        method = getattr(head, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod):
            method.process_weights_after_loading(head)
