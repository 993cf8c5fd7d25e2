"""One vLLM engine as a plain class: groups of completions in, records out.

:class:`RolloutEngine` owns a ``vllm.LLM`` (V1) and nothing else; it knows
nothing of Ray (the pool wraps it in an actor). It samples G completions per
question with one request of ``n=G``, reports each sampled token's
log-probability, and loads new weights in place through the worker extension
(:mod:`rollout.worker_extension`). With LoRA (``lora=``, a PEFT adapter config)
the base weights stay as loaded: each update is an adapter, and the engine
samples with the latest one (:mod:`rollout.lora`).

Log-probabilities are vLLM's ``processed_logprobs``: those of the distribution
actually sampled from, i.e. ``log_softmax(logits / temperature)`` (renormalised
over the nucleus when ``top_p < 1``; unscaled logits for greedy decoding).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rollout.config import RolloutConfig
from rollout.lora import vllm_lora_options
from rollout.records import GroupRequest, RolloutRecord, SamplingSpec
from rollout.weights import WeightUpdateError

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "rollout.worker_extension.WeightLoaderExtension"
_GIB = 1 << 30


class _LoRATokenizerWarning(logging.Filter):
    """Drops vLLM's "deprecated support for supporting different tokenizers for
    different LoRAs" warning (once per engine, at its first adapter request), and
    only it: the adapters here are built in memory and never bring a tokenizer,
    so the base model's is used, as intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "different tokenizers for different LoRAs" not in record.getMessage()


_INPUT_LOGGER = logging.getLogger("vllm.v1.engine.input_processor")
if not any(isinstance(f, _LoRATokenizerWarning) for f in _INPUT_LOGGER.filters):
    _INPUT_LOGGER.addFilter(_LoRATokenizerWarning())


