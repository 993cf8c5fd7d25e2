"""The job state machine: one table of transitions, used by every writer of a job's state.

DESIGN.md: QUEUED → RUNNING → SUCCEEDED | FAILED; QUEUED → CANCELLED | FAILED;
RUNNING → CANCELLING → CANCELLED | FAILED. Terminal states never change.

Everything that can happen to a job is an ``Event``; ``transition(state, event)``
looks the pair up in ``TRANSITIONS`` and either returns the next state or raises
``IllegalTransition``. The store applies it with a compare-and-set, so a state
is only ever written by this function. Some events map to different states in
different states on purpose (a Ray job stopped while CANCELLING is the end of a
cancel; while RUNNING it is a failure), and that mapping lives here too.

``resume`` is the one way out of FAILED or CANCELLED: it starts a *new run* of
the job (the run number goes up) in QUEUED. Within one run, a terminal state is
final.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Handed to Ray: counts against ``max_running``."""
        return self in (JobState.RUNNING, JobState.CANCELLING)


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Event(StrEnum):
    LAUNCH = "launch"
    """The scheduler handed the run to Ray's job system."""
    START = "start"
    """The driver reported RUNNING."""
    SUCCEED = "succeed"
    """The driver reported SUCCEEDED, or its Ray job succeeded."""
    FAIL = "fail"
    """The driver reported FAILED, its Ray job failed or vanished, or the launch failed."""
    CANCEL = "cancel"
    """The job's owner asked to cancel."""
    CANCELLED = "cancelled"
    """The driver reported CANCELLED (it checkpointed and exited)."""
    STOPPED = "stopped"
    """Ray reports the job STOPPED (after the grace period, or by someone else)."""
    RESUME = "resume"
    """The owner asked to run a FAILED or CANCELLED job again from its last checkpoint."""


S, E = JobState, Event

# The legal changes of state of one run (DESIGN.md), and the resume edge that starts a new run.
LEGAL: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLING}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
RESUMABLE = frozenset({S.FAILED, S.CANCELLED})

TRANSITIONS: dict[tuple[JobState, Event], JobState] = {
    (S.QUEUED, E.LAUNCH): S.RUNNING,
    (S.QUEUED, E.CANCEL): S.CANCELLED,
    (S.QUEUED, E.FAIL): S.FAILED,
    (S.RUNNING, E.START): S.RUNNING,
    (S.RUNNING, E.SUCCEED): S.SUCCEEDED,
    (S.RUNNING, E.FAIL): S.FAILED,
    (S.RUNNING, E.CANCEL): S.CANCELLING,
    # The driver stopped on a signal nobody sent through the API (e.g. `ray job stop`).
    (S.RUNNING, E.CANCELLED): S.FAILED,
    (S.RUNNING, E.STOPPED): S.FAILED,
    (S.CANCELLING, E.START): S.CANCELLING,
    (S.CANCELLING, E.CANCEL): S.CANCELLING,
    (S.CANCELLING, E.CANCELLED): S.CANCELLED,
    (S.CANCELLING, E.STOPPED): S.CANCELLED,
    # Finished its last step before it saw the request: still the end of a cancel.
    (S.CANCELLING, E.SUCCEED): S.CANCELLED,
    (S.CANCELLING, E.FAIL): S.FAILED,
    (S.FAILED, E.RESUME): S.QUEUED,
    (S.CANCELLED, E.RESUME): S.QUEUED,
}


class IllegalTransition(ValueError):
    """``event`` cannot happen to a job in ``state``; the message says why."""

    def __init__(self, state: JobState, event: Event) -> None:
        self.state, self.event = state, event
        if event is Event.RESUME:
            reason = f"only FAILED or CANCELLED jobs can be resumed; this one is {state}"
        elif state.terminal:
            reason = f"the job is already {state}, which is final"
        else:
            reason = f"{event.value!r} cannot happen to a {state} job"
        super().__init__(reason)


def transition(state: JobState, event: Event) -> JobState:
    """The state after ``event``, or ``IllegalTransition``."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def starts_new_run(event: Event) -> bool:
    """Whether applying ``event`` begins a new run of the job."""
    return event is Event.RESUME
