"""The learner: the policy, its frozen reference, and the GRPO update.

``Learner`` is a plain class (the driver wraps it as a Ray actor, with a GPU
when there is one). It owns the optimizer and learning-rate schedule and the
micro-batched GRPO update with gradient accumulation; its parts live beside
it: the models and their log-probs (``learner.models``), the loss of a
micro-batch (``learner.objective``), the weights' export (``learner.weights``),
checkpoints (``learner.checkpoint``), and what only N ranks need
(``learner.distributed``).

A learner is rank r of N (``DistContext``; ``None`` is one process). With
N > 1 policy, reference and optimizer state are sharded with FSDP2, every
rank receives the full batch and trains on its token-balanced share with the
full batch's normalizer, and gradients are summed over ranks: the update is
the single-process one. With N = 1 none of that runs and the arithmetic is
the single-process code's, bit for bit. Methods marked *collective* must be
called on every rank together, in the same order.

With LoRA (``config.lora``) the policy is the base model wrapped by PEFT:
only the adapter trains and has optimizer state, the reference is the policy
with its adapter off, and weights, checkpoints and exports are the adapter's
(``learner.lora``).

With one update per step the old policy is the current one, so its
log-probabilities come from the training forward pass itself (ρ = 1) and no
extra forward pass is spent; with several updates, or LoRA dropout (the old
policy is the one the engines sample from, without dropout), they are computed
once, before the first. Log-probabilities outside the training forward pass are
taken in evaluation mode (dropout off).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from learner import checkpoint, distributed, lora, objective, weights
from learner.batching import MicroBatch, TrainSample, collate, minibatches, placeholder
from learner.batching import plan_micro_batches as plan
from learner.config import LearnerConfig
from learner.distributed import DistContext
from learner.metrics import MetricTotals
from learner.models import as_reference, evaluation_mode, load_models, pad_id, token_logprobs

log = logging.getLogger(__name__)


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
        dist_context: DistContext | None = None,
    ) -> None:
        """Load the models; with ``dist_context.world_size > 1`` join the group (collective)."""
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.config = config
        self.context = dist_context or DistContext()
        self.rank, self._sharded = self.context.rank, self.context.sharded
        self.device = resolve_device(device)
        compute_dtype = resolve_dtype(dtype, self.device)
        use_autocast = self.device.type == "cuda" and compute_dtype != torch.float32
        self._autocast_dtype = compute_dtype if use_autocast else None
        distributed.join_group(self.context, self.device)
        self.model_path = model_path
        self.policy, self.reference = load_models(
            model_path, config, self.device, sharded=self._sharded
        )
        self.pad_id = pad_id(self.policy)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=config.lr, weight_decay=config.weight_decay
        )
        # A plain function, not a bound method: LambdaLR's state_dict stores the
        # __dict__ of non-function schedules, and Ray decorates actor methods.
        schedule = functools.partial(_warmup_factor, warmup=config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.steps_done = 0
        self._logprob_seconds = 0.0

    # ------------------------------------------------------------------ update

    def train_step(self, samples: Sequence[TrainSample]) -> dict[str, float]:
        """One GRPO step: ``updates_per_step`` optimizer updates (collective).

        Every rank gets the full batch and returns the same metrics.
        """
        if not samples:
            raise ValueError("train_step got an empty batch; the driver must skip such steps")
        lr = self.scheduler.get_last_lr()[0]
        self._logprob_seconds = 0.0
        chunks = minibatches(len(samples), self.config.updates_per_step)
        shards = [self._shards(samples, chunk) for chunk in chunks]
        old_logprobs = None
        adapter_dropout = self.config.lora is not None and self.config.lora.dropout > 0
        if self.config.updates_per_step > 1 or adapter_dropout:
            own = [[i for shard in per_rank for i in shard] for per_rank in zip(*shards)]
            old_logprobs = self._policy_logprobs(samples, own)
        updates = [self._update(samples, c, s, old_logprobs) for c, s in zip(chunks, shards)]
        self.scheduler.step()
        self.steps_done += 1
        metrics = {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]}
        return {**metrics, "train/lr": lr, "time/logprob_s": self._logprob_time()}

    def _shards(self, samples: Sequence[TrainSample], indices: list[int]) -> list[list[int]]:
        """Each rank's share of ``samples[indices]``, as indices into ``samples``."""
        lengths = [samples[i].length for i in indices]
        split = distributed.split_by_rank(lengths, self.context.world_size)
        return [[indices[j] for j in shard] for shard in split]

    def _update(
        self,
        samples: Sequence[TrainSample],
        chunk: list[int],
        shards: list[list[int]],
        old_logprobs: list[torch.Tensor] | None,
    ) -> dict[str, float]:
        """One optimizer update over the mini-batch ``chunk``, accumulated over micro-batches."""
        normalizer = objective.normalizer(self.config, [samples[i] for i in chunk])
        totals = MetricTotals()
        self.optimizer.zero_grad(set_to_none=True)
        for indices in plan(samples, shards, self.rank, self.config.micro_batch_tokens):
            batch = self._collate(samples, indices)
            old = None
            if old_logprobs and indices:
                old = objective.stack_rows([old_logprobs[i] for i in indices], batch)
            loss, metrics = self._micro_loss(batch, old, normalizer)
            if indices is None:
                (loss * 0.0).backward()  # a placeholder: FSDP's collectives, no gradient
                continue
            loss.backward()
            totals.add(metrics, tokens=float(batch.loss_mask.sum()))
        grad_norm = self._clip_and_step()
        if self._sharded:
            totals.sum_over_ranks(self.device)
        return {**totals.result(), "train/grad_norm": grad_norm}

    def _collate(self, samples: Sequence[TrainSample], indices: list[int] | None) -> MicroBatch:
        if indices is None:
            return placeholder(self.pad_id).to(self.device)
        return collate(samples, indices, self.pad_id).to(self.device)

    def _micro_loss(
        self, batch: MicroBatch, old_logprobs: torch.Tensor | None, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ref = self._reference_logprobs(batch) if self.config.algorithm.beta > 0 else None
        logprobs = self._logprobs(self.policy, batch)
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        return objective.micro_batch_loss(self.config, batch, logprobs, old, ref, normalizer)

    @torch.no_grad()
    def _reference_logprobs(self, batch: MicroBatch) -> torch.Tensor:
        start = time.perf_counter()
        with as_reference(self.policy, self.reference) as reference:
            ref = self._logprobs(reference, batch)
        self._logprob_seconds += time.perf_counter() - start
        return ref

    def _clip_and_step(self) -> float:
        """Clip by the global gradient norm (over every rank's shard) and step."""
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.config.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        return float(grad_norm)

    def _logprob_time(self) -> float:
        """Seconds spent on log-prob passes this step: the slowest rank's."""
        if not self._sharded:
            return self._logprob_seconds
        return distributed.all_reduce_floats([self._logprob_seconds], self.device, "max")[0]

    # ------------------------------------------------------------- log-probs

    def _logprobs(self, model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
        return token_logprobs(model, batch, self.config.temperature, self._autocast_dtype)

    @torch.no_grad()
    def _policy_logprobs(
        self, samples: Sequence[TrainSample], shards: list[list[int]]
    ) -> list[torch.Tensor]:
        """The current policy's log-probs of this rank's share, ``shards[rank]``, dropout off.

        Rows of other ranks' samples are left empty.
        """
        start = time.perf_counter()
        rows: list[torch.Tensor] = [torch.empty(0)] * len(samples)
        plans = plan(samples, shards, self.rank, self.config.micro_batch_tokens)
        with evaluation_mode(self.policy):
            for indices in plans:
                logprobs = self._logprobs(self.policy, self._collate(samples, indices))
                for row, index in enumerate(indices or ()):
                    rows[index] = logprobs[row, : len(samples[index].token_ids)]
        self._logprob_seconds += time.perf_counter() - start
        return rows

    def compute_logprobs(self, samples: Sequence[TrainSample]) -> list[list[float]]:
        """The policy's log-probabilities of each sample's tokens (``trainer_logprobs``).

        Collective; every rank gets every sample's.
        """
        shards = self._shards(samples, list(range(len(samples))))
        rows = self._policy_logprobs(samples, shards)
        if not self._sharded:
            return [row.tolist() for row in rows]
        merged = distributed.merge_over_ranks({i: rows[i].tolist() for i in shards[self.rank]})
        return [merged[i] for i in range(len(samples))]

    # ------------------------------------------------------- weights and state

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` pairs in Hugging Face naming; tied tensors appear once.

        With LoRA only the adapter's, named as in PEFT's ``adapter_model.safetensors``.
        Collective with N ranks: every rank exhausts the iterator, one gathered
        parameter at a time; only rank 0 gets pairs.
        """
        if self.config.lora is not None:
            return lora.adapter_weights(self.policy, keep=self.rank == 0)
        return weights.full_weights(self.policy, keep=self.rank == 0)

    def export_safetensors(self, dtype: str | None = None) -> bytes | None:
        """``named_weights`` as safetensors bytes on rank 0, ``None`` elsewhere (collective)."""
        payload = weights.to_safetensors(self.named_weights(), dtype)
        return payload if self.rank == 0 else None

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: ``parameters``, ``gradients``, ``optimizer``, ``reference``.

        With LoRA ``parameters`` include the frozen base and ``reference`` is 0 (no copy).
        """
        return distributed.state_bytes(self.policy, self.optimizer, self.reference)

    def save_pretrained(self, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> None:
        """Write the policy as a Hugging Face model directory, from rank 0 (collective).

        With LoRA: the adapter merged into the base, and ``adapter/`` in PEFT's format.
        """
        if self.config.lora is None:
            weights.save_pretrained(
                self.policy, out_dir, tokenizer_dir, rank=self.rank, sharded=self._sharded
            )
            return
        adapter = dict(self.named_weights())
        if self.rank == 0:
            lora.save_merged(adapter, self.model_path, self.config.lora, out_dir, tokenizer_dir)

    def save_checkpoint(self, out_dir: str | Path) -> None:
        """Model, optimizer, schedule and RNG states into ``out_dir`` (made by the caller).

        Collective: every rank writes its shard into the same directory.
        """
        state = (self.policy, self.optimizer, self.scheduler)
        checkpoint.save(out_dir, *state, self.steps_done, rank=self.rank, sharded=self._sharded)

    def load_checkpoint(self, in_dir: str | Path) -> None:
        """Restore what ``save_checkpoint`` wrote, with any number of ranks (collective).

        The next step continues exactly.
        """
        state = (self.policy, self.optimizer, self.scheduler)
        self.steps_done = checkpoint.load(in_dir, *state, sharded=self._sharded)

    def close(self) -> None:
        """Leave the process group (collective with N ranks); the learner is unusable after."""
        distributed.leave_group(self.context)


def _warmup_factor(step: int, *, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0
