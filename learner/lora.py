"""LoRA on the learner's side: the adapter's PEFT config, the wrapped policy, its tensors.

With ``model.lora`` the policy is the base model wrapped by PEFT: the base
weights are frozen (no gradients, no optimizer state) and only the adapter
matrices train. The reference model is the same module with the adapter
switched off (``learner.models.as_reference``), so no second copy of the base
exists.

``adapter_config`` is the contract with the engines: the PEFT
``adapter_config.json`` content, with ``target_modules`` resolved to the
sorted names of the decoder layers' linear modules it adapts (``all-linear``:
all of them, never ``lm_head``). It needs only the model's config (the model
is built on the meta device), so the driver can call it before anything
starts. The adapter leaves the learner as PEFT names its tensors in
``adapter_model.safetensors`` (no adapter name); ``final/`` is the base with
the adapter merged, and ``final/adapter/`` the adapter in PEFT's format.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peft
import torch
from torch.distributed.tensor import DTensor

from learner.config import LoraConfig
from learner.distributed import decoder_layers
from learner.weights import save_pretrained

ADAPTER_DIR = "adapter"
"""Where ``save_merged`` writes the adapter, inside the merged model's directory."""


def adapter_config(model_path: str, lora: LoraConfig) -> dict[str, Any]:
    """The PEFT ``adapter_config.json`` of ``lora`` on the model at ``model_path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return _config_of(model, str(model_path), lora)


def wrap(model: torch.nn.Module, model_path: str, lora: LoraConfig) -> peft.PeftModel:
    """``model`` with a fresh adapter (``lora_B`` is zero: the base model's outputs)."""
    config = peft.LoraConfig(**_config_of(model, model_path, lora))
    return peft.get_peft_model(model, config)


def _config_of(model: torch.nn.Module, model_path: str, lora: LoraConfig) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "bias": "none",
        "target_modules": _target_modules(model, lora),
    }


def _target_modules(model: torch.nn.Module, lora: LoraConfig) -> list[str]:
    """The sorted module names ``lora.target_modules`` means on ``model``."""
    linear = {
        name.rsplit(".", 1)[-1]
        for layer in decoder_layers(model)
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    if lora.target_modules == "all-linear":
        return sorted(linear)
    unknown = sorted(set(lora.target_modules) - linear)
    if unknown:
        raise ValueError(
            f"model.lora.target_modules: {', '.join(unknown)} is not a linear module of the "
            f"decoder layers of {type(model).__name__}; choose from {', '.join(sorted(linear))} "
            "or write all-linear"
        )
    return sorted(set(lora.target_modules))


def adapter_weights(model: torch.nn.Module, *, keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter's ``(name, full tensor)`` pairs in PEFT's naming; nothing where not ``keep``.

    Every rank must exhaust the iterator: with a sharded model each step is a collective.
    """
    for name, tensor in peft.get_peft_model_state_dict(model).items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if keep:
            yield name, full.detach()


def save_merged(
    adapter: dict[str, torch.Tensor],
    model_path: str,
    lora: LoraConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None,
) -> None:
    """The base at ``model_path`` with ``adapter`` merged into ``out_dir`` (a Hugging Face
    model directory), and the adapter in PEFT's format into ``out_dir/adapter``."""
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation leaves the RNG be
        model = wrap(_load_base(model_path), model_path, lora)
    peft.set_peft_model_state_dict(model, adapter)
    model.save_pretrained(Path(out_dir) / ADAPTER_DIR, safe_serialization=True)
    _save_merged_model(model, out_dir, tokenizer_dir)


def merge_adapter_dir(adapter_dir: str | Path, out_dir: str | Path) -> None:
    """The PEFT adapter in ``adapter_dir`` merged into its base model (the directory its
    ``adapter_config.json`` names), written as a Hugging Face model directory."""
    base_path = peft.PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base_path or not (Path(base_path) / "config.json").is_file():
        raise ValueError(
            f"{adapter_dir}/adapter_config.json names base model {base_path!r}, which is not "
            "a Hugging Face model directory here; fix base_model_name_or_path"
        )
    model = peft.PeftModel.from_pretrained(_load_base(base_path), str(adapter_dir))
    _save_merged_model(model, out_dir, base_path)


def _load_base(model_path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, trust_remote_code=False
    )


def _save_merged_model(
    model: peft.PeftModel, out_dir: str | Path, tokenizer_dir: str | Path | None
) -> None:
    save_pretrained(model.merge_and_unload(), out_dir, tokenizer_dir, rank=0, sharded=False)
