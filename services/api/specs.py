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

A spec without ``output.dir`` gets its own run directory, ``runs/<job id>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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
REDACTED = "***"


class SpecRejected(ValueError):
    """The spec is valid on its own but this API will not run it; one entry per field."""

    def __init__(self, problems: list[tuple[tuple[str, ...], str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(loc)}: {msg}" for loc, msg in problems))


def spec_hash(spec: JobSpec) -> str:
    """The identity of a submitted body: the fields it set, in a canonical form."""
    canonical = json.dumps(spec.model_dump(mode="json", exclude_unset=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def prepare(spec: JobSpec, *, roots: list[Path], job_id: str) -> dict[str, Any]:
    """The spec the driver will get (a JSON mapping); ``SpecRejected`` lists every problem."""
    raw = spec.model_dump(mode="json")
    if "dir" not in spec.output.model_fields_set:
        raw["output"]["dir"] = f"runs/{job_id}"
    problems: list[tuple[tuple[str, ...], str]] = []
    for section, key in PATH_FIELDS:
        value = raw[section][key]
        if value is None or (section == "checkpoint" and value in CHECKPOINT_KEYWORDS):
            continue
        try:
            raw[section][key] = str(confine(value, roots))
        except ValueError as error:
            problems.append((("body", section, key), str(error)))
    if spec.cluster.ray_address not in (None, "auto"):
        problems.append(
            (
                ("body", "cluster", "ray_address"),
                "a job submitted to the API runs on the API's Ray cluster; leave "
                "cluster.ray_address null",
            )
        )
    token_env = spec.reward.token_env
    if token_env is not None and not token_env.startswith(REWARD_TOKEN_PREFIX):
        problems.append(
            (
                ("body", "reward", "token_env"),
                f"must name a {REWARD_TOKEN_PREFIX}* environment variable, got {token_env!r}",
            )
        )
    if problems:
        raise SpecRejected(problems)
    return raw


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
    if reward.get("url"):
        reward["url"] = redact_url(reward["url"])
    return shown


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
