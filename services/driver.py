"""``python -m services.driver --spec FILE``: the constant entrypoint of a training job.

The job API hands exactly this command to Ray's job system (no user text is ever
part of it), with ``--token-file``: the run's token for the job API's driver routes,
which this process reads and deletes before anything else, so that the token is in
no file, command line or environment that other jobs or viewers of Ray's job list can
see (``services.api.launcher``). The run itself is
:class:`services.train.run.TrainingRun`. It reports to the job API when the
environment names one (``services.train.reporting``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def take_token(path: str) -> str:
    """The token in ``path``; the file is deleted once read."""
    file = Path(path)
    token = file.read_text().strip()
    file.unlink()
    return token


def main(argv: list[str] | None = None) -> int:
    """Run the spec in ``--spec`` to its end; exit 0 on success or cancellation."""
    from services.spec import load_spec
    from services.train.reporting import reporter_from_env
    from services.train.run import TrainingRun

    parser = argparse.ArgumentParser(description="Run one GRPO training job.")
    parser.add_argument("--spec", required=True, help="the validated job spec (JSON or YAML)")
    parser.add_argument(
        "--token-file", help="a file holding the run's job API token; deleted once read"
    )
    args = parser.parse_args(argv)
    token = take_token(args.token_file) if args.token_file else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = TrainingRun(load_spec(args.spec), reporter=reporter_from_env(token)).run()
    logging.getLogger(__name__).info(
        "run %s after %d steps: %s", result.status, result.steps_done, result.run_dir
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
