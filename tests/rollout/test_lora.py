"""LoRA adapters served by the engines: ``rollout.lora`` and the worker's adapter path.

Unit tests (no engine): the rounding to vLLM's accepted ``max_lora_rank``
values, the adapter spec derived from the checkpoint (it must name exactly the
tensors PEFT saves, with their shapes) and the refusals.

Engine tests: one pool of one LoRA engine on the tiny model (rank 4, so vLLM's
``max_lora_rank`` is 8), with the broadcast transport fed by a sender actor and
the object store swapped in where a test says so. They run in file order:
version 0 is the base model; adapter v1 by broadcast changes the outputs and its
log-probs match transformers + peft with the same adapter; v2 by object store
replaces it (the old adapter id is gone) and gives what v2 by broadcast gives;
malformed adapters are refused over both transports with the engine untouched;
what a replacement engine would load (the sender's snapshot) serves v2 again.
"""

from __future__ import annotations

import pytest
import torch
from rollout_testkit import one_engine_broadcast_pool

from rollout import GroupRequest, SamplingSpec, WeightUpdateError, serialize_weights
from rollout.lora import adapter_spec, max_lora_rank
from rollout.weights import checkpoint_spec, read_header, validate_update

ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
RANK = 4
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks, 0.32
REQUESTS = [GroupRequest(f"lora-{i}", f"Q: {i}+{3 * i}\nA:", seed=70 + i) for i in range(4)]
SAMPLING = SamplingSpec(n=4, max_tokens=16, temperature=1.0, ignore_eos=True)


def adapter_config(model_dir, rank: int = RANK, targets=ALL_LINEAR) -> dict:
    """The contract's adapter config (what learner.lora.adapter_config returns)."""
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(targets),
        "base_model_name_or_path": str(model_dir),
        "task_type": "CAUSAL_LM",
    }


def peft_adapter(model_dir, seed: int, config: dict):
    """A PEFT model of ``config`` whose lora_B is random (PEFT starts it at zero),
    and its adapter tensors as PEFT saves them."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=0.0,
        target_modules=config["target_modules"],
    )
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape) * 0.1)
    return model.eval(), dict(get_peft_model_state_dict(model))


# ------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("rank", "expected"),
    [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (257, 320), (321, 512), (512, 512)],
)
def test_max_lora_rank_is_the_smallest_accepted_value_that_holds_the_rank(rank, expected):
    assert max_lora_rank(rank, VLLM_RANKS) == expected


def test_max_lora_rank_refuses_a_rank_above_every_accepted_value():
    with pytest.raises(ValueError, match="lower model.lora.rank"):
        max_lora_rank(513, VLLM_RANKS)


@pytest.mark.parametrize("targets", [ALL_LINEAR, ["q_proj", "v_proj"]])
def test_adapter_spec_names_exactly_what_peft_saves(rollout_tiny_model_dir, targets):
    config = adapter_config(rollout_tiny_model_dir, targets=targets)
    spec = adapter_spec(checkpoint_spec(rollout_tiny_model_dir), config)
    _, tensors = peft_adapter(rollout_tiny_model_dir, 0, config)
    assert {n: s.shape for n, s in spec.tensors.items()} == {
        n: tuple(t.shape) for n, t in tensors.items()
    }
    assert sorted(validate_update(read_header(serialize_weights(tensors)), spec)) == sorted(tensors)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 0}, "r must be an integer in 1..512"),
        ({"r": "8"}, "r must be an integer"),
        ({"lora_alpha": None}, "lora_alpha must be a number"),
        ({"target_modules": "all-linear"}, "resolves 'all-linear'"),
        ({"target_modules": []}, "non-empty list"),
        ({"target_modules": ["q_proj", "lm_head"]}, r"\['lm_head'\] match no linear weight"),
        ({"peft_type": "IA3"}, "only LORA"),
    ],
)
def test_adapter_spec_refuses_configs_the_engines_cannot_serve(
    rollout_tiny_model_dir, change, message
):
    config = {**adapter_config(rollout_tiny_model_dir), **change}
    with pytest.raises(ValueError, match=message):
        adapter_spec(checkpoint_spec(rollout_tiny_model_dir), config)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("full weights", r"LoRA adapter \(r 4\) does not have.*send PEFT adapter names"),
        ("wrong rank", r"wrong shape.*lora_A.weight \[8, 64\] \(expected: \[4, 64\]\)"),
        ("missing", r"incomplete: 1 of 56 tensors.*every parameter of the LoRA adapter"),
    ],
)
def test_malformed_adapters_are_refused_with_a_clear_message(
    rollout_tiny_model_dir, fault, message
):
    spec = adapter_spec(
        checkpoint_spec(rollout_tiny_model_dir), adapter_config(rollout_tiny_model_dir)
    )
    with pytest.raises(WeightUpdateError, match=message):
        validate_update(read_header(malformed(rollout_tiny_model_dir, fault)), spec)


def malformed(model_dir, fault: str) -> bytes:
    """An update a rank-4 engine must refuse."""
    if fault == "full weights":
        return (model_dir / "model.safetensors").read_bytes()
    rank = 8 if fault == "wrong rank" else RANK
    _, tensors = peft_adapter(model_dir, 9, adapter_config(model_dir, rank=rank))
    if fault == "missing":
        del tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    return serialize_weights(tensors)


# ------------------------------------------------------------------ real engine


@pytest.fixture(scope="module")
def adapters(rollout_tiny_model_dir):
    """Versions 1 and 2: (PEFT model, adapter tensors) with different random lora_B."""
    config = adapter_config(rollout_tiny_model_dir)
    return {v: peft_adapter(rollout_tiny_model_dir, v, config) for v in (1, 2)}


@pytest.fixture(scope="module")
def lora_pool(rollout_ray, rollout_tiny_model_dir, rollout_config):
    """One LoRA engine behind the broadcast transport, its sender actor, the transport."""
    model_dir, lora = rollout_tiny_model_dir, adapter_config(rollout_tiny_model_dir)
    with one_engine_broadcast_pool(rollout_ray, model_dir, rollout_config, lora=lora) as made:
        pool, sender = made
        yield pool, sender, pool.transport


def send(lora_pool, tensors: dict, version: int, by: str) -> None:
    """``update_weights`` with adapter tensors over ``by``: broadcast, bytes or ref."""
    import ray

    from rollout import ObjectStoreTransport

    pool, sender, broadcast = lora_pool
    payload = serialize_weights(tensors)
    if by == "broadcast":
        pool.transport = broadcast
        ray.get(sender.set_weights.remote(payload))
        pool.update_weights(None, version)
        return
    pool.transport = ObjectStoreTransport()
    pool.update_weights(payload if by == "bytes" else ray.put(payload), version)


def engine_adapters(pool) -> tuple[list, int]:
    """The adapter ids registered in the engine's worker, and its max_lora_rank."""
    import ray

    def read(engine):
        lora = engine._llm.llm_engine.vllm_config.lora_config
        return sorted(engine._llm.collective_rpc("list_loras")[0]), lora.max_lora_rank

    return ray.get(pool._slots[0].actor.__ray_call__.remote(read))


