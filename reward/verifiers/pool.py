"""A process pool that gives every task a deadline and survives tasks that never return.

Math answer checking (sympy) can run for minutes on adversarial answers such as
`9^{9^{9^9}}`, and math-verify's own timeout (SIGALRM) only works on a main thread and
reports a timeout as a wrong answer. So each task runs in a worker process's main thread
under our own SIGALRM deadline (an exception the checked code cannot swallow), and comes
back as status `timeout`. A task stuck in C code, where signals are not delivered, is
caught by a backstop in the parent: the pool is killed and recreated, the stuck task is a
timeout, and the other tasks in flight are resubmitted. Workers start with `forkserver`
(or `spawn` where there is none), never plain `fork`, because the service is threaded.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 3
_START_TIMEOUT_S = 120.0


class _Deadline(BaseException):
    """Raised by SIGALRM inside a task. A BaseException, so that the `except Exception`
    clauses of the checked library cannot turn it into a wrong answer."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _Deadline()


def run_with_deadline(fn: Callable[..., Any], args: tuple, timeout_s: float) -> tuple[str, Any]:
    """Run `fn(*args)` in this (worker) process's main thread with a deadline.

    Returns `("ok", value)`, `("timeout", message)` or `("error", message)`.
    """
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return ("ok", fn(*args))
    except _Deadline:
        return ("timeout", f"no result within {timeout_s:g} s")
    except Exception as exc:
        return ("error", f"{type(exc).__name__}: {exc}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _init_worker(initializer: Callable[[], None] | None) -> None:
    # The parent handles Ctrl-C and shuts the pool down; workers should not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer()


def _noop() -> None:
    return None


@dataclass(frozen=True)
class Outcome:
    """The result of one task: `value` when ok, `error` otherwise."""

    status: str
    value: Any = None
    error: str | None = None


def _context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Modules imported once in the fork server, so that new workers start warm.
        # No effect if the fork server of this process is already running.
        ctx.set_forkserver_preload(list(preload))
        return ctx
    return multiprocessing.get_context("spawn")


class DeadlinePool:
    """`workers` processes running tasks under a per-task deadline of `timeout_s`.

    `map(fn, args_list)` blocks until every task has an `Outcome`; it is thread-safe and
    may be called by several threads at once. `fn` must be importable (module level).
    """

    def __init__(
        self,
        workers: int,
        timeout_s: float,
        *,
        initializer: Callable[[], None] | None = None,
        preload: Sequence[str] = (),
    ):
        self.workers = workers
        self.timeout_s = timeout_s
        # A task counts as started when it enters the executor's call queue, which holds
        # one task more than there are workers: that task may wait one deadline first.
        self.backstop_s = 2 * timeout_s + 1.0
        self._poll_s = min(0.25, max(0.01, timeout_s / 4))
        self._initializer = initializer
        self._preload = tuple(preload)
        self._lock = threading.Lock()
        self._executor: cf.ProcessPoolExecutor | None = None
        self._generation = 0
        self._closed = False
        self.restarts = 0

    def start(self) -> None:
        """Start the workers and wait until each has run its initializer."""
        self._current()

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            self._closed = True
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def map(self, fn: Callable[..., Any], args_list: Sequence[tuple]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(args_list)
        pending = list(range(len(args_list)))
        for _ in range(_MAX_ATTEMPTS):
            if not pending:
                break
            try:
                executor, generation = self._current()
            except RuntimeError:  # closed while we worked
                break
            futures: dict[cf.Future, int] = {}
            try:
                for index in pending:
                    future = executor.submit(
                        run_with_deadline, fn, args_list[index], self.timeout_s
                    )
                    futures[future] = index
            except (BrokenProcessPool, RuntimeError):
                # The pool broke, or another thread replaced it, while we submitted.
                self._restart(generation)
            self._collect(futures, outcomes, generation)
            pending = [index for index in pending if outcomes[index] is None]
        for index in pending:
            outcomes[index] = Outcome(
                "error", error="worker pool kept failing or was shut down; see service logs"
            )
        return [outcome for outcome in outcomes if outcome is not None]

    def _collect(
        self, futures: dict[cf.Future, int], outcomes: list[Outcome | None], generation: int
    ) -> None:
        """Wait for `futures`, filling `outcomes`; tasks lost to a broken pool stay None."""
        started: dict[cf.Future, float] = {}
        not_done = set(futures)
        while not_done:
            done, not_done = cf.wait(not_done, timeout=self._poll_s)
            # A future cancelled by a pool shutdown never counts as done for cf.wait.
            cancelled = {future for future in not_done if future.cancelled()}
            not_done -= cancelled
            for future in done | cancelled:
                outcome = self._outcome(future)
                if outcome is None:
                    self._restart(generation)
                else:
                    outcomes[futures[future]] = outcome
            stuck = self._stuck(futures, not_done, started)
            if stuck:
                message = f"no result within {self.timeout_s:g} s (worker stuck; pool restarted)"
                for future in stuck:
                    outcomes[futures[future]] = Outcome("timeout", error=message)
                    not_done.discard(future)
                logger.warning("%d task(s) stuck past the deadline; restarting workers", len(stuck))
                self._restart(generation)

    def _stuck(
        self,
        futures: dict[cf.Future, int],
        not_done: set[cf.Future],
        started: dict[cf.Future, float],
    ) -> list[cf.Future]:
        """Tasks executing for longer than the backstop. Running futures are those in the
        executor's FIFO call queue; the first `workers` of them (in submission order) are
        the ones executing, the others wait and are innocent."""
        now = time.monotonic()
        running = [future for future in futures if future in not_done and future.running()]
        for future in running:
            started.setdefault(future, now)
        executing = running[: self.workers]
        return [future for future in executing if now - started[future] > self.backstop_s]

    @staticmethod
    def _outcome(future: cf.Future) -> Outcome | None:
        """The task's outcome, or None if it must be resubmitted (pool broke or restarted)."""
        try:
            status, value = future.result()
        except (BrokenProcessPool, cf.CancelledError):
            return None
        except _Deadline:
            return Outcome("timeout", error="deadline hit while finishing")
        except BaseException as exc:
            return Outcome("error", error=f"{type(exc).__name__}: {exc}")
        if status == "ok":
            return Outcome("ok", value=value)
        return Outcome(status, error=value)

    def _current(self) -> tuple[cf.ProcessPoolExecutor, int]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            if self._executor is None:
                self._executor = self._new_executor()
            return self._executor, self._generation

    def _new_executor(self) -> cf.ProcessPoolExecutor:
        """A new executor whose workers have all started, so that deadlines never count a
        worker's start-up (imports can take seconds on a busy machine)."""
        executor = cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=_context(self._preload),
            initializer=_init_worker,
            initargs=(self._initializer,),
        )
        cf.wait([executor.submit(_noop) for _ in range(self.workers)], timeout=_START_TIMEOUT_S)
        return executor

    def _restart(self, generation: int) -> None:
        """Kill the executor of `generation` (no-op if another thread already did); the
        next `_current()` starts a new one."""
        with self._lock:
            if generation != self._generation or self._executor is None:
                return
            old, self._executor = self._executor, None
            self._generation += 1
            self.restarts += 1
        # Kill rather than wait: a stuck worker would never finish its task.
        for process in list((getattr(old, "_processes", None) or {}).values()):
            process.kill()
        old.shutdown(wait=False, cancel_futures=True)
