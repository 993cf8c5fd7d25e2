"""Hostile and absurd job specs are refused when validated, naming the field: numbers
past their bounds, non-finite numbers anywhere (in the services' settings too), text
that is not Unicode, reward URLs that are not http(s), and verifier weights whose sum
overflows (issue 17)."""

from __future__ import annotations

import copy
import math
import typing
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from reward.settings import RemoteVerifierSettings, RewardSettings
from services.api.settings import ApiSettings
from services.spec import JobSpec, SpecError, validate_spec

BASE = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "train": {"eval_every": 0}}


def raw_with(path: tuple[str, ...], value: Any) -> dict:
    raw = copy.deepcopy(BASE)
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return raw


def refused(raw: dict) -> str:
    with pytest.raises(SpecError) as error:
        validate_spec(raw)
    return str(error.value)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("train", "steps"), 10**30),
        (("train", "steps"), 10**7 + 1),
        (("train", "questions_per_step"), 10**5 + 1),
        (("rollout", "engines"), 10**6),
        (("rollout", "engines"), 1025),
        (("rollout", "group_size"), 4097),
        (("seed",), 10**30),
        (("seed",), 2**63),
        (("seed",), -1),
        (("cluster", "learner", "num_gpus"), 1e9),
        (("cluster", "engines", "num_gpus"), 1025),
        (("cluster", "reward", "num_cpus"), 10**4 + 1),
        (("cluster", "learner", "resources", "learner_node"), 1e12),
        (("reward", "timeout_s"), 86_401),
        (("rollout", "call_timeout_s"), 1e30),
        (("rollout", "start_timeout_s"), 86_401),
    ],
)
def test_numbers_past_their_bounds_are_refused_naming_the_field(path, value):
    assert ".".join(path) in refused(raw_with(path, value))


def test_engine_seeds_stay_below_two_to_the_32():
    assert validate_spec(raw_with(("seed",), 2**32 - 1)).seed == 2**32 - 1
    message = refused({**raw_with(("seed",), 2**32 - 1), "rollout": {"engines": 2}})
    assert "seed" in message and "rollout.engines" in message


def float_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    """Every float field reachable from ``model`` through nested models (not lists)."""
    for name, field in model.model_fields.items():
        if typing.get_origin(field.annotation) in (tuple, list, dict):
            continue
        for kind in typing.get_args(field.annotation) or (field.annotation,):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from float_fields(kind, (*prefix, name))
            elif kind is float:
                yield (*prefix, name)


FLOAT_FIELDS = sorted(set(float_fields(JobSpec)))


def test_the_walk_finds_the_float_fields_of_every_section():
    sections = {path[0] for path in FLOAT_FIELDS}
    assert {"rollout", "reward", "algorithm", "train", "cluster"} <= sections


@pytest.mark.parametrize("path", FLOAT_FIELDS, ids=".".join)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "Infinity", "NaN"])
def test_non_finite_numbers_are_refused_everywhere(path, value):
    assert ".".join(path) in refused(raw_with(path, value))


SETTINGS = [
    (ApiSettings, {"token": "t" * 32}),
    (RewardSettings, {}),
    (RemoteVerifierSettings, {"url": "http://127.0.0.1:9"}),
]


