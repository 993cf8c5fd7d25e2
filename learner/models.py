"""The learner's models: loading them, and their log-probabilities of completion tokens.

The policy (trainable) and the reference (frozen: no gradients, no optimizer
state) are loaded in float32 from a Hugging Face directory. With N ranks each
is loaded on the CPU and then sharded with FSDP2 onto the learner's device
(``learner.distributed.shard_model``); on a GPU the sharded reference is held
in bf16. Log-probabilities are those of the distribution the engines sample
from, ``log_softmax(logits / temperature)`` (vLLM's ``processed_logprobs``).
"""

from __future__ import annotations

import torch

from learner.batching import MicroBatch
from learner.config import LearnerConfig
from learner.distributed import shard_model


def load_models(
    model_path: str, config: LearnerConfig, device: torch.device, *, sharded: bool
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The policy and, when the KL term is on (β > 0), the frozen reference."""
    checkpointing = config.gradient_checkpointing
    policy = load_model(
        model_path, device, frozen=False, sharded=sharded, gradient_checkpointing=checkpointing
    )
    reference = None
    if config.algorithm.beta > 0:
        reference = load_model(model_path, device, frozen=True, sharded=sharded)
    return policy, reference


def load_model(
    model_path: str,
    device: torch.device,
    *,
    frozen: bool,
    sharded: bool,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """The model at ``model_path``, in training (or, ``frozen``, evaluation) mode on ``device``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, torch_dtype=torch.float32, trust_remote_code=False
    )
    model.to(torch.device("cpu") if sharded else device)
    if frozen:
        model.requires_grad_(False).eval()
        if sharded and device.type == "cuda":
            model.to(torch.bfloat16)
    else:
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
    if sharded:
        shard_model(model, device)
    return model


def pad_id(model: torch.nn.Module) -> int:
    """The pad token of ``model``'s config, else its end-of-sequence token, else 0."""
    config = model.config
    for candidate in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(candidate, int):
            return candidate
    return 0


def token_logprobs(
    model: torch.nn.Module,
    batch: MicroBatch,
    temperature: float,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Log-probabilities ``[B, C]`` of the completion tokens under ``model``.

    ``autocast_dtype``: CUDA autocast to that dtype around the forward pass (None: off).
    """
    enabled = autocast_dtype is not None
    with torch.autocast("cuda", dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    index = batch.completion_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    selected = logits.gather(1, index).float() / temperature
    token_logits = selected.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    return token_logits - torch.logsumexp(selected, dim=-1)
