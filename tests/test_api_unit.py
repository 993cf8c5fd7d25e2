"""The job API's parts without HTTP or Ray: the state machine (a property test over
random event sequences, on the pure table and through the SQL store), path
confinement and redaction of specs, and FIFO scheduling under ``max_running`` with a
stand-in for Ray (the real one is in test_api_ray.py)."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api import specs
from services.api.jobs import token_digest
from services.api.launcher import ENTRYPOINT, TOKEN_FILE, RayJob, RayLauncher, RayUnavailable
from services.api.reconciler import Reconciler
from services.api.settings import ApiSettings
from services.api.states import (
    LEGAL,
    RESUMABLE,
    TERMINAL,
    TRANSITIONS,
    Event,
    IllegalTransition,
    JobState,
    transition,
)
from services.api.store import JobStore, StaleRun
from services.reward_urls import redact_url
from services.spec import validate_spec

EVENTS = st.lists(st.sampled_from(list(Event)), max_size=40)


# --------------------------------------------------------------- state machine


def test_the_table_holds_only_legal_changes_and_resumes():
    for (state, event), new in TRANSITIONS.items():
        if event is Event.RESUME:
            assert state in RESUMABLE and new is JobState.QUEUED
        else:
            assert new is state or new in LEGAL[state], (state, event, new)
    # DESIGN.md's edges are all reachable.
    reachable = {(s, n) for (s, _), n in TRANSITIONS.items() if n is not s}
    for state, targets in LEGAL.items():
        for target in targets:
            assert (state, target) in reachable


def test_terminal_states_only_accept_resume():
    for state in TERMINAL:
        for event in Event:
            if event is Event.RESUME and state in RESUMABLE:
                continue
            with pytest.raises(IllegalTransition):
                transition(state, event)


@given(EVENTS)
def test_random_event_sequences_follow_the_state_machine(events):
    state, run = JobState.QUEUED, 1
    for event in events:
        try:
            new = transition(state, event)
        except IllegalTransition:
            continue
        if event is Event.RESUME:
            assert state in RESUMABLE and new is JobState.QUEUED
            run += 1
        else:
            assert not state.terminal, f"terminal {state} changed on {event}"
            assert new is state or new in LEGAL[state]
        state = new


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=EVENTS)
def test_the_store_applies_random_events_legally(tmp_path, events):
    store = JobStore(f"sqlite:///{tmp_path / 'property.db'}")
    job_id = f"job-{len(store.list_jobs(limit=1000))}"
    store.create(job_id=job_id, name="p", spec={}, spec_hash="h", idempotency_key=None,
                 output_dir=job_id)  # fmt: skip
    for event in events:
        before = store.get(job_id)
        try:
            after, previous = store.apply(job_id, event)
        except IllegalTransition:
            assert store.get(job_id) == before
            continue
        assert previous is before.state
        if event is Event.RESUME:
            assert after.run == before.run + 1 and after.state is JobState.QUEUED
        else:
            assert after.run == before.run and not before.state.terminal
    history = store.events(job_id, limit=1000)
    for earlier, later in itertools.pairwise(history):
        assert later.from_state is earlier.to_state
        if later.event == Event.RESUME:
            assert later.run == earlier.run + 1
        else:
            assert later.run == earlier.run
            assert later.to_state in LEGAL[later.from_state]
    store.close()


def test_concurrent_writers_cannot_make_an_illegal_transition(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'race.db'}")
    store.create(job_id="job-r", name="r", spec={}, spec_hash="h", idempotency_key=None,
                 output_dir="r")  # fmt: skip
    store.apply("job-r", Event.LAUNCH)
    outcomes: list[JobState] = []

    def race(event: Event) -> None:
        with contextlib.suppress(IllegalTransition):
            outcomes.append(store.apply("job-r", event)[0].state)

    threads = [
        threading.Thread(target=race, args=(event,))
        for event in [Event.SUCCEED, Event.FAIL, Event.CANCEL, Event.STOPPED] * 4
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = store.get("job-r").state
    changes = [(e.from_state, e.to_state) for e in store.events("job-r")][2:]
    # One terminal outcome, reached by legal steps, and nothing after it.
    assert final.terminal and changes[-1][1] is final
    for old, new in changes:
        assert new in LEGAL[old]
    store.close()


def test_reports_of_an_old_run_are_refused(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'runs.db'}")
    store.create(job_id="job-o", name="o", spec={}, spec_hash="h", idempotency_key=None,
                 output_dir="o")  # fmt: skip
    store.apply("job-o", Event.LAUNCH)
    store.add_metrics("job-o", 1, {"step": 1, "loss": 0.5})
    store.apply("job-o", Event.FAIL, detail="boom")
    store.apply("job-o", Event.RESUME)
    with pytest.raises(StaleRun):
        store.add_metrics("job-o", 1, {"step": 2})
    with pytest.raises(StaleRun):
        store.apply("job-o", Event.LAUNCH, run=1)
    store.apply("job-o", Event.LAUNCH, run=2)
    store.add_metrics("job-o", 2, {"step": 1, "loss": 0.25})  # resumed: step 1 replaced
    assert store.metrics("job-o") == [{"step": 1, "loss": 0.25}]
    assert store.get("job-o").error is None and store.get("job-o").run == 2
    store.close()


# ----------------------------------------------------------------------- specs


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "root"
    (root / "models" / "m").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "alias").symlink_to(root / "models")
    return [root.resolve()]


def test_paths_resolve_under_the_first_root(roots):
    root = roots[0]
    assert specs.confine("models/m", roots) == root / "models" / "m"
    assert specs.confine(str(root / "models"), roots) == root / "models"
    assert specs.confine("alias/m", roots) == root / "models" / "m"  # a symlink that stays
    assert specs.confine("not/yet/there", roots) == root / "not/yet/there"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("../outside", "'..' is not allowed"),
        ("models/../../outside", "'..' is not allowed"),
        ("/etc/passwd", "outside the allowed roots"),
        ("escape/data.jsonl", "outside the allowed roots"),
        ("bad\x00name", "NUL"),
    ],
)
def test_paths_that_leave_the_roots_are_refused(roots, value, reason):
    with pytest.raises(ValueError, match=reason):
        specs.confine(value, roots)


def spec(**sections):
    raw = {"model": {"path": "models/m"}, "data": {"train": "train.jsonl"},
           "train": {"eval_every": 0}}  # fmt: skip
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate_spec(raw)


def test_prepare_names_every_field_at_fault(roots):
    bad = spec(
        model={"path": "/etc"},
        data={"train": "../x", "eval": "escape/e.jsonl"},
        output={"dir": "/tmp"},
        checkpoint={"resume": "escape/step_3"},
        cluster={"ray_address": "10.0.0.1:6379"},
        reward={"url": "http://rm.internal", "token_env": "RAY_AUTH_TOKEN"},
    )
    with pytest.raises(specs.SpecRejected) as rejected:
        specs.prepare(bad, roots=roots, job_id="job-1")
    fields = [".".join(loc[1:]) for loc, _ in rejected.value.problems]
    assert fields == ["model.path", "data.train", "data.eval", "output.dir",
                      "checkpoint.resume", "cluster.ray_address", "reward.token_env",
                      "reward.url"]  # fmt: skip


def test_prepare_resolves_paths_and_gives_each_job_its_own_run_dir(roots):
    root = roots[0]
    prepared = specs.prepare(spec(), roots=roots, job_id="job-1")
    assert prepared["model"]["path"] == str(root / "models/m")
    assert prepared["data"]["train"] == str(root / "train.jsonl")
    assert prepared["output"]["dir"] == str(root / "runs/job-1")
    assert prepared["checkpoint"]["resume"] == "auto"
    explicit = specs.prepare(spec(output={"dir": "runs/mine"}), roots=roots, job_id="job-2")
    assert explicit["output"]["dir"] == str(root / "runs/mine")
    assert specs.for_run(prepared, 1) is prepared
    never = specs.prepare(spec(checkpoint={"resume": "never"}), roots=roots, job_id="job-3")
    assert specs.for_run(never, 2)["checkpoint"]["resume"] == "auto"


def test_spec_hash_ignores_key_order_but_not_values():
    a = spec(train={"eval_every": 0, "steps": 5}, model={"path": "m"})
    b = spec(model={"path": "m"}, train={"steps": 5, "eval_every": 0})
    c = spec(model={"path": "m"}, train={"steps": 6, "eval_every": 0})
    assert specs.spec_hash(a) == specs.spec_hash(b) != specs.spec_hash(c)


def test_urls_are_redacted():
    assert redact_url("https://user:pw@rm.internal/v1/score?key=s3cret") == (
        "https://***@rm.internal/v1/score?***"
    )
    assert redact_url("http://rm.internal:8000") == "http://rm.internal:8000"
    shown = specs.redact(
        {"reward": {"url": "http://a:b@h/", "token_url": "http://c:d@h"}, "model": {"path": "m"}}
    )
    assert shown["reward"] == {"url": "http://***@h/", "token_url": "http://***@h"}


# ------------------------------------------------------------------ scheduling


class StandInRay:
    """Records submissions and answers with statuses the test sets (a unit-test double)."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, dict, dict]] = []
        self.tokens: dict[str, str] = {}
        self.status: dict[str, str] = {}
        self.stopped: list[str] = []

    def jobs(self) -> dict[str, RayJob]:
        return {sid: RayJob(sid, status, "msg", None) for sid, status in self.status.items()}

    def submit(self, sid: str, spec: dict, env: dict, token: str) -> None:
        self.submitted.append((sid, spec, env))
        self.tokens[sid] = token
        self.status[sid] = "RUNNING"

    def stop(self, sid: str) -> None:
        self.stopped.append(sid)
        self.status[sid] = "STOPPED"


