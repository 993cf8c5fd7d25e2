"""The run directory (``output.dir``): what a training run leaves behind.

Owns the layout of DESIGN.md — ``config.json``, ``metrics.jsonl``,
``samples.jsonl``, ``curves.png``, ``checkpoints/step_N/`` and ``final/``, plus
``placement.json`` (which node runs which part) and ``groups.jsonl`` (every group
of every step and its outcome, from which lost and duplicated groups are counted) —
and the rules that keep it trustworthy: checkpoints appear atomically (written
to a temporary sibling, flushed to disk, then renamed; one that replaces a
checkpoint of the same step moves the old one aside first, so that at every
instant one complete ``step_N`` exists or can be restored), only the newest
``keep_last`` are kept, a torn last line of a ``.jsonl`` file (a crash while
writing it) is dropped with a warning, and on resume the metric and sample
and group lines written after the checkpoint are cut so that the files read as
one uninterrupted run. Lines are appended with one write and one fsync per call.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^step_(\d+)$")
_SET_ASIDE = re.compile(r"^\.old-step_(\d+)$")
CURVES = (
    ("reward/mean", "reward"),
    ("eval/accuracy", "eval accuracy"),
    ("loss/kl", "KL"),
    ("time/step_s", "step time (s)"),
)


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_file = self.path / "metrics.jsonl"
        self.samples_file = self.path / "samples.jsonl"
        self.groups_file = self.path / "groups.jsonl"

    def prepare(self, spec: dict[str, Any]) -> None:
        """Create the directory and write ``config.json`` (spec, version, git commit)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        resolved = {"spec": spec, "version": _package_version(), "git_commit": _git_commit()}
        _write_atomic(self.path / "config.json", json.dumps(resolved, indent=2))

    def write_placement(self, placement: dict[str, Any]) -> None:
        """``placement.json``: the Ray node of the learner, reward service and engines."""
        _write_atomic(self.path / "placement.json", json.dumps(placement, indent=2))

    # ---------------------------------------------------------------- metrics

    def append_metrics(self, record: dict[str, Any]) -> None:
        _append_lines(self.metrics_file, [record])

    def append_samples(self, records: list[dict[str, Any]]) -> None:
        _append_lines(self.samples_file, records)

    def append_groups(self, records: list[dict[str, Any]]) -> None:
        _append_lines(self.groups_file, records)

    def read_groups(self) -> list[dict[str, Any]]:
        return _read_lines(self.groups_file)

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_lines(self.metrics_file)

    def start_fresh(self) -> None:
        """A run that does not resume owns the directory: earlier metrics, samples and
        checkpoints go (else a later ``resume: auto`` could pick up an older run's)."""
        old = self.list_checkpoints()
        if old:
            log.warning(
                "not resuming: removing %d earlier checkpoint(s) in %s", len(old), self.path
            )
        for _, path in old:
            shutil.rmtree(path)
        self.truncate_after(-1)

    def truncate_after(self, step: int) -> None:
        """Drop metric, sample and group lines of steps after ``step`` (written before a
        crash)."""
        for path in (self.metrics_file, self.samples_file, self.groups_file):
            kept = [r for r in _read_lines(path) if r.get("step", 0) <= step]
            _write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------ checkpoints

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    def write_checkpoint(self, step: int, write: Callable[[Path], None], keep_last: int) -> Path:
        """Call ``write(tmp_dir)``, then rename it to ``step_N`` and prune old ones."""
        target = self.checkpoint_dir(step)
        tmp = self.checkpoints / f".tmp-step_{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        _fsync_tree(tmp)
        aside = self.checkpoints / f".old-step_{step}"
        if target.exists():  # the old one stays complete until the new one is in place
            shutil.rmtree(aside, ignore_errors=True)
            target.rename(aside)
        tmp.rename(target)
        _fsync_dir(self.checkpoints)
        shutil.rmtree(aside, ignore_errors=True)
        self._prune(keep_last)
        return target

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (one set aside by a replacement that did not
        finish is put back first)."""
        if not self.checkpoints.exists():
            return []
        self._restore_set_aside()
        found = []
        for entry in self.checkpoints.iterdir():
            match = _CHECKPOINT.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def _restore_set_aside(self) -> None:
        for entry in self.checkpoints.iterdir():
            match = _SET_ASIDE.match(entry.name)
            if not match:
                continue
            target = self.checkpoint_dir(int(match.group(1)))
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                log.warning("restoring %s: its replacement did not finish", target)
                entry.rename(target)

    def latest_checkpoint(self) -> Path | None:
        checkpoints = self.list_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def _prune(self, keep_last: int) -> None:
        for _, path in self.list_checkpoints()[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ plots

    def plot_curves(self) -> Path | None:
        """Draw ``curves.png`` from ``metrics.jsonl``: reward, accuracy, KL, step time."""
        records = self.read_metrics()
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
        for axis, (key, title) in zip(axes, CURVES):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points), marker="." if len(points) < 30 else None)
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        figure.tight_layout()
        out = self.path / "curves.png"
        figure.savefig(out, dpi=90)
        plt.close(figure)
        return out


def _append_lines(path: Path, records: list[dict[str, Any]]) -> None:
    if not records:
        return
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a ``.jsonl`` file; a torn last line is dropped with a warning."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(
                    f"{path}:{number} is not valid JSON; the file is damaged"
                ) from None
            log.warning("%s: dropping a torn last line (a crash while it was written)", path)
    return records


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(Path(directory) / name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _package_version() -> str:
    try:
        return metadata.version("grpo-service")
    except metadata.PackageNotFoundError:
        return "unknown"


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None
