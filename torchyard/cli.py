"""The ``torchyard`` command: train locally, run the service, and talk to it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click


def _read_spec_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{path} is not valid JSON: {exc}") from None


def _local_data_path(spec, spec_file: Path) -> Path | None:
    """A relative data.path is relative to the spec file, as paths in compose files are."""
    if spec.data.source != "file":
        return None
    return spec_file.parent / spec.data.path  # an absolute path stays as it is


def _print_problems(error) -> None:
    click.echo("invalid spec:", err=True)
    for problem in error.problems:
        click.echo(f"  {problem}", err=True)


@click.group()
@click.version_option(package_name="torchyard")
def main() -> None:
    """torchyard: training-as-a-service for PyTorch."""


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for weights.safetensors, model.json, metrics.jsonl and checkpoints/.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default=None,
              help="Override resources.device of the spec.")
def train(spec_file: Path, out_dir: Path, resume: bool, device: str | None) -> None:
    """Train SPEC_FILE on this machine."""
    from models.settings import get_settings
    from models.spec import SpecError, parse_spec
    from torchyard.progress import ProgressPrinter, network_table, summary_line
    from worker.engine import prepare_run
    from worker.engine.run import finish

    limits = get_settings().limits
    try:
        spec = parse_spec(_read_spec_file(spec_file), limits)
        prepared = prepare_run(spec, out_dir, resume=resume, callbacks=[ProgressPrinter()],
                               data_path=_local_data_path(spec, spec_file), device=device, limits=limits)
    except SpecError as error:
        _print_problems(error)
        sys.exit(2)
    data = prepared.data
    click.echo(f"{spec.name}: task {spec.task}, {data.n_train} training / {data.n_val} validation samples, "
               f"device {prepared.trainer.device}")
    click.echo(network_table(prepared.plan, data.report.input_shape))
    if prepared.resumed_from is not None:
        click.echo(f"resuming after epoch {prepared.resumed_from}")
    started = time.monotonic()
    result = finish(prepared, spec, out_dir)
    click.echo(summary_line(result, time.monotonic() - started))
    if result.status != "succeeded":
        sys.exit(1)
    click.echo(f"outputs in {out_dir}")


if __name__ == "__main__":
    main()
