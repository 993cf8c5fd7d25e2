"""The demo's base policy is reproducible: a warm-up built from nothing has the digest
that examples/arithmetic/README.md records (what `grpo arithmetic prepare` prints)."""

from __future__ import annotations

import re
from pathlib import Path

from services.embedded.arithmetic import base_model_dir, weights_sha256

README = Path(__file__).resolve().parents[1] / "examples" / "arithmetic" / "README.md"


def recorded_sha256() -> str:
    found = re.search(r"base model SHA-256: `([0-9a-f]{64})`", README.read_text())
    assert found, f"{README} records no base model SHA-256"
    return found.group(1)


def test_a_fresh_warm_up_builds_the_recorded_base_model(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE_DIR", str(tmp_path))  # nothing cached: build it all
    built = base_model_dir()
    assert built.is_relative_to(tmp_path)
    assert weights_sha256(built) == recorded_sha256()
