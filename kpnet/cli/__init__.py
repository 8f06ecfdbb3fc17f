"""The `kpnet` command line: a thin Typer layer over the library (one module per subcommand)."""

from __future__ import annotations

from typing import Annotated

import typer

from kpnet import __version__

app = typer.Typer(
    name="kpnet",
    help="Keypoint-based object detection: CornerNet and CenterNet (keypoint triplets, objects as points).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kpnet {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """kpnet: prepare data for, train, evaluate, analyse and visualise keypoint detectors."""


SUBCOMMAND_MODULES: tuple[str, ...] = (
    "prepare_data", "train", "eval", "fd_analysis", "error_analysis", "collision_stats", "visualize", "info",
    "export", "predict",
)


def _register() -> None:
    # Explicit registration: one import per finished subcommand module, each with `register(app)`.
    import importlib

    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"kpnet.cli.{name}").register(app)


_register()


def main() -> None:
    app()