def test_fifo_under_max_running_and_resume_from_checkpoint(tmp_path):
    settings = ApiSettings(token="t" * 32, state_dir=tmp_path, max_running=1, cancel_grace_s=0)
    store = JobStore(settings.database_url)
    ray = StandInRay()
    reconciler = Reconciler(settings, store, ray, "http://api:1")
    for name in ("a", "b", "c"):
        store.create(job_id=f"job-{name}", name=name, spec={"checkpoint": {"resume": "never"}},
                     spec_hash=name, idempotency_key=None, output_dir=name)  # fmt: skip
    reconciler.tick()
    assert [s for s, _, _ in ray.submitted] == ["grpo-job-a-run1"]
    assert [store.get(f"job-{n}").state for n in "abc"] == [
        JobState.RUNNING, JobState.QUEUED, JobState.QUEUED]  # fmt: skip
    env = ray.submitted[0][2]
    assert env["GRPO_JOB_ID"] == "job-a" and env["GRPO_JOB_API_URL"] == "http://api:1"
    token = ray.tokens["grpo-job-a-run1"]
    assert store.get("job-a").token_hash == token_digest(token)
    assert token not in env.values() and "GRPO_JOB_TOKEN" not in env

    store.apply("job-c", Event.CANCEL)  # cancelled while queued: never launched
    ray.status["grpo-job-a-run1"] = "FAILED"
    reconciler.tick()
    assert store.get("job-a").state is JobState.FAILED and "msg" in store.get("job-a").error
    assert [s for s, _, _ in ray.submitted] == ["grpo-job-a-run1", "grpo-job-b-run1"]

    store.apply("job-a", Event.RESUME)  # queued behind nothing but b, which is running
    store.apply("job-b", Event.CANCEL)
    reconciler.tick()  # grace 0: b's Ray job is stopped
    assert ray.stopped == ["grpo-job-b-run1"]
    reconciler.tick()  # b ends CANCELLED, a's second run starts, resuming its checkpoint
    assert store.get("job-b").state is JobState.CANCELLED
    sid, spec_of_run, _ = ray.submitted[-1]
    assert sid == "grpo-job-a-run2" and spec_of_run["checkpoint"]["resume"] == "auto"
    assert store.get("job-c").state is JobState.CANCELLED

    # A driver reports its end before it shuts down: its Ray job still holds the slot.
    store.create(job_id="job-d", name="d", spec={}, spec_hash="d", idempotency_key=None,
                 output_dir="d")  # fmt: skip
    store.apply("job-a", Event.SUCCEED, run=2)
    reconciler.tick()
    assert store.get("job-d").state is JobState.QUEUED
    ray.status["grpo-job-a-run2"] = "SUCCEEDED"
    reconciler.tick()
    assert store.get("job-d").state is JobState.RUNNING
    store.close()


