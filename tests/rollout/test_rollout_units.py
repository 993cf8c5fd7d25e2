"""Pure parts of rollout/, without vLLM or a Ray instance."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from rollout import (
    GroupRequest,
    RolloutConfig,
    SamplingSpec,
    WeightUpdateError,
    deserialize_weights,
    serialize_weights,
)
from rollout.pool import split_balanced
from rollout.weights import CheckpointSpec, TensorSpec, read_header, validate_update

# ---------------------------------------------------------------------------- config


def test_config_defaults_match_the_job_spec_skeleton():
    cfg = RolloutConfig()
    assert (cfg.engines, cfg.group_size, cfg.max_tokens) == (1, 8, 64)
    assert (cfg.temperature, cfg.top_p, cfg.stop) == (1.0, 1.0, ())
    assert cfg.kv_cache_gib == 1 and cfg.call_timeout_s == 600


def test_config_reads_yaml_lists_and_is_frozen():
    cfg = RolloutConfig.model_validate({"stop": ["\n\n", "Q:"], "group_size": 4})
    assert cfg.stop == ("\n\n", "Q:")
    with pytest.raises(ValidationError):
        cfg.group_size = 16
    assert RolloutConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("group_size", 1, "group_size"),
        ("engines", 0, "engines"),
        ("temperature", 0.0, "temperature"),
        ("top_p", 1.5, "top_p"),
        ("top_p", 0.0, "top_p"),
        ("max_tokens", 0, "max_tokens"),
        ("stop", [""], "empty string"),
        ("kv_cache_gib", 0, "kv_cache_gib"),
        ("enginez", 2, "enginez"),
    ],
)
def test_config_errors_name_the_field(field, value, words):
    with pytest.raises(ValidationError) as info:
        RolloutConfig.model_validate({field: value})
    assert words in str(info.value)


def test_config_max_model_len_must_leave_room_for_a_prompt():
    with pytest.raises(ValidationError, match="raise max_model_len or lower max_tokens"):
        RolloutConfig(max_tokens=256, max_model_len=256)


def test_config_fields_are_documented():
    for name, info in RolloutConfig.model_fields.items():
        assert info.description, f"RolloutConfig.{name} has no docstring"


# ------------------------------------------------------------------ records/sampling


def test_sampling_spec_from_config_and_greedy():
    cfg = RolloutConfig(group_size=4, max_tokens=32, temperature=0.7, top_p=0.9, stop=["\n"])
    spec = SamplingSpec.from_config(cfg)
    assert (spec.n, spec.max_tokens, spec.temperature, spec.top_p, spec.stop) == (
        4,
        32,
        0.7,
        0.9,
        ("\n",),
    )
    greedy = SamplingSpec.greedy(16, stop=["Q:"])
    assert greedy.temperature == 0 and greedy.n == 1 and greedy.stop == ("Q:",)


@pytest.mark.parametrize(
    "kwargs", [{"n": 0}, {"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}]
)
def test_sampling_spec_rejects_bad_values(kwargs):
    args = {"n": 2, "max_tokens": 4} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingSpec(**args)


def test_group_request_rejects_other_prompt_types():
    with pytest.raises(TypeError, match="prompt must be"):
        GroupRequest("g", 42)


# ------------------------------------------------------------------------ spreading


@pytest.mark.parametrize(("items", "parts"), [(0, 2), (1, 2), (5, 2), (8, 3), (64, 4), (3, 5)])
def test_split_balanced_covers_everything_in_order(items, parts):
    chunks = split_balanced(items, parts)
    covered = [i for start, end in chunks for i in range(start, end)]
    assert covered == list(range(items))
    sizes = [end - start for start, end in chunks]
    assert all(size > 0 for size in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1
    assert len(chunks) == min(items, parts)


# ------------------------------------------------------------------ weights format


def _tied_state():
    emb = torch.randn(8, 4)
    return {
        "model.embed_tokens.weight": emb,
        "lm_head.weight": emb,  # tied: same storage
        "model.norm.weight": torch.ones(4),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4).t(),  # not contiguous
    }


def test_serialize_weights_round_trips_tied_and_strided_tensors():
    state = _tied_state()
    payload = serialize_weights(state)
    assert isinstance(payload, bytes)
    back = deserialize_weights(payload)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor)
    assert list(back.items()) and serialize_weights(list(state.items())) == payload
    header = read_header(payload)
    assert header["model.layers.0.mlp.up_proj.weight"] == TensorSpec("F32", (4, 6))


def test_serialize_weights_keeps_bfloat16():
    payload = serialize_weights({"w": torch.ones(2, 2, dtype=torch.bfloat16)})
    assert read_header(payload)["w"].dtype == "BF16"


def _spec(tied=True):
    return CheckpointSpec(
        tensors={
            "model.embed_tokens.weight": TensorSpec("F32", (8, 4)),
            "model.norm.weight": TensorSpec("F32", (4,)),
            "model.layers.0.mlp.up_proj.weight": TensorSpec("F32", (4, 6)),
        },
        tied_embeddings=tied,
    )


def test_validate_update_accepts_a_full_update_and_drops_a_tied_head():
    header = read_header(serialize_weights(_tied_state()))
    names = validate_update(header, _spec())
    assert "lm_head.weight" not in names and len(names) == 3
    state = _tied_state()
    del state["lm_head.weight"]
    assert len(validate_update(read_header(serialize_weights(state)), _spec())) == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update({"model.layers.9.mlp.up_proj.weight": torch.ones(1)}), "not have"),
        (lambda s: s.update({"model.norm.weight": torch.ones(5)}), r"wrong shape.*\[5\]"),
        (lambda s: s.pop("model.norm.weight"), "incomplete.*model.norm.weight"),
        (lambda s: s.update({"model.norm.weight": torch.ones(4, dtype=torch.int64)}), "non-float"),
    ],
)
def test_validate_update_refuses_malformed_updates(change, message):
    state = _tied_state()
    change(state)
    with pytest.raises(WeightUpdateError, match=message):
        validate_update(read_header(serialize_weights(state)), _spec())


def test_untied_head_is_an_unknown_name():
    with pytest.raises(WeightUpdateError, match=r"lm_head\.weight"):
        validate_update(read_header(serialize_weights(_tied_state())), _spec(tied=False))


@pytest.mark.parametrize("payload", [b"", b"\xff" * 16, b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{"])
def test_read_header_refuses_garbage(payload):
    with pytest.raises(WeightUpdateError):
        read_header(payload)


def test_checkpoint_spec_reads_the_model_directory(rollout_tiny_model_dir):
    from rollout.weights import checkpoint_spec

    spec = checkpoint_spec(rollout_tiny_model_dir)
    assert spec.tied_embeddings
    assert spec.tensors["model.embed_tokens.weight"].shape[1] == 64
    assert "lm_head.weight" not in spec.tensors


def test_importing_rollout_loads_neither_vllm_nor_ray():
    code = "import sys, rollout; print([m for m in ('vllm', 'ray', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
