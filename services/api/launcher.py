"""The Ray edge of the job API: starting, watching, stopping and reading runs.

Each run of a job is one Ray job, submitted through Ray's job submission API
(``JobSubmissionClient``, the dashboard's address) with a constant entrypoint,
``ENTRYPOINT``. The validated spec travels as ``spec.json`` in the run's
``working_dir``, which Ray uploads to the cluster and makes the entrypoint's working
directory — so no user text is ever part of a command, and the API and the cluster
need not share a filesystem. The driver finds the API through environment variables
of the run's ``runtime_env`` (``services.train.reporting``).

The run's token travels as ``TOKEN_FILE`` beside the spec, never in the entrypoint,
the ``runtime_env`` or the metadata: those are what ``ray job list``, the dashboard
and ``get_job_info`` show to anyone who can list jobs. The file is written with mode
0600 (Ray keeps the mode when it unpacks the working dir on the node), deleted here
as soon as Ray has the package, and deleted on the node by the driver once read
(``services.driver``). A token derived from a secret shared by the API and the
cluster would need one more secret deployed, and every Ray job could read that secret
from the node's environment and forge any run's token; the file needs nothing new.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
TOKEN_FILE = "job_token"
ENTRYPOINT = f"python -m services.driver --spec {SPEC_FILE} --token-file {TOKEN_FILE}"
RAY_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class RayUnavailable(ConnectionError):
    """Ray's job submission API cannot be reached; the message says where it was tried."""


class RayRejected(RuntimeError):
    """Ray's job submission API refused a request."""


@dataclass(frozen=True)
class RayJob:
    """What Ray knows of one submitted run."""

    submission_id: str
    status: str
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    message: str | None
    ray_job_id: str | None

    @property
    def terminal(self) -> bool:
        return self.status in RAY_TERMINAL


SUBMISSION_PREFIX = "grpo-"


def submission_id(job_id: str, run: int) -> str:
    """The Ray submission id of a run: generated from the job id, so it is idempotent."""
    return f"{SUBMISSION_PREFIX}{job_id}-run{run}"


class RayLauncher:
    """Submits runs to Ray's job system and asks it about them."""

    def __init__(self, address: str, token: SecretStr | None, runs_dir: Path) -> None:
        self.address = address
        self.headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else None
        self.runs_dir = runs_dir
        self._client: Any = None
        self._lock = threading.Lock()

    def _sdk(self) -> Any:
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.address, headers=self.headers)
                except (ConnectionError, OSError, RuntimeError) as error:
                    raise RayUnavailable(
                        f"cannot reach Ray's job submission API at {self.address} "
                        f"(GRPO_API_RAY_ADDRESS): {error}"
                    ) from None
            return self._client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self._sdk()
        try:
            return getattr(client, method)(*args, **kwargs)
        except OSError as error:  # requests' connection errors are OSErrors
            with self._lock:
                self._client = None
            raise RayUnavailable(f"Ray at {self.address}: {error}") from None
        except RuntimeError as error:
            raise RayRejected(str(error)) from None

    def submit(self, sid: str, spec: dict[str, Any], env: dict[str, str], token: str) -> None:
        """Start a run: write its spec and token into a fresh working dir and hand it to
        Ray, which uploads the dir before ``submit_job`` returns; the token file is gone
        from this host afterwards, whatever happened."""
        workdir = self.runs_dir / sid
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / SPEC_FILE).write_text(json.dumps(spec, indent=1))
        token_file = workdir / TOKEN_FILE
        _write_private(token_file, token)
        try:
            self._call(
                "submit_job",
                entrypoint=ENTRYPOINT,
                submission_id=sid,
                runtime_env={"working_dir": str(workdir), "env_vars": env},
                metadata={"grpo_submission": sid},
            )
        finally:
            token_file.unlink(missing_ok=True)
        log.info("submitted Ray job %s", sid)

    def jobs(self) -> dict[str, RayJob]:
        """Every job Ray knows, by submission id (one request)."""
        return {
            info.submission_id: _ray_job(info)
            for info in self._call("list_jobs")
            if info.submission_id
        }

    def job(self, sid: str) -> RayJob | None:
        """One run, or None when Ray does not know it."""
        try:
            return _ray_job(self._call("get_job_info", sid))
        except RayRejected as error:
            if "404" in str(error) or "does not exist" in str(error):
                return None
            raise

    def stop(self, sid: str) -> None:
        log.warning("stopping Ray job %s", sid)
        self._call("stop_job", sid)

    def logs(self, sid: str) -> bytes | None:
        """The run's log so far (UTF-8), or None when Ray does not know it."""
        try:
            return self._call("get_job_logs", sid).encode()
        except RayRejected as error:
            if "404" in str(error) or "does not exist" in str(error):
                return None
            raise


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file that only this user can read (mode 0600 from the start)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _ray_job(info: Any) -> RayJob:
    return RayJob(
        submission_id=info.submission_id,
        status=str(getattr(info.status, "value", info.status)),
        message=info.message,
        ray_job_id=info.job_id,
    )
