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

With LoRA (``grpo_set_adapter(config)`` once, at engine start) every update is
an adapter instead, validated against :func:`rollout.lora.adapter_spec`. It is
built in memory as a vLLM ``LoRAModel`` (``LoRAModel.from_lora_tensors``,
what vLLM's own loader does after reading an adapter directory) under a new
integer id, registered and activated in the worker's LoRA manager, and the
previous adapter is removed; the engine then samples with a ``LoRARequest`` of
that id, which vLLM finds registered and never loads from its path. The base
weights are never touched.

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
    """Worker mix-in: safetensors payloads and broadcast updates, loaded in place
    (or, with LoRA, swapped in as the serving adapter)."""

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
        return self._grpo_apply([(name, tensors[name]) for name in names], start)

    def grpo_set_adapter(self, config: dict[str, Any]) -> None:
        """Take every later update as a LoRA adapter of this PEFT config.

        Raises ``ValueError`` when vLLM cannot serve it on this model (a target
        module it has no LoRA layer for, a PEFT feature it lacks)."""
        from vllm.lora.peft_helper import PEFTHelper

        manager = self.model_runner.lora_manager
        unservable = sorted(set(config["target_modules"]) - _servable_modules(manager))
        if unservable:
            raise ValueError(
                f"vLLM cannot serve LoRA on modules {unservable} of this model; "
                f"it serves {sorted(_servable_modules(manager))}"
            )
        settings = {**config, "vllm_max_position_embeddings": manager.max_position_embeddings}
        helper = PEFTHelper.from_dict(settings)
        helper.validate_legal(manager.lora_config)
        self._grpo_adapter = helper
        self._grpo_adapter_config = dict(config)
        self._grpo_spec = None  # derived again, now for the adapter

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
        return self._grpo_apply(weights, start)

    def _grpo_checkpoint_spec(self):
        """What an update must hold: the checkpoint's tensors, or with LoRA the adapter's."""
        from rollout.lora import adapter_spec
        from rollout.weights import checkpoint_spec

        spec = getattr(self, "_grpo_spec", None)
        if spec is None:
            spec = checkpoint_spec(self.model_config.model)
            config = getattr(self, "_grpo_adapter_config", None)
            if config is not None:
                spec = adapter_spec(spec, config)
            self._grpo_spec = spec
        return spec

    def _grpo_apply(self, weights: list, start: float) -> dict[str, Any]:
        if getattr(self, "_grpo_adapter", None) is not None:
            return self._grpo_swap_adapter(weights, start)
        return self._grpo_reload(weights, start)

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

    def _grpo_swap_adapter(self, weights: list, start: float) -> dict[str, Any]:
        """Register and activate validated adapter tensors under a new id; drop the old.

        ``adapter_id`` in the report is the id to sample with (a ``LoRARequest``)."""
        loading = time.perf_counter()
        manager = self.model_runner.lora_manager
        previous = manager.list_adapters()
        adapter_id = max(previous, default=0) + 1
        lora = self._grpo_lora_model(adapter_id, weights)
        manager._adapter_manager.add_adapter(lora)
        manager._adapter_manager.activate_adapter(adapter_id)
        for old in previous:
            manager.remove_adapter(old)
        done = time.perf_counter()
        logger.info("adapter %d (%d tensors) in %.3f s", adapter_id, len(weights), done - start)
        return {
            "ok": True,
            "tensors": len(weights),
            "seconds": done - start,
            "load_s": done - loading,
            "adapter_id": adapter_id,
        }

    def _grpo_lora_model(self, adapter_id: int, weights: list):
        """A vLLM ``LoRAModel`` of ``(name, tensor)`` pairs, built as vLLM's loader does."""
        from vllm.lora.lora_model import LoRAModel

        manager = self.model_runner.lora_manager
        model = manager._adapter_manager.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        return LoRAModel.from_lora_tensors(
            adapter_id,
            # Copies: vLLM scales lora_B in place, and broadcast tensors are views
            # into buffers that the next update overwrites.
            {name: tensor.to("cpu", copy=True) for name, tensor in weights},
            peft_helper=self._grpo_adapter,
            device="cpu",
            dtype=manager.lora_config.lora_dtype,
            model_vocab_size=manager.vocab_size,
            weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
            skip_prefixes=getattr(model, "lora_skip_prefixes", None),
        )

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


def _servable_modules(manager: Any) -> set[str]:
    """Module names vLLM's LoRA manager has LoRA layers for (packed ones unpacked:
    ``qkv_proj`` serves ``q_proj``, ``k_proj``, ``v_proj``), as vLLM's loader reckons them."""
    adapters = manager._adapter_manager
    packed = adapters.packed_modules_mapping
    servable: set[str] = set()
    for module in adapters.supported_lora_modules:
        servable.update(packed.get(module, [module]))
    return servable
