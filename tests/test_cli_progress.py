"""The console of ``grpo train`` (services/progress.py) and the engine's log filter,
from recorded metrics dicts: no Ray, no vLLM."""

from __future__ import annotations

import io
import itertools
import logging
import os
import time

from rich.console import Console

from services.progress import StepDisplay, StepState, console_warnings, quiet_output, step_line

EVAL_0 = {"step": 0, "eval/accuracy": 0.34375, "eval/unscorable_frac": 0.0}
TIMES = {
    "time/step_s": 3.84,
    "time/generate_s": 1.29,
    "time/reward_s": 0.11,
    "time/logprob_s": 0.57,
    "time/train_s": 1.73,
    "time/weight_sync_s": 0.13,
}


def step(n: int, reward: float, **extra: float) -> dict:
    return {"step": n, "reward/mean": reward, "loss/kl": 0.01, **TIMES, **extra}


def test_one_compact_line_per_recorded_step():
    state = StepState(total=200)
    state.update(0, EVAL_0, now=100.0)
    assert step_line(state) == "step   0/200 | acc 0.344 @0"
    state.update(1, step(1, 0.25), now=104.0)
    assert step_line(state) == (
        "step   1/200 | reward 0.250 | acc 0.344 @0 | 3.84 s/step "
        "(gen 1.29 reward 0.11 logprob 0.57 train 1.73 sync 0.13) | ETA 13m16s"
    )
    state.update(20, step(20, 0.5, **{"eval/accuracy": 0.5}), now=180.0)
    assert step_line(state).startswith("step  20/200 | reward 0.500 | acc 0.500 @20 | 3.84")
    assert step_line(state).endswith("| ETA 12m00s")  # 4 s a step so far, 180 steps left
    state.update(200, step(200, 0.6, **{"eval/accuracy": 0.6}), now=900.0)
    assert "ETA" not in step_line(state) and "acc 0.600 @200" in step_line(state)


def test_a_run_without_evaluation_or_with_a_nan_reward():
    state = StepState(total=3)
    state.update(1, {**step(1, 0.0), "reward/mean": None}, now=0.0)
    assert step_line(state) == (
        "step 1/3 | 3.84 s/step (gen 1.29 reward 0.11 logprob 0.57 train 1.73 sync 0.13) | ETA 8s"
    )


def test_the_display_prints_one_line_per_step_when_not_a_terminal(monkeypatch):
    clock = iter([0.0, 3.0, 6.0])  # steps LINE_INTERVAL_S or more apart: every one prints
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    records = [EVAL_0, step(1, 0.25), step(2, 0.5, **{"eval/accuracy": 0.4})]
    with StepDisplay(200, out) as display:
        assert not display.live
        for record in records:
            display(record["step"], record)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0] == "step   0/200 | acc 0.344 @0"
    assert lines[2].startswith("step   2/200 | reward 0.500 | acc 0.400 @2 | 3.84 s/step (gen")
    assert all(len(line) < 140 for line in lines)


def test_fast_steps_off_a_terminal_print_one_screen_a_minute(monkeypatch):
    """Steps of 1 s for a minute: at most 24 step lines (one every LINE_INTERVAL_S), but
    every evaluation and the last step print."""
    clock = iter(float(t) for t in range(61))
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    with StepDisplay(60, out) as display:
        display(0, EVAL_0)
        for n in range(1, 61):
            extra = {"eval/accuracy": 0.5} if n == 20 else {}
            display(n, step(n, 0.5, **extra))
    lines = out.getvalue().splitlines()
    assert len(lines) <= 24 + 2
    printed = [int(line.split("/")[0].split()[-1]) for line in lines]
    assert printed[0] == 0 and 20 in printed and printed[-1] == 60
    assert all(b - a <= 3 for a, b in itertools.pairwise(printed))  # never a long silence


def test_the_live_display_renders_bar_facts_and_eta_from_records():
    out = io.StringIO()
    display = StepDisplay(200, out, live=True)  # not started: rendered by hand below
    display(0, EVAL_0)
    display(1, step(1, 0.25))
    screen = Console(file=io.StringIO(), width=160)
    screen.print(display.progress)
    text = screen.file.getvalue()
    assert "training" in text and "1/200" in text and "ETA" in text
    assert "reward 0.250 | acc 0.344 @0 | 3.84 s/step (gen 1.29 reward 0.11" in text
    assert "logprob 0.57 train 1.73 sync 0.13)" in text
    assert out.getvalue().splitlines() == ["step   0/200 | acc 0.344 @0"]  # evals stay above


def test_before_the_first_step_the_live_display_says_it_is_starting():
    screen = Console(file=io.StringIO(), width=160)
    screen.print(StepDisplay(10, io.StringIO(), live=True).progress)
    assert "0/10" in screen.file.getvalue() and "starting Ray" in screen.file.getvalue()


def test_quiet_output_sends_fds_1_and_2_to_the_log_file(tmp_path, capfd):
    log_file = tmp_path / "logs" / "train.log"
    with quiet_output(log_file) as out:
        os.write(1, b"(EngineActor pid=1) INFO vllm noise\n")
        os.write(2, b"ray noise on stderr\n")  # sys.stderr writes here (pytest swaps it)
        out.write("step 1/3 | reward 0.250\n")
    print("after", flush=True)
    captured = capfd.readouterr()
    assert captured.out == "step 1/3 | reward 0.250\nafter\n"
    assert captured.err == ""
    logged = log_file.read_text()
    assert "vllm noise" in logged and "ray noise on stderr" in logged
    assert "step 1/3" not in logged


def test_only_this_projects_warnings_reach_the_console():
    out = io.StringIO()
    display = StepDisplay(3, out)
    with console_warnings(display):
        logging.getLogger("services.train.run").warning("stop requested")
        logging.getLogger("rollout.pool").info("an info line")
        logging.getLogger("ray.worker").warning("ray noise")
        logging.getLogger("vllm.engine").warning("vllm noise")
    assert out.getvalue() == "warning: stop requested\n"


def _record(msg: str, *args: object, name: str = "layerwise") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, "layerwise.py", 266, msg, args, None)


def test_the_engine_log_filter_drops_exactly_the_two_harmless_reload_warnings():
    from rollout.worker_extension import _HarmlessReloadWarnings

    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    installed = [f for f in reload_logger.filters if isinstance(f, _HarmlessReloadWarnings)]
    assert len(installed) == 1
    keep = installed[0].filter
    assert not keep(_record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not keep(_record("%s: Failed to load weights", "ParallelLMHead"))
    assert keep(_record("%s: Failed to load weights", "QKVParallelLinear"))
    assert keep(_record("%s: Failed to load weights", "Llama3RotaryEmbedding"))
    assert keep(_record("%s: Excessive loading", "RotaryEmbedding"))
    assert keep(_record("RotaryEmbedding: Failed to load weights"))
    assert keep(_record("%s: %s", "ParallelLMHead", "Failed to load weights"))


def test_a_failed_run_restores_the_console_and_names_the_log_file(tmp_path, capfd):
    log_file = tmp_path / "train.log"
    try:
        with quiet_output(log_file):
            os.write(2, b"engine traceback\n")
            raise RuntimeError("engine died")
    except RuntimeError:
        pass
    os.write(2, b"the traceback\n")
    captured = capfd.readouterr()
    assert str(log_file) in captured.err and captured.err.endswith("the traceback\n")
    assert "engine traceback" in log_file.read_text()
