"""`rebm`: the command line. Every DVC stage's `cmd` is one of these subcommands.

Commands are plain functions over `stages.<name>.run`; heavy imports happen inside them so
`rebm --help` stays fast and importing this module has no side effects.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.errors import RebmError

app = typer.Typer(
    name="rebm",
    help="Residual energy-based models for text generation: the DVC pipeline's commands.",
    no_args_is_help=True,
    add_completion=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file to read")]
DatasetArg = Annotated[str, typer.Argument(help="dataset key under `datasets:` in params.yaml")]


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a RebmError as one message and exit 2; anything else keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RebmError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=2) from None

    return wrapper


def _print_summary(summary: dict) -> None:
    json.dump(summary, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


@app.command()
@_user_errors
def ingest(dataset: DatasetArg, params: ParamsOption = Path("params.yaml")) -> None:
    """Read a dataset's documents and split them into data/<dataset>/docs/{train,valid,test}.parquet."""
    from stages import ingest as stage

    _print_summary(stage.run(dataset, params))


@app.command()
@_user_errors
def tokenize(dataset: DatasetArg, params: ParamsOption = Path("params.yaml")) -> None:
    """Train (or load) the tokenizer and cut every split into windows of seq_len tokens."""
    from stages import tokenize as stage

    _print_summary(stage.run(dataset, params))


if __name__ == "__main__":
    app()
