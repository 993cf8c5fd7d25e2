"""The learner's models: loading them, and their log-probabilities of completion tokens.

The policy (trainable) and the reference (frozen: no gradients, no optimizer
state) are loaded in float32 from a Hugging Face directory. With LoRA the
policy is the base model wrapped by PEFT (``learner.lora``) and the reference
is no second model: it is the policy with its adapter off (``as_reference``).
With N ranks each model is loaded on the CPU and then sharded with FSDP2 onto
the learner's device (``learner.distributed.shard_model``); on a GPU the
sharded reference is held in bf16. Log-probabilities are those of the
distribution the engines sample from, ``log_softmax(logits / temperature)``
(vLLM's ``processed_logprobs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from learner import lora as lora_adapter
from learner.batching import MicroBatch
from learner.config import LearnerConfig, LoraConfig
from learner.distributed import shard_model


def load_models(
    model_path: str, config: LearnerConfig, device: torch.device, *, sharded: bool
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The policy and, when the KL term is on (β > 0) without LoRA, the frozen reference."""
    checkpointing = config.gradient_checkpointing
    policy = load_model(
        model_path,
        device,
        frozen=False,
        sharded=sharded,
        gradient_checkpointing=checkpointing,
        lora=config.lora,
    )
    reference = None
    if config.algorithm.beta > 0 and config.lora is None:
        reference = load_model(model_path, device, frozen=True, sharded=sharded)
    return policy, reference


def load_model(
    model_path: str,
    device: torch.device,
    *,
    frozen: bool,
    sharded: bool,
    gradient_checkpointing: bool = False,
    lora: LoraConfig | None = None,
) -> torch.nn.Module:
    """The model at ``model_path``, in training (or, ``frozen``, evaluation) mode on ``device``.

    With ``lora`` it is wrapped with a fresh adapter, and only the adapter trains.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, trust_remote_code=False
    )
    model.to(torch.device("cpu") if sharded else device)
    if frozen:
        model.requires_grad_(False).eval()
        if sharded and device.type == "cuda":
            model.to(torch.bfloat16)
    else:
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if lora is not None:
            model = lora_adapter.wrap(model, model_path, lora)
        model.train()
    if sharded:
        shard_model(model, device)
    return model


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in evaluation mode (dropout off); its training mode is restored after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


@contextlib.contextmanager
def as_reference(
    policy: torch.nn.Module, reference: torch.nn.Module | None
) -> Iterator[torch.nn.Module]:
    """The reference model: ``reference``, or with LoRA (no ``reference``) the policy with
    its adapter off, in evaluation mode like a loaded reference."""
    if reference is not None:
        yield reference
        return
    with evaluation_mode(policy), policy.disable_adapter():
        yield policy


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

    Logits are computed only for the final positions that hold every completion
    position (``logits_to_keep``): the LM head and the softmax skip the prompts.
    ``autocast_dtype``: CUDA autocast to that dtype around the forward pass (None: off).
    """
    keep = batch.input_ids.shape[1] - batch.logits_start
    enabled = autocast_dtype is not None
    with torch.autocast("cuda", dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        output = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            logits_to_keep=keep,
        )
    positions = (batch.completion_positions - batch.logits_start).clamp(min=0)
    index = positions.unsqueeze(-1).expand(-1, -1, output.logits.shape[-1])
    selected = output.logits.gather(1, index).float() / temperature
    token_logits = selected.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    return token_logits - torch.logsumexp(selected, dim=-1)