def test_roots_and_database_default_to_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = ApiSettings(token="t" * 32)
    assert settings.allowed_roots == [tmp_path.resolve()] and settings.host == "127.0.0.1"
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / '.grpo-api' / 'jobs.db'}"
    assert Path(settings.base_dir).is_absolute()


# ------------------------------------------------------------- hardening (issue 17)


def test_reward_urls_are_admitted_by_origin_and_pinned_in_the_drivers_spec(roots):
    allowed = ["http://rm.internal:8000"]
    prepared = specs.prepare(
        spec(reward={"url": "http://rm.internal:8000/v1/score"}),
        roots=roots,
        job_id="job-1",
        allowed_reward_urls=allowed,
    )
    assert prepared["reward"]["token_url"] == "http://rm.internal:8000"
    # A submitted token_url is replaced by the entry that admitted the URL.
    pinned = spec(
        reward={"url": "http://rm.internal:8000/x", "token_url": "http://rm.internal:8000/y"}
    )
    prepared = specs.prepare(pinned, roots=roots, job_id="job-2", allowed_reward_urls=allowed)
    assert prepared["reward"]["token_url"] == "http://rm.internal:8000"
    for url in ("http://rm.internal.evil.example:8000", "http://169.254.169.254/latest",
                "https://rm.internal:8000", "http://rm.internal:8001"):  # fmt: skip
        with pytest.raises(specs.SpecRejected) as rejected:
            specs.prepare(
                spec(reward={"url": url}), roots=roots, job_id="j", allowed_reward_urls=allowed
            )
        assert [loc for loc, _ in rejected.value.problems] == [("body", "reward", "url")]
    assert specs.prepare(spec(), roots=roots, job_id="j")["reward"]["token_url"] is None


