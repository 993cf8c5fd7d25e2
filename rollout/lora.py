"""LoRA adapters as weight updates: how engines start for them, what a valid one is.

With an adapter config (the PEFT ``adapter_config.json`` content as a dict, as
``learner.lora.adapter_config`` makes it: ``r``, ``lora_alpha``,
``target_modules`` resolved to module names, ...) every weight update is an
adapter: only the ``lora_A``/``lora_B`` tensors, named as in PEFT's saved
``adapter_model.safetensors``
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``).

- :func:`adapter_spec` derives the tensors such an update must hold from the
  base checkpoint's headers and the config: for every 2-D ``<module>.weight``
  whose last name part is a target module, ``lora_A`` of shape ``[r, in]`` and
  ``lora_B`` of shape ``[out, r]``. Updates are validated against it with
  :func:`rollout.weights.validate_update`, like full weights.
- :func:`vllm_lora_options` gives the ``vllm.LLM`` arguments that serve one
  adapter at a time (see its docstring).

Pure (torch-free) except :func:`vllm_lora_options`, which reads vLLM's
accepted ranks and so runs where vLLM is already imported (the engine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rollout.weights import CheckpointSpec, TensorSpec

PEFT_PREFIX = "base_model.model."
ADAPTER_NAMING = "base_model.model.<module>.lora_A.weight and .lora_B.weight"


def check_adapter_config(config: Mapping[str, Any]) -> None:
    """Refuse an adapter config the engines cannot serve, naming the field to fix."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter config peft_type is {config['peft_type']!r}; only LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 512:
        raise ValueError(f"adapter config r must be an integer in 1..512, got {rank!r}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise ValueError(f"adapter config lora_alpha must be a number, got {alpha!r}")
    targets = config.get("target_modules")
    if (
        not isinstance(targets, list | tuple)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ValueError(
            f"adapter config target_modules must be a non-empty list of module names, got "
            f"{targets!r}; learner.lora.adapter_config resolves 'all-linear' to that list"
        )


def adapter_spec(checkpoint: CheckpointSpec, config: Mapping[str, Any]) -> CheckpointSpec:
    """The adapter tensors ``config`` implies for the model of ``checkpoint``.

    Raises ``ValueError`` when the config is malformed or names a target module
    that matches no linear weight of the model."""
    check_adapter_config(config)
    rank, targets = config["r"], set(config["target_modules"])
    tensors: dict[str, TensorSpec] = {}
    matched: set[str] = set()
    for name, base in checkpoint.tensors.items():
        module, _, leaf = name.rpartition(".")
        target = module.rpartition(".")[2]
        if leaf != "weight" or target not in targets or len(base.shape) != 2:
            continue
        out_features, in_features = base.shape
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = TensorSpec("F32", (rank, in_features))
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = TensorSpec("F32", (out_features, rank))
        matched.add(target)
    unmatched = sorted(targets - matched)
    if unmatched:
        raise ValueError(
            f"adapter config target_modules {unmatched} match no linear weight of the model; "
            "use module names of its layers (e.g. q_proj, v_proj)"
        )
    modules = ", ".join(sorted(targets))
    return CheckpointSpec(
        tensors=tensors,
        tied_embeddings=False,
        subject=f"LoRA adapter (r {rank})",
        naming=f"PEFT adapter names of modules {modules} ({ADAPTER_NAMING})",
    )


def max_lora_rank(rank: int, accepted: Sequence[int]) -> int:
    """The smallest of vLLM's ``accepted`` ``max_lora_rank`` values that is >= ``rank``."""
    fitting = [value for value in accepted if value >= rank]
    if not fitting:
        raise ValueError(
            f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({max(accepted)}); "
            "lower model.lora.rank"
        )
    return min(fitting)


def vllm_lora_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """``vllm.LLM`` arguments for serving this adapter config.

    ``max_lora_rank``: the smallest value vLLM accepts (its ``MaxLoRARanks``;
    1, 8, 16, 32, 64, 128, 256, 320, 512 in 0.32) that holds ``r``.
    ``max_loras`` 1: an engine samples with one adapter at a time.
    ``max_cpu_loras`` 2: an update registers the new adapter before it removes
    the old one, so a failure leaves the old one serving."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    check_adapter_config(config)
    return {
        "enable_lora": True,
        "max_lora_rank": max_lora_rank(config["r"], get_args(MaxLoRARanks)),
        "max_loras": 1,
        "max_cpu_loras": 2,
    }
