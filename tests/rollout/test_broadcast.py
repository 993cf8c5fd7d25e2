"""The broadcast weight transport: the protocol alone, then through a real engine.

Protocol tests (no vLLM, no Ray): the sender runs in the test process, two
receivers in spawned plain processes that each hold a small torch model and
load what they receive. Tensors must arrive bit for bit; a bad header is
refused by every rank with nothing changed; a dead receiver makes the others
fail within the group's timeout instead of hanging.

The engine test uses the shared pool of tests/rollout/conftest.py and a
second pool with the broadcast transport (one engine) fed by a sender in a
Ray actor: log-probs after a broadcast update must equal those after an
object-store update of the same weights.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
from rollout_testkit import one_engine_broadcast_pool

from rollout import GroupRequest, SamplingSpec, serialize_weights
from rollout.broadcast import BroadcastReceiver, BroadcastSender, WeightSyncError
from rollout.weights import CheckpointSpec, TensorSpec, WeightUpdateError, dtype_code

TIMEOUT_S = 5.0


def small_model(seed: int) -> dict[str, torch.Tensor]:
    """A few tensors of mixed sizes and dtypes, in a fixed order."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=gen),
        "layers.0.proj.weight": torch.randn(16, 16, generator=gen),
        "layers.0.proj.bias": torch.randn(16, generator=gen),
        "layers.0.norm.weight": torch.randn(16, generator=gen).to(torch.bfloat16),
        "head.weight": torch.randn(7, 16, generator=gen),
    }


def spec_of(tensors: dict[str, torch.Tensor]) -> CheckpointSpec:
    return CheckpointSpec(
        tensors={
            n: TensorSpec(dtype_code(str(t.dtype).removeprefix("torch.")), tuple(t.shape))
            for n, t in tensors.items()
        },
        tied_embeddings=False,
    )


def receiver_main(rank: int, commands, results) -> None:
    """A receiver process: holds ``small_model(0)``, joins and receives on command."""
    model = small_model(0)
    spec = spec_of(model)
    receiver = None
    results.put(("ready", None))
    while True:
        cmd, arg = commands.get()
        try:
            if cmd == "join":
                receiver = BroadcastReceiver(arg, rank, torch.device("cpu"))
                results.put(("ok", None))
            elif cmd == "receive":
                for name, view in receiver.receive(spec, arg):
                    model[name].copy_(view)
                results.put(("ok", {n: t.clone() for n, t in model.items()}))
            elif cmd == "exit":
                return
        except (WeightUpdateError, WeightSyncError) as exc:
            results.put((type(exc).__name__, str(exc)))


class Receivers:
    """Two receiver processes driven through queues."""

    def __init__(self, n: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self.queues = [(ctx.Queue(), ctx.Queue()) for _ in range(n)]
        self.procs = [
            ctx.Process(target=receiver_main, args=(i + 1, c, r), daemon=True)
            for i, (c, r) in enumerate(self.queues)
        ]
        for proc in self.procs:
            proc.start()
        assert self.answers() == [("ready", None)] * n

    def ask(self, cmd: str, arg=None, only=None) -> None:
        for i, (commands, _) in enumerate(self.queues):
            if only is None or i in only:
                commands.put((cmd, arg))

    def answers(self, only=None, timeout: float = 60) -> list:
        return [
            r.get(timeout=timeout)
            for i, (_, r) in enumerate(self.queues)
            if only is None or i in only
        ]

    def stop(self) -> None:
        self.ask("exit")
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="module")
def group():
    """A sender (bucket of 1 KiB: several buckets, one tensor larger than a bucket)
    and two receivers that joined its group."""
    sender = BroadcastSender(host="127.0.0.1", bucket_bytes=1024, timeout_s=TIMEOUT_S)
    receivers = Receivers()
    spec = {**sender.endpoint, "prefix": "test-0", "world_size": 3}
    receivers.ask("join", spec)
    sender.open("test-0", 3)
    assert receivers.answers() == [("ok", None)] * 2
    yield sender, receivers
    receivers.stop()


def test_tensors_arrive_exactly(group):
    sender, receivers = group
    new = small_model(1)
    receivers.ask("receive", 1)
    report = sender.send(new.items(), 1)
    assert report["buckets"] > 2
    for status, state in receivers.answers():
        assert status == "ok"
        for name, tensor in new.items():
            assert torch.equal(state[name], tensor), name
    snapshot = sender.snapshot(1)  # what a replacement engine would load
    from rollout.weights import deserialize_weights

    assert all(torch.equal(deserialize_weights(snapshot)[n], t) for n, t in new.items())


@pytest.mark.parametrize(
    "change",
    ["wrong shape", "missing tensor", "unknown tensor", "wrong version"],
)
def test_bad_header_refused_everywhere(group, change):
    sender, receivers = group
    before = small_model(1)  # what the previous test loaded
    bad = small_model(2)
    version = 2
    if change == "wrong shape":
        bad["layers.0.proj.weight"] = torch.zeros(16, 8)
    elif change == "missing tensor":
        del bad["head.weight"]
    elif change == "unknown tensor":
        bad["extra.weight"] = torch.zeros(3)
    else:
        version = 7  # receivers expect 2
    receivers.ask("receive", 2)
    with pytest.raises(WeightUpdateError, match="refused by rank 1"):
        sender.send(bad.items(), version)
    answers = receivers.answers()
    assert [a[0] for a in answers] == ["WeightUpdateError"] * 2
    assert answers[0][1] == answers[1][1]  # every rank reports the same reason
    # Nothing changed: the next good update still finds the old weights in place
    # (receivers report their state only after a receive, so check it with one).
    receivers.ask("receive", 3)
    sender.send(before.items(), 3)
    for status, state in receivers.answers():
        assert status == "ok"
        assert all(torch.equal(state[n], t) for n, t in before.items())