def test_no_reward_url_is_allowed_by_default_and_credentials_stay_hidden(roots):
    with pytest.raises(specs.SpecRejected) as rejected:
        specs.prepare(
            spec(reward={"url": "http://u:s3cret@rm.internal/?key=k2"}), roots=roots, job_id="j"
        )
    (problem,) = rejected.value.problems
    assert "none" in problem[1] and "s3cret" not in problem[1] and "k2" not in problem[1]


def test_output_dir_may_not_be_an_allowed_root(roots):
    for value in (str(roots[0]), ".", "models/.."):
        with pytest.raises(specs.SpecRejected, match="output.dir|'..'"):
            specs.prepare(spec(output={"dir": value}), roots=roots, job_id="j")


def dry_service(tmp_path, roots, **settings):
    from services.api.jobs import JobService

    api = ApiSettings(token="t" * 32, state_dir=tmp_path / "state", allowed_roots=roots,
                      dry=True, **settings)  # fmt: skip
    return JobService(api, JobStore(api.database_url), None)


def test_output_dirs_may_not_nest_with_other_jobs(tmp_path, roots):
    from services.api.jobs import OutputDirInUse

    service = dry_service(tmp_path, roots)
    service.submit(spec(output={"dir": "runs/a"}), None)
    service.store.apply(service.store.list_jobs()[0].id, Event.CANCEL)  # finished: still counts
    for nested in ("runs", "runs/a/checkpoints"):
        with pytest.raises(OutputDirInUse, match="inside one another"):
            service.submit(spec(output={"dir": nested}), None)
    job, created = service.submit(spec(output={"dir": "runs/ab"}), None)  # not a prefix match
    assert created and job.output_dir.endswith("runs/ab")
    job, created = service.submit(spec(output={"dir": "runs/a"}), None)  # the same dir: a rerun
    assert created


def test_driver_401s_say_the_same_for_known_and_unknown_jobs(tmp_path, roots):
    from services.api.jobs import Unauthorized

    service = dry_service(tmp_path, roots)
    job, _ = service.submit(spec(), None)
    messages = set()
    for job_id in (job.id, "job-0000000000000000"):
        with pytest.raises(Unauthorized) as refused:
            service.authenticate_driver(job_id, "not-the-token")
        messages.add(str(refused.value))
    assert len(messages) == 1 and job.id not in messages.pop()


