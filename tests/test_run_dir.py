"""The run directory keeps a checkpoint and readable metrics through crashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.train.run_dir import RunDirectory


def write_state(value: str):
    def write(tmp):
        (tmp / "state.txt").write_text(value)

    return write


def test_replacing_a_checkpoint_of_the_same_step_keeps_one_at_every_instant(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path)
    run.prepare({"name": "x"})
    run.write_checkpoint(3, write_state("first"), keep_last=1)
    rename = Path.rename

    def die_before_the_new_one_is_in(self, target):
        if self.name.startswith(".tmp-"):
            raise KeyboardInterrupt  # the process dies between the two renames
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", die_before_the_new_one_is_in)
    with pytest.raises(KeyboardInterrupt):
        run.write_checkpoint(3, write_state("second"), keep_last=1)
    monkeypatch.undo()
    assert (run.latest_checkpoint() / "state.txt").read_text() == "first"
    path = run.write_checkpoint(3, write_state("second"), keep_last=1)
    assert (path / "state.txt").read_text() == "second"
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_3"]


def test_a_checkpoint_set_aside_by_an_unfinished_replacement_is_restored(tmp_path):
    run = RunDirectory(tmp_path)
    run.prepare({"name": "x"})
    run.write_checkpoint(5, write_state("kept"), keep_last=1)
    # the instant between moving the old one aside and renaming the new one in
    (run.checkpoints / "step_5").rename(run.checkpoints / ".old-step_5")
    latest = run.latest_checkpoint()
    assert latest is not None and latest.name == "step_5"
    assert (latest / "state.txt").read_text() == "kept"


def test_a_torn_last_metrics_line_is_dropped_and_a_torn_middle_line_is_an_error(tmp_path):
    run = RunDirectory(tmp_path)
    run.prepare({"name": "x"})
    run.append_metrics({"step": 1, "loss": 0.5})
    with open(run.metrics_file, "a") as handle:
        handle.write('{"step": 2, "lo')  # the crash happened mid-line
    assert run.read_metrics() == [{"step": 1, "loss": 0.5}]
    run.truncate_after(1)  # what resume does: the file reads as one run again
    run.append_metrics({"step": 2, "loss": 0.4})
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    lines = run.metrics_file.read_text().splitlines()
    run.metrics_file.write_text("\n".join([lines[0], "{torn", lines[1]]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not valid JSON"):
        run.read_metrics()
    assert json.loads(lines[1])["step"] == 2


def test_a_run_that_does_not_resume_leaves_no_older_checkpoint_behind(tmp_path):
    run = RunDirectory(tmp_path)
    run.prepare({"name": "x"})
    run.write_checkpoint(200, write_state("older run"), keep_last=2)
    run.append_metrics({"step": 200})
    run.start_fresh()
    assert run.latest_checkpoint() is None and run.read_metrics() == []