@pytest.mark.parametrize(("model", "required"), SETTINGS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("value", [math.inf, math.nan, "Infinity"])
def test_non_finite_numbers_are_refused_in_every_settings_model(model, required, value):
    names = [path[0] for path in float_fields(model)]
    assert names
    for name in names:
        with pytest.raises(ValidationError, match=f"{name}\n.*finite number"):
            model(**required, **{name: value})


def test_non_finite_weights_and_resources_are_refused():
    weights = [{"name": "math", "weight": math.inf}]
    assert "reward.verifiers.0.weight" in refused(raw_with(("reward", "verifiers"), weights))
    resources = {"learner_node": math.nan}
    message = refused(raw_with(("cluster", "learner", "resources"), resources))
    assert "cluster.learner.resources.learner_node" in message


def test_weights_whose_sum_overflows_are_refused():
    weights = [{"name": "math", "weight": 1e308}, {"name": "exact", "weight": 1e308}]
    assert "weights sum" in refused(raw_with(("reward", "verifiers"), weights))


def integer_and_timeout_bounds(schema: dict) -> list[tuple[str, dict]]:
    """(field, its number schema) for every integer field and every ``*_s`` field."""
    found = []
    for model, definition in schema["$defs"].items():
        for name, prop in definition.get("properties", {}).items():
            for option in prop.get("anyOf", [prop]):
                if option.get("type") == "integer" or (
                    name.endswith("_s") and option.get("type") == "number"
                ):
                    found.append((f"{model}.{name}", option))
    return found


def test_every_integer_and_every_timeout_has_an_upper_bound():
    bounded = integer_and_timeout_bounds(JobSpec.model_json_schema())
    assert len(bounded) > 20
    for name, option in bounded:
        top = option.get("maximum", option.get("exclusiveMaximum"))
        assert top is not None, f"{name} has no upper bound"
        if name.endswith("_s"):
            assert top <= 86_400, name


@pytest.mark.parametrize(
    "path",
    [
        ("data", "system_prompt"),
        ("model", "path"),
        ("data", "train"),
        ("name",),
        ("reward", "eval_verifier"),
        ("output", "dir"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(path):
    message = refused(raw_with(path, "a\ud800b"))
    assert ".".join(path) in message and "surrogate" in message
    message.encode()  # the message itself is valid Unicode


def test_lone_surrogates_in_lists_and_keys_are_refused():
    assert "rollout.stop.1" in refused(raw_with(("rollout", "stop"), ["\n", "\udfff"]))
    resources = {"\udc80node": 1}
    message = refused(raw_with(("cluster", "learner", "resources"), resources))
    assert "resources.\\udc80node" in message
    message.encode()
    # A well-formed pair (an emoji) is fine.
    assert validate_spec(raw_with(("data", "system_prompt"), "😀")).data.system_prompt == "😀"


@pytest.mark.parametrize(
    ("columns", "problem"),
    [
        (["c"] * 65, "at most 64 items"),
        (["c" * 257], "at most 256 characters"),
        ([""], "at least 1 character"),
        (["solution", "prompts"], "['prompts'] collide"),
        ("every", "Input should be 'all'"),
    ],
)
def test_metadata_fields_are_bounded_naming_the_field(columns, problem):
    message = refused(raw_with(("data", "metadata_fields"), columns))
    assert "data.metadata_fields" in message and problem in message, message


def test_metadata_fields_within_the_bounds_are_kept():
    names = [f"c{i}" for i in range(64)]
    assert validate_spec(raw_with(("data", "metadata_fields"), names)).data.metadata_fields == (
        tuple(names)
    )
    assert validate_spec(raw_with(("data", "metadata_fields"), "all")).data.metadata_fields == "all"


@pytest.mark.parametrize(
    "url", ["not a url", "file:///etc/passwd", "gopher://rm.internal:70/_", "rm.internal:8000"]
)
def test_reward_urls_must_be_http_or_https(url):
    assert "reward.url" in refused(raw_with(("reward", "url"), url))


def test_a_token_url_must_share_the_reward_urls_origin():
    reward = {"url": "http://rm.internal:8000/v1", "token_url": "http://rm.internal:8000"}
    assert validate_spec(raw_with(("reward",), reward)).reward.token_url == reward["token_url"]
    for token_url in ("http://rm.internal:8001", "http://evil.example:8000"):
        message = refused(raw_with(("reward",), {**reward, "token_url": token_url}))
        assert "reward.token_url" in message
    assert "reward.token_url" in refused(raw_with(("reward",), {"token_url": "http://rm.internal"}))
