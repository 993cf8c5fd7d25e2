"""The ``grpo`` command line.

``grpo train CONFIG [--set k=v] [--dry-run]`` runs a job locally (or on the
cluster at ``cluster.ray_address``) with a progress bar; ``grpo eval`` runs the
evaluation alone; ``grpo reward serve`` runs the reward service;
``grpo arithmetic prepare`` writes the arithmetic task's data and base model.
Errors in the spec are printed as one line per field and exit with status 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.spec import JobSpec, SpecError, load_spec

app = typer.Typer(
    help="GRPO training on Ray: train, evaluate, serve rewards.", no_args_is_help=True
)
reward_app = typer.Typer(help="The reward service.", no_args_is_help=True)
arithmetic_app = typer.Typer(help="The arithmetic example task.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")
app.add_typer(arithmetic_app, name="arithmetic")
console = Console(stderr=True)

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
    from services.driver import Driver, PreflightError, preflight

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
    with _progress() as progress:
        task = progress.add_task("training", total=spec.train.steps, status="starting engines…")
        result = Driver(spec, on_step=lambda step, m: _show(progress, task, step, m)).run()
    summary = _summary(result.metrics)
    console.print(
        f"[bold]{result.status}[/bold] after {result.steps_done} steps → {result.run_dir}"
    )
    if summary:
        console.print(summary)


@app.command("eval")
def evaluate(
    target: Annotated[Path, typer.Argument(help="A job spec, or a model directory.")],
    config: Annotated[
        Path | None, typer.Option(help="Job spec supplying data and reward when TARGET is a model.")
    ] = None,
    set_: SetOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Greedy accuracy of a model on the spec's eval split, scored by the eval verifier."""
    from services.driver import Driver

    _logging(verbose)
    overrides = list(set_ or [])
    if target.is_dir():
        if config is None:
            console.print("[red]TARGET is a model directory: give --config SPEC for data[/red]")
            raise typer.Exit(2)
        spec = _load(config, [*overrides, f"model.path={target}"])
    else:
        spec = _load(target, overrides)
    result = Driver(spec).evaluate_only()
    typer.echo(json.dumps({"model": spec.model.path, **result}))


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
    """Write train/eval jsonl and the warmed-up base model (cached; ~1 minute the first time)."""
    from services.arithmetic import prepare_assets

    _logging(True)
    paths = prepare_assets(out)
    for name, path in paths.items():
        console.print(f"{name}: {path}")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


def _show(progress: Progress, task: Any, step: int, metrics: dict[str, Any]) -> None:
    parts = [f"step {step}"]
    for key, label in (
        ("reward/mean", "reward"),
        ("eval/accuracy", "acc"),
        ("time/step_s", "s/step"),
    ):
        if metrics.get(key) is not None:
            parts.append(f"{label} {metrics[key]:.3f}")
    progress.update(task, completed=step, status="  ".join(parts))
    if "eval/accuracy" in metrics:
        progress.console.print(f"step {step}: eval/accuracy {metrics['eval/accuracy']:.3f}")


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
