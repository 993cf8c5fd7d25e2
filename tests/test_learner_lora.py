"""The learner with LoRA on CPU, without Ray or vLLM: the adapter trains, the base never does.

One process for most tests, on the tiny model and recorded rollouts: the base
weights hash the same before and after training, the reference log-probs are
the base model's, only adapter tensors train, hold optimizer state and leave
the learner (in PEFT's naming), a checkpoint resumes bit for bit, and
``final/`` is the merged model with ``final/adapter`` beside it. Two ranks
(FSDP2 over gloo, ``learner_testkit.run_ranks``) must update the adapter like
one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from learner_testkit import (
    make_learner,
    rank_train,
    recorded_rollouts,
    resume_and_step,
    run_ranks,
    train_and_checkpoint,
    weights_digest,
)
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from learner import LoraConfig
from learner.batching import collate
from learner.lora import ADAPTER_DIR, adapter_config, merge_adapter_dir
from learner.models import token_logprobs
from services.embedded.tiny_model import tiny_model_dir

LORA = LoraConfig(rank=4, alpha=8, target_modules="all-linear")
DROPOUT = LoraConfig(rank=4, dropout=0.25, target_modules=["q_proj", "v_proj"])
ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(tiny_model_dir("tiny"))


def base_digest(learner) -> str:
    """SHA-256 of every frozen (base) tensor of the policy."""
    digest = hashlib.sha256()
    for name, param in learner.policy.named_parameters():
        if not param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().numpy().tobytes())
    return digest.hexdigest()


def base_model(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_adapter_config_resolves_the_target_modules(model_dir):
    config = adapter_config(model_dir, LORA)
    assert config == adapter_config(model_dir, LORA)  # deterministic
    assert json.loads(json.dumps(config)) == config
    assert config == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model_dir,
        "r": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ALL_LINEAR,
    }
    assert adapter_config(model_dir, DROPOUT)["target_modules"] == ["q_proj", "v_proj"]
    assert LoraConfig(rank=3).alpha == 6.0
    with pytest.raises(ValueError, match="model.lora.target_modules: lm_head is not"):
        adapter_config(model_dir, LoraConfig(rank=4, target_modules=["q_proj", "lm_head"]))


def test_only_the_adapter_trains_and_the_base_never_changes(model_dir):
    learner = make_learner(model_dir, lora=LORA)
    adapter = {name for name, param in learner.policy.named_parameters() if param.requires_grad}
    assert adapter and all(".lora_A." in name or ".lora_B." in name for name in adapter)
    before = base_digest(learner)
    for batch in recorded_rollouts(0, n_steps=3):
        learner.train_step(batch)
    assert base_digest(learner) == before
    optimized = {id(param) for param in learner.optimizer.state}
    trained = {id(p) for n, p in learner.policy.named_parameters() if n in adapter}
    assert optimized == trained
    assert learner.reference is None
    memory = learner.memory_bytes()
    assert memory["reference"] == 0
    trainable = learner.optimizer.param_groups[0]["params"]
    assert memory["gradients"] == sum(4 * param.numel() for param in trainable)


def test_the_reference_is_the_base_model(model_dir):
    learner = make_learner(model_dir, lora=DROPOUT)
    for batch in recorded_rollouts(1, n_steps=2):
        learner.train_step(batch)
    batch = collate(recorded_rollouts(2, n_steps=1)[0], list(range(8)), learner.pad_id)
    expected = token_logprobs(base_model(model_dir), batch, 1.0, None)
    assert torch.equal(learner._reference_logprobs(batch), expected)
    assert not torch.allclose(learner._logprobs(learner.policy, batch), expected, atol=1e-4)
    assert learner.policy.training


def test_logprobs_are_taken_with_dropout_off(model_dir):
    learner = make_learner(model_dir, lora=DROPOUT)
    batch = recorded_rollouts(3, n_steps=1)[0]
    learner.train_step(batch)
    first = learner.compute_logprobs(batch)
    assert learner.compute_logprobs(batch) == first
    assert learner.policy.training  # training mode is restored


def test_the_export_is_the_adapter_named_as_peft_saves_it(model_dir, tmp_path):
    learner = make_learner(model_dir, lora=LORA)
    exported = load_safetensors(learner.export_safetensors())
    lora_b = [name for name in exported if ".lora_B." in name]
    assert lora_b and all(not exported[name].any() for name in lora_b)  # version 0: the base
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in exported
    assert all(tensor.dtype == torch.float32 for tensor in exported.values())
    learner.policy.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert exported.keys() == saved.keys()
    assert all(exported[name].shape == saved[name].shape for name in saved)


def test_lora_resumes_exactly_from_a_checkpoint(model_dir, tmp_path):
    steps = recorded_rollouts(4, n_steps=4)
    straight = make_learner(model_dir, lora=DROPOUT)
    straight_metrics = [straight.train_step(batch) for batch in steps]

    first = make_learner(model_dir, lora=DROPOUT)
    metrics = [first.train_step(batch) for batch in steps[:2]]
    first.save_checkpoint(tmp_path)
    del first
    resumed = make_learner(model_dir, lora=DROPOUT)
    resumed.load_checkpoint(tmp_path)
    metrics += [resumed.train_step(batch) for batch in steps[2:]]

    assert [_untimed(m) for m in metrics] == [_untimed(m) for m in straight_metrics]
    assert weights_digest(resumed) == weights_digest(straight)
    saved = dcp.FileSystemReader(tmp_path / "state").read_metadata()
    model_keys = [key for key in saved.state_dict_metadata if key.startswith("model.")]
    assert model_keys and all(".lora_" in key for key in model_keys)  # no base tensors


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory) -> dict:
    """A LoRA learner after two steps, and its ``final/`` directory."""
    learner = make_learner(model_dir, lora=LORA)
    batches = recorded_rollouts(5, n_steps=2)
    for batch in batches:
        learner.train_step(batch)
    final = tmp_path_factory.mktemp("lora") / "final"
    learner.save_pretrained(final, model_dir)
    return {"learner": learner, "batch": batches[0], "final": final}


def test_final_is_the_merged_model_with_the_adapter_beside_it(model_dir, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    learner, final = trained["learner"], trained["final"]
    assert (final / "tokenizer.json").is_file()
    adapter = json.loads((final / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == model_dir
    assert sorted(adapter["target_modules"]) == ALL_LINEAR
    saved = load_file(final / ADAPTER_DIR / "adapter_model.safetensors")
    exported = load_safetensors(learner.export_safetensors())
    assert _same(saved, exported)

    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any("lora" in name for name in merged.state_dict())
    samples = trained["batch"]
    batch = collate(samples, list(range(len(samples))), learner.pad_id)
    rows = [torch.tensor(row) for row in learner.compute_logprobs(samples)]
    expected = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    got = token_logprobs(merged, batch, 1.0, None) * batch.loss_mask
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    again = tmp_path / "merged_again"
    merge_adapter_dir(final / ADAPTER_DIR, again)
    assert weights_digest_of(again) == weights_digest_of(final)


def test_grpo_eval_takes_an_adapter_directory(trained, tmp_path, monkeypatch):
    """The CLI merges the adapter and evaluates that model (the engines are stood in for)."""
    from typer.testing import CliRunner

    from services.cli import app
    from services.train.run import TrainingRun

    seen = {}

    def evaluate_only(run: TrainingRun) -> dict[str, float]:
        seen["lora"] = run.spec.model.lora
        seen["digest"] = weights_digest_of(Path(run.spec.model.path))
        return {"eval/accuracy": 0.5}

    monkeypatch.setattr(TrainingRun, "evaluate_only", evaluate_only)
    spec = tmp_path / "job.yaml"
    raw = {"model": {"path": "x", "lora": {"rank": 2}}, "data": {"train": "t", "eval": "e"}}
    spec.write_text(json.dumps(raw))  # its model.lora must not apply to the merged model
    adapter = trained["final"] / ADAPTER_DIR
    result = CliRunner().invoke(app, ["eval", str(adapter), "--config", str(spec)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"model": str(adapter), "eval/accuracy": 0.5}
    assert seen == {"lora": None, "digest": weights_digest_of(trained["final"])}


def weights_digest_of(model_dir) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def _untimed(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if not key.startswith("time/")}


def test_two_ranks_update_the_adapter_like_one(model_dir, tmp_path):
    batches = recorded_rollouts(6, n_steps=2)
    one = train_and_checkpoint(make_learner(model_dir, lora=LORA), batches, tmp_path / "one")
    ranks = run_ranks(rank_train, 2, tmp_path, model_dir, batches, [{"lora": LORA}], [])
    two = ranks[0]["runs"][0]
    for step, (w1, w2) in enumerate(zip(one["weights"], two["weights"])):
        assert _max_diff(w1, w2) <= 1e-5, f"step {step + 1}"
    for memory in (two["memory"], ranks[1]["runs"][0]["memory"]):
        assert memory["reference"] == 0
        assert memory["optimizer"] <= 0.55 * one["memory"]["optimizer"]
    for lp1, lp2 in zip(one["logprobs"], two["logprobs"]):
        assert lp2 == pytest.approx(lp1, abs=2e-5)
    finals = [
        load_file(tmp_path / f"{run}_final" / "model.safetensors") for run in ("one", "ckpt0")
    ]
    assert _max_diff(*finals) <= 1e-5  # rank 0 merged the gathered adapter
    # The 2-rank checkpoint (adapter and its AdamW state) continues in one process.
    learner = make_learner(model_dir, lora=LORA)
    resumed = resume_and_step(learner, str(tmp_path / "ckpt0"), batches[1])
    assert _same(resumed["loaded"], two["weights"][0])
    assert _max_diff(resumed["after"], two["weights"][1]) <= 1e-5


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)