def logprob_diff(model, groups) -> float:
    """Mean |engine - model| over the sampled tokens' log-probs (temperature 1)."""
    diffs = []
    for record in (r for g in groups for r in g):
        ids = torch.tensor([record.prompt_token_ids + record.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(record.prompt_token_ids) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)[
            torch.arange(len(record.token_ids)), record.token_ids
        ]
        diffs.append((logprobs - torch.tensor(record.inference_logprobs)).abs())
    return torch.cat(diffs).mean().item()


def tokens(groups) -> list:
    return [[r.token_ids for r in g] for g in groups]


@pytest.mark.vllm
@pytest.mark.ray
def test_an_adapter_changes_the_outputs_and_logprobs_match_peft(lora_pool, adapters):
    pool, (model, tensors) = lora_pool[0], adapters[1]
    before = pool.generate(REQUESTS, SAMPLING)
    with model.disable_adapter():
        assert logprob_diff(model, before) <= 1e-5  # version 0: the base model
    assert engine_adapters(pool) == ([], 8)  # rank 4 served with vLLM's max_lora_rank 8

    send(lora_pool, tensors, 1, "broadcast")
    after = pool.generate(REQUESTS, SAMPLING)
    assert pool.weights_versions() == [1]
    assert {r.weights_version for g in after for r in g} == {1}
    assert tokens(after) != tokens(before)
    assert logprob_diff(model, after) <= 1e-5


@pytest.mark.vllm
@pytest.mark.ray
def test_the_next_adapter_replaces_the_previous_over_either_transport(lora_pool, adapters):
    pool = lora_pool[0]
    (first,), _ = engine_adapters(pool)
    send(lora_pool, adapters[2][1], 2, "bytes")
    by_object_store = pool.generate(REQUESTS, SAMPLING)
    (second,), _ = engine_adapters(pool)
    assert second != first  # a new id; the old adapter is gone
    assert logprob_diff(adapters[2][0], by_object_store) <= 1e-5
    assert logprob_diff(adapters[1][0], by_object_store) > 1e-3  # v1 no longer serves

    send(lora_pool, adapters[2][1], 2, "broadcast")
    by_broadcast = pool.generate(REQUESTS, SAMPLING)
    assert tokens(by_broadcast) == tokens(by_object_store)
    assert logprob_diff(adapters[2][0], by_broadcast) <= 1e-5
    assert len(engine_adapters(pool)[0]) == 1


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.parametrize(
    ("fault", "by", "message"),
    [
        ("full weights", "ref", "LoRA adapter"),  # an ObjectRef: the engine itself checks
        ("wrong rank", "broadcast", "wrong shape"),  # the workers refuse the header
        ("missing", "bytes", "incomplete"),  # the pool refuses before any engine
    ],
)
def test_a_malformed_adapter_is_refused_and_nothing_changes(
    lora_pool, rollout_tiny_model_dir, fault, by, message
):
    from rollout import deserialize_weights

    pool = lora_pool[0]
    served, before = engine_adapters(pool)[0], pool.generate(REQUESTS, SAMPLING)
    tensors = deserialize_weights(malformed(rollout_tiny_model_dir, fault))
    with pytest.raises(WeightUpdateError, match=message):
        send(lora_pool, tensors, 3, by)
    assert pool.weights_versions() == [2] and pool.weights_version == 2
    assert engine_adapters(pool)[0] == served
    assert tokens(pool.generate(REQUESTS, SAMPLING)) == tokens(before)


@pytest.mark.vllm
@pytest.mark.ray
def test_what_a_replacement_engine_loads_serves_the_current_adapter(lora_pool, adapters):
    """A replacement engine starts with ``transport.restore(...)``'s weights (here the
    sender's snapshot of v2) and loads them in its constructor as any update; loaded
    into the running engine, they give v2's outputs again."""
    from rollout import ObjectStoreTransport

    pool, _, broadcast = lora_pool
    current = pool.generate(REQUESTS, SAMPLING)
    restore = broadcast.restore(None, 2)
    pool.transport = ObjectStoreTransport()
    pool.update_weights(restore["weights"], restore["weights_version"])
    assert tokens(pool.generate(REQUESTS, SAMPLING)) == tokens(current)
    assert logprob_diff(adapters[2][0], current) <= 1e-5
