"""What the job API adds to spec validation, and what it shows of a spec.

``services.spec.JobSpec`` (FastAPI validates the body against it) checks the fields.
Here come the checks that only a shared service needs, before anything starts:

- every path field (model.path, data.train, data.eval, output.dir, checkpoint.resume
  when a path) must resolve — symlinks followed — under one of the configured roots,
  and may not contain ``..``; relative paths are taken relative to the first root. The
  driver gets the resolved absolute paths.
- ``cluster.ray_address`` must be null or ``auto``: a submitted job runs on the API's
  cluster.
- ``reward.token_env`` must name a ``GRPO_REWARD_*`` variable, so that a spec cannot
  send another secret of the driver's environment to a URL of its choosing.
- ``reward.url``, when set, must have the scheme, host and port of an entry of
  ``GRPO_API_ALLOWED_REWARD_URLS`` (``services.reward_urls``); the matched entry is
  written into the driver's spec as ``reward.token_url``, the only origin the driver
  sends the reward token to. A submitted ``token_url`` is replaced.
- ``output.dir`` may not be an allowed root itself (it would hold every other run).

A spec without ``output.dir`` gets its own run directory, ``runs/<job id>``. These
checks read only the spec and the API's settings (and resolve paths): no Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.reward_urls import matching_entry, redact_url
from services.spec import JobSpec

PATH_FIELDS = (
    ("model", "path"),
    ("data", "train"),
    ("data", "eval"),
    ("output", "dir"),
    ("checkpoint", "resume"),
)
CHECKPOINT_KEYWORDS = ("auto", "never")
REWARD_TOKEN_PREFIX = "GRPO_REWARD_"
Problems = list[tuple[tuple[str, ...], str]]


class SpecRejected(ValueError):
    """The spec is valid on its own but this API will not run it; one entry per field."""

    def __init__(self, problems: list[tuple[tuple[str, ...], str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(loc)}: {msg}" for loc, msg in problems))


def spec_hash(spec: JobSpec) -> str:
    """The identity of a submitted body: the fields it set, in a canonical form."""
    canonical = json.dumps(spec.model_dump(mode="json", exclude_unset=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def prepare(
    spec: JobSpec, *, roots: list[Path], job_id: str, allowed_reward_urls: Sequence[str] = ()
) -> dict[str, Any]:
    """The spec the driver will get (a JSON mapping); ``SpecRejected`` lists every problem."""
    raw = spec.model_dump(mode="json")
    if "dir" not in spec.output.model_fields_set:
        raw["output"]["dir"] = f"runs/{job_id}"
    problems = _confine_paths(raw, roots)
    if spec.cluster.ray_address not in (None, "auto"):
        problems.append(
            (
                ("body", "cluster", "ray_address"),
                "a job submitted to the API runs on the API's Ray cluster; leave "
                "cluster.ray_address null",
            )
        )
    problems += _reward_problems(raw["reward"], allowed_reward_urls)
    if problems:
        raise SpecRejected(problems)
    return raw


def _confine_paths(raw: dict[str, Any], roots: list[Path]) -> Problems:
    """Resolve every path field of ``raw`` in place; the problems of those that fail."""
    problems: Problems = []
    for section, key in PATH_FIELDS:
        value = raw[section][key]
        if value is None or (section == "checkpoint" and value in CHECKPOINT_KEYWORDS):
            continue
        try:
            raw[section][key] = str(confine(value, roots))
        except ValueError as error:
            problems.append((("body", section, key), str(error)))
    output = raw["output"]["dir"]
    if Path(output) in roots:
        problems.append(
            (
                ("body", "output", "dir"),
                f"{output} is an allowed root itself, which holds other runs; give the job "
                "a directory of its own under it, e.g. runs/<name>",
            )
        )
    return problems


def _reward_problems(reward: dict[str, Any], allowed: Sequence[str]) -> Problems:
    """Check the token variable and admit ``reward.url``, setting ``reward.token_url``."""
    problems: Problems = []
    token_env = reward["token_env"]
    if token_env is not None and not token_env.startswith(REWARD_TOKEN_PREFIX):
        problems.append(
            (
                ("body", "reward", "token_env"),
                f"must name a {REWARD_TOKEN_PREFIX}* environment variable, got {token_env!r}",
            )
        )
    url = reward["url"]
    reward["token_url"] = None if url is None else matching_entry(url, allowed)
    if url is not None and reward["token_url"] is None:
        listed = ", ".join(redact_url(entry) for entry in allowed) or "none"
        problems.append(
            (
                ("body", "reward", "url"),
                f"{redact_url(url)} is not a reward service this API allows (scheme, host "
                f"and port of GRPO_API_ALLOWED_REWARD_URLS: {listed}); use one of them, or "
                "reward.url: null to let the driver start its own",
            )
        )
    return problems


def confine(value: str, roots: list[Path]) -> Path:
    """``value`` resolved (relative to ``roots[0]``, symlinks followed) if under a root."""
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    path = Path(value)
    if ".." in path.parts:
        raise ValueError(f"{value!r}: '..' is not allowed in paths")
    if not path.is_absolute():
        path = roots[0] / path
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError) as error:
        raise ValueError(f"{value!r} cannot be resolved: {error}") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise ValueError(
            f"{value!r} resolves to {resolved}, outside the allowed roots ({allowed}); "
            "use a path under one of them (GRPO_API_ALLOWED_ROOTS)"
        )
    return resolved


def for_run(spec: dict[str, Any], run: int) -> dict[str, Any]:
    """The spec of run ``run``: later runs resume from the newest checkpoint in output.dir."""
    if run == 1:
        return spec
    return {**spec, "checkpoint": {**spec["checkpoint"], "resume": "auto"}}


def redact(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy to show: credentials and query strings in URLs are replaced by ***."""
    shown = json.loads(json.dumps(spec))
    reward = shown.get("reward") or {}
    for key in ("url", "token_url"):
        if reward.get(key):
            reward[key] = redact_url(reward[key])
    return shown
