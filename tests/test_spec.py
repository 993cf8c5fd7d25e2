"""The job spec: validation messages that name the field, overrides, and pre-flight checks.

Bad specs must fail before any engine starts; these tests run without Ray or vLLM
and, through the CLI, show the exit status and message a user sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from services.cli import app
from services.spec import SpecError, apply_overrides, load_spec, validate_spec
from services.train.run import PreflightError, preflight


@pytest.fixture
def assets(tmp_path) -> dict[str, Path]:
    from services.embedded.tiny_model import tiny_model_dir

    rows = [
        {"question": "Compute 1+2.\n", "answer": "3"},
        {"question": "Compute 2+2.\n", "answer": "4"},
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": tiny_model_dir("tiny"), "train": train}


def base_spec(assets) -> dict:
    return {
        "name": "t",
        "model": {"path": str(assets["model"])},
        "data": {"train": str(assets["train"]), "eval": str(assets["train"])},
        "rollout": {"group_size": 4},
        "train": {"steps": 2, "questions_per_step": 2},
    }


def error_of(raw: dict) -> str:
    with pytest.raises(SpecError) as caught:
        validate_spec(raw)
    return str(caught.value)


def test_a_valid_spec_gets_the_documented_defaults(assets):
    spec = validate_spec(base_spec(assets))
    assert spec.algorithm.beta == 0.04
    assert spec.algorithm.kl == "k3"
    assert spec.reward.verifiers[0].name == "math"
    assert spec.model.trust_remote_code is False


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rollout": {"group_size": 1}}, "rollout.group_size"),
        ({"algorithm": {"clip_low": 1.5}}, "algorithm.clip_low"),
        ({"algorithm": {"clip_high": -0.1}}, "algorithm.clip_high"),
        (
            {"train": {"steps": 2, "questions_per_step": 3, "updates_per_step": 5}},
            "train.updates_per_step",
        ),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"algorithm": {"kl": "k4"}}, "algorithm.kl"),
        ({"surprise": 1}, "surprise"),
        ({"model": {"path": "x", "trust_remote_code": True}}, "model.trust_remote_code"),
        ({"model": {"lora": {"alpha": 8}}}, "model.lora.rank"),
        ({"model": {"lora": {"rank": 513}}}, "model.lora.rank"),
        ({"model": {"lora": {"rank": 8, "alpha": 0}}}, "model.lora.alpha"),
        ({"model": {"lora": {"rank": 8, "dropout": 1.0}}}, "model.lora.dropout"),
        ({"model": {"lora": {"rank": 8, "target_modules": []}}}, "model.lora.target_modules"),
        ({"model": {"lora": {"rank": 8, "target_modules": "q_proj"}}}, "model.lora.target_modules"),
        ({"model": {"lora": {"rank": 8, "scale": 2}}}, "model.lora.scale"),
    ],
)
def test_bad_specs_name_the_field(assets, change, field):
    raw = base_spec(assets)
    for section, value in change.items():
        raw[section] = {**raw.get(section, {}), **value} if isinstance(value, dict) else value
    assert field in error_of(raw)


def test_batch_not_divisible_says_what_to_change(assets):
    raw = base_spec(assets)
    raw["train"] = {"questions_per_step": 3, "updates_per_step": 5}
    message = error_of(raw)
    assert "must divide the batch of 12 completions" in message


def test_overrides_are_yaml_values_on_dotted_paths(assets):
    raw = apply_overrides(base_spec(assets), ["train.lr=3e-5", 'rollout.stop=["\\n\\n"]'])
    spec = validate_spec(raw)
    assert spec.train.lr == 3e-5
    assert spec.rollout.stop == ("\n\n",)
    with pytest.raises(SpecError, match="key.path=value"):
        apply_overrides({}, ["train.lr"])


def test_lora_defaults_and_reaches_the_learner(assets):
    assert validate_spec(base_spec(assets)).learner_config().lora is None
    raw = apply_overrides(base_spec(assets), ["model.lora={rank: 8}"])
    spec = validate_spec(raw)
    assert spec.model.lora.model_dump() == {
        "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"
    }  # fmt: skip
    assert spec.learner_config().lora == spec.model.lora


def test_cli_dry_run_takes_lora_as_a_yaml_flow_mapping(assets, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(base_spec(assets)))
    lora = "model.lora={rank: 8, alpha: 16, target_modules: all-linear}"
    ok = CliRunner().invoke(app, ["train", str(config), "--dry-run", "--set", lora])
    assert ok.exit_code == 0, ok.output
    assert load_spec(config, [lora]).model.lora.model_dump() == {
        "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"
    }  # fmt: skip
    bad = CliRunner().invoke(app, ["train", str(config), "--dry-run", "--set", "model.lora={}"])
    assert bad.exit_code == 2
    assert "model.lora.rank" in bad.output


def test_preflight_reports_a_missing_dataset_file(assets):
    raw = base_spec(assets)
    raw["data"]["train"] = "/nonexistent/train.jsonl"
    with pytest.raises(PreflightError, match="data.train"):
        preflight(validate_spec(raw))


def test_preflight_reports_an_unknown_verifier(assets):
    raw = base_spec(assets)
    raw["reward"] = {"verifiers": [{"name": "no_such_verifier"}]}
    with pytest.raises(PreflightError, match="no_such_verifier"):
        preflight(validate_spec(raw))


def test_preflight_reports_a_missing_prompt_field(assets):
    raw = base_spec(assets)
    raw["data"]["prompt_field"] = "problem"
    with pytest.raises(ValueError, match="data.prompt_field"):
        preflight(validate_spec(raw))


def test_cli_dry_run_validates_and_bad_specs_exit_2(assets, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(base_spec(assets)))
    runner = CliRunner()
    ok = runner.invoke(app, ["train", str(config), "--dry-run"])
    assert ok.exit_code == 0, ok.output
    assert "valid" in ok.output
    bad = runner.invoke(app, ["train", str(config), "--dry-run", "--set", "rollout.group_size=1"])
    assert bad.exit_code == 2
    assert "rollout.group_size" in bad.output


def test_every_shipped_example_validates():
    root = Path(__file__).resolve().parents[1] / "examples"
    configs = sorted(root.rglob("*.yaml"))
    assert configs, "no example configs found"
    for config in configs:
        load_spec(config)
