"""The console of ``grpo train``: what a person watching a training run sees.

Owns three things:

- :class:`StepState` and :func:`step_line`: the facts of the latest recorded
  step (step / total, reward mean, the last evaluation's accuracy, the step
  time and its breakdown from the ``time/*`` metrics, the ETA), computed from
  the metrics records the run passes to ``on_step``;
- :class:`StepDisplay`: that ``on_step`` callback. On a terminal it is a live
  rich display (a bar with elapsed time and ETA, the facts below it, and one
  line kept per evaluation); elsewhere (a pipe, CI, ``--verbose``) it prints
  one compact line per step, at most one every ``LINE_INTERVAL_S`` seconds (the
  first and last steps and every evaluation always print);
- :func:`quiet_output`: for the run's duration, the process's stdout and
  stderr (file descriptors 1 and 2, so Ray's forwarded worker output, its
  own log lines and vLLM's all go there) point at the run's log file, while
  the display and this project's own warnings keep the real console.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

TIMES = (
    ("time/generate_s", "gen"),
    ("time/reward_s", "reward"),
    ("time/logprob_s", "logprob"),
    ("time/train_s", "train"),
    ("time/weight_sync_s", "sync"),
)
PROJECT_PACKAGES = frozenset({"services", "learner", "reward", "rollout", "httpedge"})
LINE_INTERVAL_S = 2.5
"""Off a terminal, steps closer than this to the last printed line are not printed: at
most 24 step lines a minute, one screen (the demo's 1.7 s steps gave 35 lines a minute)."""
STARTING = "starting Ray, the engines, the learner and the reward service…"


@dataclass
class StepState:
    """The latest step's facts, updated from each metrics record."""

    total: int
    step: int | None = None
    record: dict[str, Any] = field(default_factory=dict)  # the latest training step's
    eval_step: int | None = None
    accuracy: float | None = None
    first: tuple[float, int] | None = None  # (clock, step) of the first record seen
    now: float = 0.0

    def update(self, step: int, record: dict[str, Any], now: float | None = None) -> None:
        self.now = time.monotonic() if now is None else now
        if self.first is None:
            self.first = (self.now, step)
        self.step = step
        if record.get("eval/accuracy") is not None:
            self.eval_step, self.accuracy = step, record["eval/accuracy"]
        if "time/step_s" in record:
            self.record = record

    def eta_s(self) -> float | None:
        """Seconds left: the wall time per step seen so far (evaluations included) times
        the steps left; before a second record, the last step time."""
        if self.step is None or self.first is None:
            return None
        left = max(0, self.total - self.step)
        start, first_step = self.first
        if self.step > first_step:
            return (self.now - start) / (self.step - first_step) * left
        step_s = self.record.get("time/step_s")
        return None if step_s is None else step_s * left


def facts(state: StepState) -> list[str]:
    """Reward mean, last eval accuracy (with its step), step time and its breakdown."""
    parts = []
    if state.record.get("reward/mean") is not None:
        parts.append(f"reward {state.record['reward/mean']:.3f}")
    if state.accuracy is not None:
        parts.append(f"acc {state.accuracy:.3f} @{state.eval_step}")
    timing = timing_text(state.record)
    if timing:
        parts.append(timing)
    return parts


def timing_text(record: dict[str, Any]) -> str:
    """``3.84 s/step (gen 1.29 reward 0.11 logprob 0.57 train 1.73 sync 0.13)``."""
    step_s = record.get("time/step_s")
    if step_s is None:
        return ""
    breakdown = " ".join(
        f"{label} {record[key]:.2f}" for key, label in TIMES if record.get(key) is not None
    )
    return f"{step_s:.2f} s/step ({breakdown})" if breakdown else f"{step_s:.2f} s/step"


def step_line(state: StepState) -> str:
    """One compact line: ``step 12/200 | reward … | acc … @0 | 3.84 s/step (…) | ETA 12m03s``."""
    width = len(str(state.total))
    parts = [f"step {state.step:>{width}}/{state.total}", *facts(state)]
    eta = state.eta_s()
    if eta is not None and state.step is not None and state.step < state.total:
        parts.append(f"ETA {duration(eta)}")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    """``45s``, ``12m03s``, ``1h02m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _TrainProgress(Progress):
    """The bar (steps, elapsed, ETA) with the latest step's facts on a line below it."""

    def __init__(self, state: StepState, console: Console) -> None:
        self.state = state
        super().__init__(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console,
            redirect_stdout=False,  # Ray writes its forwarded lines to sys.stdout
            redirect_stderr=False,
        )
        self.task = self.add_task("training", total=state.total, eta="")

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield Text("  " + (" | ".join(facts(self.state)) or STARTING))

    def show(self) -> None:
        eta = self.state.eta_s()
        self.update(self.task, completed=self.state.step, eta=f"ETA {duration(eta)}" if eta else "")


class StepDisplay:
    """The ``on_step(step, record)`` callback of ``grpo train``; a context manager."""

    def __init__(self, total: int, out: TextIO, *, live: bool | None = None) -> None:
        self.state = StepState(total)
        self.console = Console(file=out, highlight=False)
        self.live = self.console.is_terminal if live is None else live
        self.progress = _TrainProgress(self.state, self.console) if self.live else None
        self.last_line: float | None = None  # clock of the last step line printed

    def __enter__(self) -> StepDisplay:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *_: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, step: int, record: dict[str, Any]) -> None:
        self.state.update(step, record)
        if self.progress is None:
            if self._line_due(step, record):
                self.last_line = self.state.now
                self.say(step_line(self.state))
            return
        self.progress.show()
        if "eval/accuracy" in record:  # kept above the bar: the run's accuracy curve
            self.say(step_line(self.state))

    def _line_due(self, step: int, record: dict[str, Any]) -> bool:
        if self.last_line is None or step >= self.state.total or "eval/accuracy" in record:
            return True
        return self.state.now - self.last_line >= LINE_INTERVAL_S

    def say(self, text: str) -> None:
        """A line on the console (above the live display when there is one)."""
        self.console.print(text, soft_wrap=True, markup=False)


class _ConsoleHandler(logging.Handler):
    """This project's own warnings, on the display's console."""

    def __init__(self, display: StepDisplay) -> None:
        super().__init__(logging.WARNING)
        self.display = display
        self.addFilter(lambda r: r.name.split(".")[0] in PROJECT_PACKAGES)

    def emit(self, record: logging.LogRecord) -> None:
        self.display.say(f"{record.levelname.lower()}: {record.getMessage()}")


@contextmanager
def console_warnings(display: StepDisplay) -> Iterator[None]:
    handler = _ConsoleHandler(display)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)


@contextmanager
def quiet_output(log_file: Path) -> Iterator[TextIO]:
    """Point file descriptors 1 and 2 at ``log_file`` (appended) for the block; yield a
    stream on the real stdout. Both are restored on the way out, before an exception's
    traceback is printed (with a line naming the log file)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(log_file, "a") as log:
        log.write(f"==== grpo train {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield console
    except BaseException:
        _restore(saved, console)
        print(f"(Ray's and vLLM's output of this run: {log_file})", file=sys.stderr)
        raise
    _restore(saved, console)


def _restore(saved: tuple[int, int], console: TextIO) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)
    console.close()