class AcceptsThenErrs(StandInRay):
    """Ray takes the first job, but the answer is lost (a timeout, a dropped connection);
    the first ``stop_errors`` stops fail too."""

    def __init__(self, stop_errors: int = 0) -> None:
        super().__init__()
        self.stop_errors = stop_errors

    def submit(self, sid: str, spec: dict, env: dict, token: str) -> None:
        super().submit(sid, spec, env, token)
        if len(self.submitted) == 1:
            raise RayUnavailable("Ray at http://ray:8265: read timed out")

    def stop(self, sid: str) -> None:
        if self.stop_errors:
            self.stop_errors -= 1
            raise RayUnavailable("Ray at http://ray:8265: connection refused")
        super().stop(sid)


def scheduler(tmp_path, ray, **overrides):
    values = {"token": "t" * 32, "state_dir": tmp_path, "max_running": 2, **overrides}
    settings = ApiSettings(**values)
    store = JobStore(settings.database_url)
    return Reconciler(settings, store, ray, "http://api:1"), store


def queue(store, name: str) -> None:
    store.create(job_id=f"job-{name}", name=name, spec={"checkpoint": {"resume": "never"}},
                 spec_hash=name, idempotency_key=None, output_dir=name)  # fmt: skip


def test_a_run_ray_took_but_the_store_could_not_record_is_stopped(tmp_path):
    ray = AcceptsThenErrs()
    reconciler, store = scheduler(tmp_path, ray)
    queue(store, "a")
    reconciler.tick()
    assert store.get("job-a").state is JobState.FAILED
    assert "read timed out" in store.get("job-a").error
    assert ray.stopped == ["grpo-job-a-run1"]


def test_an_orphan_that_could_not_be_stopped_at_once_is_stopped_later(tmp_path):
    ray = AcceptsThenErrs(stop_errors=1)
    reconciler, store = scheduler(tmp_path, ray)
    queue(store, "a")
    reconciler.tick()  # submit errs, and so does the stop
    assert ray.stopped == [] and ray.status["grpo-job-a-run1"] == "RUNNING"
    store.apply("job-a", Event.RESUME)
    reconciler.tick()  # the orphan of run 1 is stopped; run 2 waits for it to end
    assert ray.stopped == ["grpo-job-a-run1"]
    assert store.get("job-a").state is JobState.QUEUED
    reconciler.tick()
    assert [sid for sid, _, _ in ray.submitted][-1] == "grpo-job-a-run2"
    assert store.get("job-a").state is JobState.RUNNING


def test_a_resumed_job_never_runs_beside_its_earlier_run(tmp_path):
    ray = StandInRay()
    reconciler, store = scheduler(tmp_path, ray)
    queue(store, "a")
    reconciler.tick()
    store.apply("job-a", Event.FAIL, run=1, detail="driver lost")  # its Ray job still runs
    store.apply("job-a", Event.RESUME)
    reconciler.tick()
    assert ray.stopped == ["grpo-job-a-run1"]
    assert [sid for sid, _, _ in ray.submitted] == ["grpo-job-a-run1"]  # not yet run 2
    reconciler.tick()
    assert [sid for sid, _, _ in ray.submitted] == ["grpo-job-a-run1", "grpo-job-a-run2"]


def test_the_driver_gets_the_allowlist_entry_in_its_spec_file(tmp_path, roots):
    service = dry_service(tmp_path, roots, allowed_reward_urls=["http://rm.internal:8000"])
    service.submit(spec(reward={"url": "http://rm.internal:8000/v1/score"}), None)
    ray = StandInRay()
    reconciler = Reconciler(service.settings, service.store, ray, "http://api:1")
    reconciler.tick()
    ((_, spec_file, _),) = ray.submitted
    assert spec_file["reward"]["url"] == "http://rm.internal:8000/v1/score"
    assert spec_file["reward"]["token_url"] == "http://rm.internal:8000"
    assert validate_spec(spec_file).reward.token_url == "http://rm.internal:8000"