def test_stalled_receiver_times_out_then_group_reforms(group):
    sender, receivers = group
    stalled = receivers.procs[1]
    os.kill(stalled.pid, signal.SIGSTOP)
    receivers.ask("receive", 4, only=[0])
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="rank 0 of 3"):
        sender.send(small_model(4).items(), 4)
    assert time.monotonic() - start < TIMEOUT_S * 3
    ((status, message),) = receivers.answers(only=[0], timeout=TIMEOUT_S * 3)
    assert status == "WeightSyncError", message
    with pytest.raises(WeightSyncError, match="no weight-sync group is open"):
        sender.send(small_model(4).items(), 4)
    # The pool's way out: drop the stalled rank and open a fresh group.
    stalled.kill()
    receivers.ask("join", {**sender.endpoint, "prefix": "test-1", "world_size": 2}, only=[0])
    sender.open("test-1", 2)
    assert receivers.answers(only=[0]) == [("ok", None)]
    receivers.ask("receive", 4, only=[0])
    sender.send(small_model(4).items(), 4)
    ((status, state),) = receivers.answers(only=[0])
    assert status == "ok" and torch.equal(state["head.weight"], small_model(4)["head.weight"])


def test_join_times_out_without_every_rank():
    sender = BroadcastSender(host="127.0.0.1", timeout_s=2.0)
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="joining the group"):
        sender.open("nobody", 2)
    assert time.monotonic() - start < 10


# ----------------------------------------------------------- through a real engine


SEEDED = [GroupRequest(f"b-{i}", f"Q: {i}+{2 * i}\nA:", seed=40 + i) for i in range(4)]
SAMPLING = SamplingSpec(n=4, max_tokens=16, temperature=1.0)


@pytest.fixture(scope="module")
def hf_state(rollout_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(rollout_tiny_model_dir, dtype=torch.float32)
    return model.state_dict()


def noisy(state: dict[str, torch.Tensor], seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    out = {n: t + torch.randn(t.shape, generator=gen) * 0.3 * t.std() for n, t in state.items()}
    return serialize_weights(out)


@pytest.fixture(scope="module")
def broadcast_pool(rollout_ray, rollout_tiny_model_dir, rollout_config):
    """One engine whose pool uses the broadcast transport, and the sender actor."""
    with one_engine_broadcast_pool(rollout_ray, rollout_tiny_model_dir, rollout_config) as made:
        yield made


def _tokens(groups):
    return [[r.token_ids for r in g] for g in groups]


def _logprob_diff(a, b) -> float:
    flat = [
        abs(x - y)
        for ga, gb in zip(a, b, strict=True)
        for ra, rb in zip(ga, gb, strict=True)
        for x, y in zip(ra.inference_logprobs, rb.inference_logprobs, strict=True)
    ]
    return sum(flat) / len(flat)


@pytest.mark.vllm
@pytest.mark.ray
def test_broadcast_updates_match_object_store_and_survive_a_replacement(
    broadcast_pool, hf_state, rollout_ray
):
    """v1, v2 by broadcast (the second reuses the group); a malformed v3 is refused
    with nothing changed; the same v2 weights by object store give the same
    log-probs; a killed engine's replacement serves v2 (the sender's snapshot) and
    joins a re-formed group for v3."""
    from rollout import ObjectStoreTransport

    pool, sender = broadcast_pool
    before = pool.generate(SEEDED, SAMPLING)
    for version in (1, 2):
        rollout_ray.get(sender.set_weights.remote(noisy(hf_state, version)))
        pool.update_weights(None, version)
        assert pool.weights_versions() == [version]
    assert pool.transport.groups_opened == 1  # v2 went through v1's group
    by_broadcast = pool.generate(SEEDED, SAMPLING)
    assert {r.weights_version for g in by_broadcast for r in g} == {2}
    assert _tokens(by_broadcast) != _tokens(before)

    bad = dict(hf_state)
    bad["model.norm.weight"] = torch.ones(3)
    rollout_ray.get(sender.set_weights.remote(serialize_weights(bad)))
    with pytest.raises(WeightUpdateError, match="wrong shape"):
        pool.update_weights(None, 3)
    assert pool.weights_versions() == [2] and pool.weights_version == 2
    assert _tokens(pool.generate(SEEDED, SAMPLING)) == _tokens(by_broadcast)

    broadcast = pool.transport
    pool.transport = ObjectStoreTransport()  # the same weights, the other way
    pool.update_weights(noisy(hf_state, 2), 2)
    by_object_store = pool.generate(SEEDED, SAMPLING)
    assert _tokens(by_object_store) == _tokens(by_broadcast)
    assert _logprob_diff(by_object_store, by_broadcast) <= 1e-6
    pool.transport = broadcast
    rollout_ray.get(sender.set_weights.remote(noisy(hf_state, 2)))
    pool.update_weights(None, 2)  # the sender's snapshot is version 2 again

    (info,) = pool.process_infos()
    os.kill(info["pid"], signal.SIGKILL)
    replaced = pool.generate(SEEDED, SAMPLING)
    assert pool.restarts == 1
    assert _tokens(replaced) == _tokens(by_broadcast)
    rollout_ray.get(sender.set_weights.remote(noisy(hf_state, 3)))
    pool.update_weights(None, 3)
    assert pool.weights_versions() == [3]
    assert broadcast.groups_opened == 2  # re-formed once, for the replacement
