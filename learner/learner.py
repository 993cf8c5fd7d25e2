"""The learner: the policy, its frozen reference, and the GRPO update.

``Learner`` is a plain class (the driver wraps it as a Ray actor, with a GPU
when there is one). It owns the policy and reference models loaded from a
Hugging Face directory, the optimizer and learning-rate schedule, the
micro-batched GRPO update with gradient accumulation, the export of weights
in Hugging Face naming for the rollout engines, and its part of a checkpoint.

Log-probabilities are those of the distribution the engines sample from:
``log_softmax(logits / temperature)``, matching vLLM's ``processed_logprobs``.
With one update per step the old policy is the current one, so its
log-probabilities come from the training forward pass itself (ρ = 1) and no
extra forward pass is spent; with several updates they are computed once,
before the first.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from learner.batching import MicroBatch, TrainSample, collate, split_by_tokens
from learner.config import LearnerConfig
from learner.grpo import grpo_loss, masked_mean, truncated_is_weights

log = logging.getLogger(__name__)

_SUMMED_METRICS = ("loss/policy",)
_TOKEN_WEIGHTED_METRICS = (
    "train/inference_logprob_abs_diff",
    "loss/kl",
    "loss/clip_frac_low",
    "loss/clip_frac_high",
    "loss/ratio_mean",
)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Compute dtype: ``auto`` is bfloat16 on GPUs and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class Learner:
    """Policy + reference model + optimizer; one ``train_step`` per GRPO step."""

    def __init__(
        self,
        model_path: str,
        config: LearnerConfig,
        *,
        device: str = "auto",
        dtype: str = "auto",
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.config = config
        self.device = resolve_device(device)
        self.compute_dtype = resolve_dtype(dtype, self.device)
        self.policy = _load_model(model_path, self.device)
        self.reference = _load_model(model_path, self.device) if config.algorithm.beta > 0 else None
        if self.reference is not None:
            self.reference.requires_grad_(False).eval()
        if config.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.policy.train()
        self.pad_id = _pad_id(self.policy)
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        # A plain function, not a bound method: LambdaLR's state_dict stores the
        # __dict__ of non-function schedules, and Ray decorates actor methods.
        schedule = functools.partial(_warmup_factor, warmup=config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.steps_done = 0
        self._logprob_seconds = 0.0

    # ------------------------------------------------------------------ update

    def train_step(self, samples: Sequence[TrainSample]) -> dict[str, float]:
        """One GRPO step on a batch of completions: ``updates_per_step`` optimizer updates."""
        if not samples:
            raise ValueError("train_step got an empty batch; the driver must skip such steps")
        lr = self.scheduler.get_last_lr()[0]
        self._logprob_seconds = 0.0
        old_logprobs = self._old_logprobs(samples) if self.config.updates_per_step > 1 else None
        updates = []
        for minibatch in _minibatches(len(samples), self.config.updates_per_step):
            chosen = [samples[i] for i in minibatch]
            old = [old_logprobs[i] for i in minibatch] if old_logprobs is not None else None
            updates.append(self._update(chosen, old))
        self.scheduler.step()
        self.steps_done += 1
        metrics = {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]}
        return {**metrics, "train/lr": lr, "time/logprob_s": self._logprob_seconds}

    def _update(
        self, samples: Sequence[TrainSample], old_logprobs: list[torch.Tensor] | None
    ) -> dict[str, float]:
        """One optimizer update over a mini-batch, accumulated over micro-batches."""
        normalizer = self._normalizer(samples)
        totals = _MetricTotals()
        self.optimizer.zero_grad(set_to_none=True)
        for indices in split_by_tokens(samples, self.config.micro_batch_tokens):
            batch = collate(samples, indices, self.pad_id).to(self.device)
            old = _stack_rows([old_logprobs[i] for i in indices], batch) if old_logprobs else None
            loss, metrics = self._micro_loss(batch, old, normalizer)
            loss.backward()
            totals.add(metrics, tokens=float(batch.loss_mask.sum()))
        grad_norm = self._clip_and_step()
        return {**totals.result(), "train/grad_norm": grad_norm}

    def _micro_loss(
        self, batch: MicroBatch, old_logprobs: torch.Tensor | None, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        algorithm = self.config.algorithm
        logprobs = self._logprobs(self.policy, batch)
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        ref = None
        if self.reference is not None:
            start = time.perf_counter()
            with torch.no_grad():
                ref = self._logprobs(self.reference, batch)
            self._logprob_seconds += time.perf_counter() - start
        is_weights = None
        if algorithm.tis_cap is not None:
            is_weights = truncated_is_weights(old, batch.inference_logprobs, algorithm.tis_cap)
        loss, metrics = grpo_loss(
            logprobs,
            old,
            ref,
            batch.advantages,
            batch.loss_mask,
            clip_low=algorithm.clip_low,
            clip_high=algorithm.clip_high,
            beta=algorithm.beta,
            kl=algorithm.kl,
            agg=algorithm.agg,
            max_len=self.config.max_len,
            is_weights=is_weights,
            normalizer=normalizer,
        )
        mismatch = (old.detach() - batch.inference_logprobs).abs()
        metrics["train/inference_logprob_abs_diff"] = float(masked_mean(mismatch, batch.loss_mask))
        return loss, metrics

    def _normalizer(self, samples: Sequence[TrainSample]) -> float:
        """The full mini-batch's count, so that micro-batch losses sum to its loss."""
        if self.config.algorithm.agg == "token_mean":
            return float(max(sum(len(s.token_ids) for s in samples), 1))
        return float(max(sum(1 for s in samples if len(s.token_ids)), 1))

    def _clip_and_step(self) -> float:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.config.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        return float(grad_norm)

    # ------------------------------------------------------------- log-probs

    def _logprobs(self, model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
        """Log-probabilities ``[B, C]`` of the completion tokens under ``model``."""
        autocast = torch.autocast("cuda", dtype=self.compute_dtype, enabled=self._autocast)
        with autocast:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        index = batch.completion_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        selected = logits.gather(1, index).float() / self.config.temperature
        token_logits = selected.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        return token_logits - torch.logsumexp(selected, dim=-1)

    @property
    def _autocast(self) -> bool:
        return self.device.type == "cuda" and self.compute_dtype != torch.float32

    @torch.no_grad()
    def _old_logprobs(self, samples: Sequence[TrainSample]) -> list[torch.Tensor]:
        """Per-sample log-probabilities under the policy before any update of this step."""
        start = time.perf_counter()
        rows: list[torch.Tensor] = [torch.empty(0)] * len(samples)
        for indices in split_by_tokens(samples, self.config.micro_batch_tokens):
            batch = collate(samples, indices, self.pad_id).to(self.device)
            logprobs = self._logprobs(self.policy, batch)
            for row, index in enumerate(indices):
                rows[index] = logprobs[row, : len(samples[index].token_ids)]
        self._logprob_seconds += time.perf_counter() - start
        return rows

    @torch.no_grad()
    def compute_logprobs(self, samples: Sequence[TrainSample]) -> list[list[float]]:
        """The policy's log-probabilities of each sample's tokens (``trainer_logprobs``)."""
        return [row.tolist() for row in self._old_logprobs(samples)]

    # ---------------------------------------------------------------- weights

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` pairs in Hugging Face naming; tied tensors appear once."""
        seen: set[int] = set()
        for name, tensor in self.policy.state_dict().items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            yield name, tensor.detach()

    def export_safetensors(self, dtype: str | None = None) -> bytes:
        """The policy's weights as safetensors bytes (the rollout transport's payload)."""
        target = getattr(torch, dtype) if dtype else None
        tensors = {
            name: (t.to(target) if target else t).contiguous().cpu().clone()
            for name, t in self.named_weights()
        }
        return safetensors_bytes(tensors)

    def weights_digest(self) -> str:
        """SHA-256 of the exported weights: equal digests mean identical policies."""
        return hashlib.sha256(self.export_safetensors()).hexdigest()

    # ------------------------------------------------------------ checkpoints

    def save_pretrained(self, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> None:
        """Write the policy as a Hugging Face model directory (safetensors)."""
        self.policy.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)

    def save_checkpoint(self, out_dir: str | Path) -> None:
        """Model, optimizer, schedule and RNG states into ``out_dir`` (made by the caller)."""
        out = Path(out_dir)
        self.policy.save_pretrained(out / "model", safe_serialization=True)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "steps_done": self.steps_done,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            out / "learner_state.pt",
        )

    def load_checkpoint(self, in_dir: str | Path) -> None:
        """Restore what ``save_checkpoint`` wrote; the next step continues exactly."""
        from safetensors.torch import load_file

        source = Path(in_dir)
        weights = load_file(source / "model" / "model.safetensors", device=str(self.device))
        missing, unexpected = self.policy.load_state_dict(weights, strict=False)
        if unexpected or [m for m in missing if not _is_tied(self.policy, m)]:
            raise ValueError(f"checkpoint {source} does not fit the model: {missing or unexpected}")
        state = torch.load(source / "learner_state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = state["steps_done"]
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])


class _MetricTotals:
    """Combines micro-batch metrics: the policy loss sums, the rest weigh by tokens."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.tokens = 0.0

    def add(self, metrics: dict[str, float], tokens: float) -> None:
        for key in _SUMMED_METRICS:
            self.sums[key] = self.sums.get(key, 0.0) + metrics.get(key, 0.0)
        for key in _TOKEN_WEIGHTED_METRICS:
            self.sums[key] = self.sums.get(key, 0.0) + metrics.get(key, 0.0) * tokens
        self.tokens += tokens

    def result(self) -> dict[str, float]:
        weight = max(self.tokens, 1.0)
        out = {key: self.sums.get(key, 0.0) for key in _SUMMED_METRICS}
        out.update({key: self.sums.get(key, 0.0) / weight for key in _TOKEN_WEIGHTED_METRICS})
        return out


def _warmup_factor(step: int, *, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def _minibatches(n_samples: int, updates: int) -> list[list[int]]:
    size = n_samples // updates if n_samples >= updates else n_samples
    chunks = [list(range(start, start + size)) for start in range(0, n_samples, size)]
    if len(chunks) > 1 and len(chunks[-1]) < size:
        chunks[-2].extend(chunks.pop())
    return chunks


def _stack_rows(rows: list[torch.Tensor], batch: MicroBatch) -> torch.Tensor:
    out = torch.zeros_like(batch.loss_mask)
    for row, values in enumerate(rows):
        out[row, : values.numel()] = values.to(out.device)
    return out


def _load_model(model_path: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, torch_dtype=torch.float32, trust_remote_code=False
    )
    return model.to(device)


def _pad_id(model: torch.nn.Module) -> int:
    config = model.config
    for candidate in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(candidate, int):
            return candidate
    return 0


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name == "lm_head.weight"