class RecordingJobClient:
    """Stands in for Ray's ``JobSubmissionClient``: records what ``submit_job`` is given
    and, as Ray does while it uploads the working dir, reads the token file's mode and
    text at that moment."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[dict] = []
        self.token_file: tuple[int, str] | None = None

    def submit_job(self, **kwargs) -> str:
        self.calls.append(kwargs)
        path = Path(kwargs["runtime_env"]["working_dir"], TOKEN_FILE)
        self.token_file = (path.stat().st_mode & 0o777, path.read_text())
        if self.fail:
            raise RuntimeError("Ray refused the job")
        return kwargs["submission_id"]


def launcher_with(tmp_path: Path, client: RecordingJobClient) -> RayLauncher:
    launcher = RayLauncher("http://ray:8265", None, tmp_path / "runs")
    launcher._client = client
    return launcher


@pytest.mark.parametrize("fail", [False, True])
def test_the_run_token_is_in_nothing_ray_shows_and_leaves_no_file_here(tmp_path, fail):
    client = RecordingJobClient(fail=fail)
    token = "run-token-" + "z" * 32
    with contextlib.suppress(RuntimeError):
        launcher_with(tmp_path, client).submit("grpo-job-a-run1", {"x": 1}, {"A": "b"}, token)
    (call,) = client.calls
    assert token not in repr(call)  # entrypoint, runtime_env, metadata: what Ray lists
    assert call["entrypoint"] == ENTRYPOINT and f"--token-file {TOKEN_FILE}" in ENTRYPOINT
    assert client.token_file == (0o600, token)  # Ray packs it with its mode
    workdir = Path(call["runtime_env"]["working_dir"])
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.json"]


def test_the_driver_reads_its_token_file_and_deletes_it(tmp_path):
    from services.driver import take_token

    path = tmp_path / TOKEN_FILE
    path.write_text("run-token\n")
    assert take_token(str(path)) == "run-token"
    assert not path.exists()


class SlowView(StandInRay):
    """One Ray cluster seen by two replicas: ``during_read`` runs after this replica
    read Ray's jobs and before it acts on them (another replica's pass, interleaved)."""

    def __init__(self, shared: StandInRay) -> None:
        self.shared = shared
        self.during_read = lambda: None
        self.reads = 0

    def jobs(self) -> dict[str, RayJob]:
        self.reads += 1
        seen = self.shared.jobs()
        self.during_read()
        return seen

    def submit(self, sid: str, spec: dict, env: dict, token: str) -> None:
        self.shared.submit(sid, spec, env, token)

    def stop(self, sid: str) -> None:
        self.shared.stop(sid)


def test_two_replicas_on_one_database_never_schedule_at_once(tmp_path):
    cluster = StandInRay()
    replicas = [scheduler(tmp_path, SlowView(cluster), max_running=1) for _ in range(2)]
    (a, store_a), (b, store_b) = replicas
    queue(store_a, "x")
    # B's pass would read Ray, then A would launch x, then B would act on what it read:
    # without a lease B finds x RUNNING in the store but not in its view of Ray, and
    # fails it as vanished.
    b.launcher.during_read = a.tick
    a.tick()
    assert store_a.get("job-x").state is JobState.RUNNING
    queue(store_b, "y")
    b.tick()
    assert b.launcher.reads == 0 and not b.leading
    assert store_b.get("job-x").state is JobState.RUNNING
    assert [sid for sid, _, _ in cluster.submitted] == ["grpo-job-x-run1"]
    a.stop()  # gives the lease up: B takes over at once
    b.launcher.during_read = lambda: None
    cluster.status["grpo-job-x-run1"] = "SUCCEEDED"
    b.tick()
    assert b.leading and store_b.get("job-y").state is JobState.RUNNING
    assert [sid for sid, _, _ in cluster.submitted] == ["grpo-job-x-run1", "grpo-job-y-run1"]


def test_a_lapsed_lease_passes_to_another_replica(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'lease.db'}")
    other = JobStore(f"sqlite:///{tmp_path / 'lease.db'}")
    assert store.take_lease("scheduler", "a", 0.2)
    assert store.take_lease("scheduler", "a", 0.2)  # renewed
    assert not other.take_lease("scheduler", "b", 0.2)
    time.sleep(0.3)  # a died without giving it up
    assert other.take_lease("scheduler", "b", 0.2)
    assert not store.take_lease("scheduler", "a", 0.2)
    other.release_lease("scheduler", "b")
    assert store.take_lease("scheduler", "a", 0.2)
    store.close()
    other.close()


def test_the_scheduler_lease_must_outlast_a_pass():
    with pytest.raises(ValueError, match="scheduler_lease_s"):
        ApiSettings(token="t" * 32, poll_interval_s=10, scheduler_lease_s=15)
