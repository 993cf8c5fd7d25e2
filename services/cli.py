"""The ``grpo`` command line.

``grpo train CONFIG [--set k=v] [--dry-run] [--verbose]`` runs a job locally (or on
the cluster at ``cluster.ray_address``) with a live progress display (one line per
step when stdout is not a terminal, :mod:`services.progress`); Ray's and vLLM's
output goes to ``<output.dir>/logs/train.log`` unless ``--verbose``; ``grpo eval`` runs the
evaluation alone (of a spec's model, a model directory or a LoRA adapter directory);
``grpo reward serve`` runs the reward service;
``grpo arithmetic prepare`` writes the arithmetic task's data and base model.
Errors in the spec are printed as one line per field and exit with status 2.

The job API: ``grpo serve`` runs it (settings from ``GRPO_API_*``); ``grpo submit
CONFIG [--set k=v]``, ``grpo jobs``, ``grpo status ID``, ``grpo logs ID [--follow]``,
``grpo cancel ID`` and ``grpo resume ID`` talk to it (``--url`` or ``GRPO_API_URL``,
token from ``GRPO_API_TOKEN``); an error the API answers exits with status 1.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from services.spec import JobSpec, SpecError, load_spec

if TYPE_CHECKING:
    from services.client import JobClient
    from services.train.run import RunResult

T = TypeVar("T")

app = typer.Typer(
    help="GRPO training on Ray: train, evaluate, serve rewards.", no_args_is_help=True
)
reward_app = typer.Typer(help="The reward service.", no_args_is_help=True)
arithmetic_app = typer.Typer(help="The arithmetic example task.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")
app.add_typer(arithmetic_app, name="arithmetic")
console = Console(stderr=True)

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="GRPO_API_URL", help="The job API (default http://127.0.0.1:8080)."
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one field, e.g. --set train.lr=3e-5 (repeatable)."),
]


def _load(config: Path, overrides: list[str] | None) -> JobSpec:
    try:
        return load_spec(config, overrides or [])
    except SpecError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).")],
    set_: SetOption = None,
    dry_run: Annotated[
        bool, typer.Option(help="Validate the spec and its files, then stop.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a GRPO training job."""
    from services.train.run import PreflightError, preflight

    _logging(verbose)
    spec = _load(config, set_)
    try:
        preflight(spec)
    except (PreflightError, ValueError) as error:
        if not dry_run:
            console.print(f"[red]{error}[/red]")
            raise typer.Exit(2) from None
        console.print(f"[yellow]warning: {error} (it must exist where the job runs)[/yellow]")
    if dry_run:
        console.print(f"[green]{config}: valid[/green] ({spec.train.steps} steps)")
        return
    result = _run(spec, verbose)
    summary = _summary(result.metrics)
    console.print(
        f"[bold]{result.status}[/bold] after {result.steps_done} steps → {result.run_dir}"
    )
    if summary:
        console.print(summary)


@app.command("eval")
def evaluate(
    target: Annotated[
        Path,
        typer.Argument(
            help="A job spec, a model directory, or a LoRA adapter directory in PEFT's "
            "format (such as final/adapter; merged into its base model first)."
        ),
    ],
    config: Annotated[
        Path | None, typer.Option(help="Job spec supplying data and reward when TARGET is a model.")
    ] = None,
    set_: SetOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Greedy accuracy of a model on the spec's eval split, scored by the eval verifier."""
    from services.train.run import TrainingRun

    _logging(verbose)
    overrides = list(set_ or [])
    if not target.is_dir():
        spec = _load(target, overrides)
        result = TrainingRun(spec).evaluate_only()
        typer.echo(json.dumps({"model": spec.model.path, **result}))
        return
    if config is None:
        console.print("[red]TARGET is a model directory: give --config SPEC for data[/red]")
        raise typer.Exit(2)
    with _as_model_dir(target) as model_dir:
        # TARGET is the whole model: the spec's model.lora must not add another adapter.
        spec = _load(config, [*overrides, f"model.path={model_dir}", "model.lora=null"])
        result = TrainingRun(spec).evaluate_only()
    typer.echo(json.dumps({"model": str(target), **result}))


@contextmanager
def _as_model_dir(target: Path) -> Iterator[Path]:
    """``target``, or if it is a PEFT adapter directory its base model with the adapter
    merged, in a temporary directory on this machine."""
    if not (target / "adapter_config.json").is_file():
        yield target
        return
    from learner.lora import merge_adapter_dir

    with tempfile.TemporaryDirectory(prefix="grpo-eval-") as merged:
        try:
            merge_adapter_dir(target, merged)
        except ValueError as error:
            console.print(f"[red]{error}[/red]")
            raise typer.Exit(2) from None
        yield Path(merged)


@reward_app.command("serve")
def reward_serve(
    host: Annotated[
        str | None, typer.Option(help="Default: GRPO_REWARD_HOST or 127.0.0.1.")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Default: GRPO_REWARD_PORT or 8000.")] = None,
) -> None:
    """Run the reward service (settings from GRPO_REWARD_* variables)."""
    from reward.server import serve

    serve(host, port)


@arithmetic_app.command("prepare")
def arithmetic_prepare(
    out: Annotated[Path, typer.Option(help="Where to write data and the base model.")] = Path(
        "examples/arithmetic/assets"
    ),
) -> None:
    """Write train/eval jsonl and the warmed-up base model (cached; about 90 s the first time)."""
    from services.embedded.arithmetic import prepare_assets, weights_sha256

    _logging(True)
    paths = prepare_assets(out)
    for name, path in paths.items():
        console.print(f"{name}: {path}")
    # soft_wrap: the digest stays on one line (copyable) on a narrow console or a pipe
    console.print(f"base model SHA-256: {weights_sha256(paths['model'])}", soft_wrap=True)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Default: GRPO_API_HOST or 127.0.0.1.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: GRPO_API_PORT or 8080.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the job API (settings from GRPO_API_* variables; GRPO_API_TOKEN is required)."""
    from pydantic import ValidationError

    from services.api.server import serve as serve_api
    from services.api.settings import ApiSettings

    _logging(True)
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    try:
        settings = ApiSettings(**overrides)
    except ValidationError as error:
        problems = [
            f"GRPO_API_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in error.errors()
        ]
        console.print("[red]invalid job API settings:\n  " + "\n  ".join(problems) + "[/red]")
        raise typer.Exit(2) from None
    serve_api(settings)


@contextmanager
def _api(url: str | None) -> Iterator[JobClient]:
    from services.client import JobClient

    with JobClient(url) as client:
        yield client


def _call(action: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one client call; API errors and connection problems exit with status 1."""
    import httpx

    from services.client import JobApiError

    try:
        return action(*args, **kwargs)
    except JobApiError as error:
        console.print(f"[red]{error}[/red]")
        for problem in error.errors:
            location = ".".join(str(part) for part in problem.get("loc", [])[1:])
            console.print(f"[red]  {location}: {problem.get('msg')}[/red]")
        raise typer.Exit(1) from None
    except httpx.HTTPError as error:
        console.print(f"[red]cannot reach the job API: {error} (--url, GRPO_API_URL)[/red]")
        raise typer.Exit(1) from None


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).")],
    set_: SetOption = None,
    url: UrlOption = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Retrying with the same key returns the same job, never a second."),
    ] = None,
) -> None:
    """Submit a job to the job API; prints its id (relative paths are the API's)."""
    spec = _load(config, set_)
    with _api(url) as client:
        job = _call(client.submit, spec, idempotency_key=idempotency_key)
    console.print(f"{job.id} {job.state.value}")
    typer.echo(job.id)


