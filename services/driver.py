"""``python -m services.driver --spec FILE``: the constant entrypoint of a training job.

The job API hands exactly this command to Ray's job system (no user text is ever
part of it); the run itself is :class:`services.train.run.TrainingRun`. It reports
to the job API when the environment names one (``services.train.reporting``).
"""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> int:
    """Run the spec in ``--spec`` to its end; exit 0 on success or cancellation."""
    from services.spec import load_spec
    from services.train.reporting import reporter_from_env
    from services.train.run import TrainingRun

    parser = argparse.ArgumentParser(description="Run one GRPO training job.")
    parser.add_argument("--spec", required=True, help="the validated job spec (JSON or YAML)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = TrainingRun(load_spec(args.spec), reporter=reporter_from_env()).run()
    logging.getLogger(__name__).info(
        "run %s after %d steps: %s", result.status, result.steps_done, result.run_dir
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
