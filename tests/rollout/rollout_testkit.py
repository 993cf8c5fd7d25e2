"""Helpers shared by the rollout tests that drive a real engine over broadcast."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from rollout.broadcast import BroadcastSender


def tensor_sender_class():
    """A learner stand-in for a Ray actor: holds tensors, and has the four methods
    ActorSenderLink calls. Defined in a function so Ray pickles it by value (Ray's
    workers cannot import test modules)."""

    class TensorSender:
        def __init__(self) -> None:
            self.sender = BroadcastSender(timeout_s=60.0)
            self.tensors: dict[str, torch.Tensor] = {}

        def set_weights(self, payload: bytes) -> None:
            from rollout import deserialize_weights

            self.tensors = deserialize_weights(payload)

        def weight_sender_endpoint(self) -> dict:
            return self.sender.endpoint

        def open_weight_group(self, prefix: str, world_size: int) -> None:
            self.sender.open(prefix, world_size)

        def send_weights(self, version: int) -> dict:
            return self.sender.send(self.tensors.items(), version)

        def weights_snapshot(self, version: int) -> bytes:
            return self.sender.snapshot(version)

    return TensorSender


@contextmanager
def one_engine_broadcast_pool(ray, model_dir, config, **options):
    """A one-engine pool whose transport is a broadcast from a ``TensorSender`` actor;
    yields ``(pool, sender)``. ``options`` go to ``RolloutPool`` (e.g. ``lora``)."""
    from rollout import ActorSenderLink, BroadcastTransport, RolloutPool
    from services.train.parts import engine_placement

    config = config.model_copy(update={"engines": 1})
    sender = ray.remote(num_cpus=0)(tensor_sender_class()).remote()
    transport = BroadcastTransport(ActorSenderLink(sender))
    placement = engine_placement(config)
    pool = RolloutPool(
        model_dir, config, seed=0, placement=placement, transport=transport, **options
    )
    try:
        yield pool, sender
    finally:
        pool.shutdown()
        ray.kill(sender)