@app.command()
def jobs(
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    url: UrlOption = None,
) -> None:
    """List jobs, newest first."""
    from rich.table import Table

    with _api(url) as client:
        page = _call(client.list_jobs, state=state.upper() if state else None, limit=limit)
    table = Table("id", "name", "state", "run", "step", "created", "error")
    for job in page.items:
        step = f"{job.step if job.step is not None else '-'}/{job.total_steps}"
        created = job.created_at.strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(job.id, job.name, job.state.value, str(job.run), step, created,
                      (job.error or "")[:60])  # fmt: skip
    Console().print(table)


@app.command()
def status(job_id: str, url: UrlOption = None) -> None:
    """Show a job as JSON: state, step, latest metrics, error, spec."""
    with _api(url) as client:
        job = _call(client.get, job_id)
    typer.echo(job.model_dump_json(indent=2))


@app.command()
def logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the run ends.")] = (
        False
    ),
    offset: Annotated[int, typer.Option(min=0, help="Start at this byte.")] = 0,
    run: Annotated[int | None, typer.Option(min=1, help="Default: the latest run.")] = None,
    url: UrlOption = None,
) -> None:
    """Print a job's driver log (Ray's job log)."""
    out = sys.stdout.buffer
    with _api(url) as client:
        if follow:
            _call(_copy, client.follow_logs(job_id, offset=offset, run=run), out)
        else:
            out.write(_call(client.logs, job_id, offset=offset, run=run).data)
    out.flush()


def _copy(chunks: Iterator[bytes], out: Any) -> None:
    for data in chunks:
        out.write(data)
        out.flush()


@app.command()
def cancel(job_id: str, url: UrlOption = None) -> None:
    """Cancel a job: it checkpoints and stops (a queued job is dropped)."""
    with _api(url) as client:
        job = _call(client.cancel, job_id)
    typer.echo(f"{job.id} {job.state.value}")


@app.command()
def resume(job_id: str, url: UrlOption = None) -> None:
    """Run a FAILED or CANCELLED job again from its last checkpoint (a new run)."""
    with _api(url) as client:
        job = _call(client.resume, job_id)
    typer.echo(f"{job.id} {job.state.value} (run {job.run})")


def _run(spec: JobSpec, verbose: bool) -> RunResult:
    """The training run with its console: a progress display, Ray's and vLLM's output in
    the run's log file (on the console with ``verbose``, where the display prints lines)."""
    from services.progress import StepDisplay, console_warnings, quiet_output
    from services.train.run import TrainingRun

    log_file = Path(spec.output.dir) / "logs" / "train.log"
    if not verbose:
        logging.getLogger().setLevel(logging.INFO)  # the log file takes INFO
    output = nullcontext(sys.stdout) if verbose else quiet_output(log_file)
    with (
        output as out,
        StepDisplay(spec.train.steps, out, live=False if verbose else None) as display,
    ):
        where = "here" if verbose else f"in {log_file} (--verbose shows them here)"
        display.say(
            f"{spec.name}: {spec.train.steps} steps → {spec.output.dir}; Ray and vLLM logs {where}"
        )
        with nullcontext() if verbose else console_warnings(display):
            return TrainingRun(spec, on_step=display).run()


def _summary(records: list[dict[str, Any]]) -> str:
    accuracies = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    if len(accuracies) < 2:
        return ""
    (first_step, first), (last_step, last) = accuracies[0], accuracies[-1]
    return (
        f"eval/accuracy {first:.3f} (step {first_step}) → {last:.3f} (step {last_step}), "
        f"{100 * (last - first):+.1f} points"
    )


if __name__ == "__main__":
    app()
