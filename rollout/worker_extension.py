"""The one place that reaches into vLLM's worker: loading new weights in place.

vLLM mixes this class into its worker class when the engine is created with
``worker_extension_cls="rollout.worker_extension.WeightLoaderExtension"``; the
engine then calls its methods through ``LLM.collective_rpc``. Tensors passed as
``collective_rpc`` arguments arrive as lists, so the update travels as
safetensors bytes (see :mod:`rollout.weights`).

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


class WeightLoaderExtension:
    """Worker mix-in: ``grpo_load_weights(payload)``."""

    def grpo_load_weights(self, payload: bytes) -> dict[str, Any]:
        """Validate and load a safetensors payload; report what happened."""
        from rollout.weights import (
            WeightUpdateError,
            checkpoint_spec,
            deserialize_weights,
            read_header,
            validate_update,
        )

        start = time.perf_counter()
        try:
            spec = getattr(self, "_grpo_spec", None)
            if spec is None:
                spec = checkpoint_spec(self.model_config.model)
                self._grpo_spec = spec
            names = validate_update(read_header(payload), spec)
        except WeightUpdateError as exc:
            return {"ok": False, "error": str(exc)}
        tensors = deserialize_weights(payload)
        weights = ((name, tensors[name]) for name in names)
        self.model_runner.reload_weights(weights_iterator=weights)
        if spec.tied_embeddings:
            self._grpo_refresh_tied_head()
        seconds = time.perf_counter() - start
        logger.info("loaded %d tensors in %.3f s", len(names), seconds)
        return {"ok": True, "tensors": len(names), "seconds": seconds}

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