class RolloutEngine:
    """A vLLM engine that samples groups and takes weight updates.

    ``weights_version`` starts at 0 (the weights in ``model_path``) and becomes
    the version given to each successful :meth:`load_weights`. ``vllm_options``
    are extra ``vllm.LLM`` keyword arguments (a transport's engine options, or
    anything a deployment needs, e.g. ``tensor_parallel_size``). On the CPU
    backend the engine's threads come from the process environment
    (``OMP_NUM_THREADS``, ``VLLM_CPU_OMP_THREADS_BIND``), which the pool sets.

    ``lora`` (the PEFT ``adapter_config.json`` content as a dict, e.g. from
    ``learner.lora.adapter_config``) starts vLLM with LoRA enabled
    (:func:`rollout.lora.vllm_lora_options`); every update is then an adapter
    of that config, and :meth:`generate` samples with the current one (none at
    version 0: the base model).
    """

    def __init__(
        self,
        model_path: str | Path,
        config: RolloutConfig,
        *,
        dtype: str = "float32",
        seed: int = 0,
        vllm_options: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        start = time.perf_counter()
        from vllm import LLM
        from vllm.platforms import current_platform

        imported = time.perf_counter()
        self.model_path = str(model_path)
        self.config = config
        on_cpu = current_platform.is_cpu()
        options: dict[str, Any] = {}
        if on_cpu:
            options["kv_cache_memory_bytes"] = config.kv_cache_gib * _GIB
            # vLLM 0.32 on CPU: when a prompt is prefilled in chunks, the step that
            # ends a partial chunk rewinds the request's seeded torch.Generator with
            # set_offset(), which CPU generators do not support ("CPU Generator does
            # not use offset") and the engine dies. Unchunked prefill never rewinds;
            # vLLM then raises max_num_batched_tokens to max_model_len itself.
            options["enable_chunked_prefill"] = False
        if lora is not None:
            options.update(vllm_lora_options(lora))
        options.update(vllm_options or {})
        self._llm = LLM(
            model=self.model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization or (0.05 if on_cpu else 0.85),
            enforce_eager=config.enforce_eager,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            **options,
        )
        if lora is not None:
            timeout = config.call_timeout_s
            self._llm.collective_rpc("grpo_set_adapter", args=(dict(lora),), timeout=timeout)
        self.lora = lora
        self._adapter: Any = None  # the LoRARequest generate samples with; None: no adapter
        self._tokenizer = self._llm.get_tokenizer()
        self._version = 0
        self.last_load: dict[str, Any] = {}  # what the workers reported for the last update
        created = time.perf_counter()
        self._warm_up()
        self.start_seconds = time.perf_counter() - start
        # Where start-up went: importing vLLM, creating the engine (model load, KV
        # cache, worker start), and the first generation.
        self.start_phases_s = {
            "import": round(imported - start, 2),
            "create": round(created - imported, 2),
            "warm_up": round(self.start_seconds - (created - start), 2),
        }
        logger.info("engine for %s ready in %.1f s", self.model_path, self.start_seconds)

    @property
    def weights_version(self) -> int:
        """Version of the weights the engine currently samples with."""
        return self._version

    def generate(
        self, requests: Sequence[GroupRequest], sampling: SamplingSpec
    ) -> list[list[RolloutRecord]]:
        """``sampling.n`` completions for each request, groups in request order."""
        if not requests:
            return []
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=self.prompt_token_ids(r)) for r in requests]
        params = [
            SamplingParams(
                n=sampling.n,
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                stop=list(sampling.stop) or None,
                ignore_eos=sampling.ignore_eos,
                logprobs=0,
                seed=r.seed,
            )
            for r in requests
        ]
        outputs = self._llm.generate(prompts, params, use_tqdm=False, lora_request=self._adapter)
        version = self._version
        return [_records(r, out, version) for r, out in zip(requests, outputs, strict=True)]

    def prompt_token_ids(self, request: GroupRequest) -> list[int]:
        """Token ids of a request's prompt: text as is, chat through the template."""
        if isinstance(request.prompt, str):
            return list(self._tokenizer.encode(request.prompt))
        text = self._tokenizer.apply_chat_template(
            request.prompt, tokenize=False, add_generation_prompt=True
        )
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def load_weights(self, payload: bytes, version: int) -> int:
        """Load a safetensors payload (see :mod:`rollout.weights`) and adopt ``version``.

        With LoRA the payload is the adapter's tensors (:func:`rollout.lora.adapter_spec`).

        A malformed payload raises :class:`WeightUpdateError` before anything
        changes (each worker validates it against its model before loading); the
        engine keeps serving its current weights and version.
        """
        results = self._llm.collective_rpc(
            "grpo_load_weights", args=(payload,), timeout=self.config.call_timeout_s
        )
        return self._adopt(results, version)

    def load_broadcast(self, version: int, group: dict[str, Any] | None = None) -> int:
        """Receive one update from the learner's weight-sync group and adopt ``version``.

        With ``group`` (from :class:`rollout.transport.BroadcastTransport`) every
        worker first joins that group. A refused header raises
        :class:`WeightUpdateError` and a broken transfer ``WeightSyncError``; in
        both cases the engine keeps serving its current weights and version.
        """
        timeout = self.config.call_timeout_s
        if group is not None:
            self._llm.collective_rpc("grpo_join_weight_group", args=(group,), timeout=timeout)
        results = self._llm.collective_rpc("grpo_receive_weights", args=(version,), timeout=timeout)
        return self._adopt(results, version)

    def _adopt(self, results: list[dict[str, Any]], version: int) -> int:
        """Serve ``version`` once every worker loaded it (``results`` of collective_rpc)."""
        refused = [r["error"] for r in results if not r["ok"]]
        if refused:
            raise WeightUpdateError(refused[0])
        # KV blocks cached under the old weights would be reused for new prompts.
        self._llm.reset_prefix_cache()
        if self.lora is not None:
            self._adapter = _adapter_request(results[0]["adapter_id"])
        self._version = version
        self.last_load = results[0]
        logger.info("weights version %d loaded in %.3f s", version, results[0]["seconds"])
        return version

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def _warm_up(self) -> None:
        # The first request that asks for log-probabilities compiles a small
        # kernel (seconds on CPU); pay it here rather than inside a timed call.
        self.generate([GroupRequest("warm-up", "0", seed=0)], SamplingSpec(n=2, max_tokens=2))


def _adapter_request(adapter_id: int) -> Any:
    """The request for an adapter the workers registered in memory: vLLM finds its id
    loaded and never reads the path, which only has to be non-empty."""
    from vllm.lora.request import LoRARequest

    name = f"grpo-adapter-{adapter_id}"
    return LoRARequest(lora_name=name, lora_int_id=adapter_id, lora_path=f"in-memory:{name}")


def _records(request: GroupRequest, output: Any, version: int) -> list[RolloutRecord]:
    records = []
    for index, completion in enumerate(sorted(output.outputs, key=lambda c: c.index)):
        token_ids = list(completion.token_ids)
        steps = completion.logprobs or []
        if len(steps) != len(token_ids):
            raise RuntimeError(
                f"vLLM returned {len(steps)} log-probabilities for {len(token_ids)} tokens "
                f"(group {request.group_id!r}, sample {index})"
            )
        records.append(
            RolloutRecord(
                group_id=request.group_id,
                sample_index=index,
                prompt_token_ids=list(output.prompt_token_ids),
                token_ids=token_ids,
                inference_logprobs=[step[t].logprob for step, t in zip(steps, token_ids)],
                text=completion.text,
                finish_reason=completion.finish_reason or "length",
                weights_version=version,
            )
        )
    return records
