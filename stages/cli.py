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


@app.command()
@_user_errors
def negatives(
    dataset: DatasetArg,
    params: ParamsOption = Path("params.yaml"),
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Ray cluster to attach to (default: $RAY_ADDRESS, else a local Ray)"),
    ] = None,
) -> None:
    """Sample n continuations per prefix from the base LM on Ray actors into data/<dataset>/negatives."""
    from stages import negatives as stage

    _print_summary(stage.run(dataset, params, ray_address=ray_address))


@app.command("train-lm")
@_user_errors
def train_lm(
    dataset: DatasetArg,
    variant: Annotated[str, typer.Argument(help="base, balm or ralm (ralm needs the trained base)")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Train a causal LM on the train windows: the base LM, BALM, or RALM; writes models/<dataset>/lm/<variant>."""
    from stages import train_lm as stage

    _print_summary(stage.run(dataset, variant, params))



@app.command("pretrain-mlm")
@_user_errors
def pretrain_mlm(dataset: DatasetArg, params: ParamsOption = Path("params.yaml")) -> None:
    """Pretrain the BIT energy's encoder (energy.bit) as a masked LM; writes models/<dataset>/mlm."""
    from stages import pretrain_mlm as stage

    _print_summary(stage.run(dataset, params))


@app.command("train-ebm")
@_user_errors
def train_ebm(
    dataset: DatasetArg,
    variant: Annotated[str, typer.Argument(help="unit, bit or bit_star")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Train an energy model by conditional NCE against the base LM's samples; writes models/<dataset>/energy/<variant>."""
    from stages import train_ebm as stage

    _print_summary(stage.run(dataset, variant, params))

bench_app = typer.Typer(help="Measure throughput on this machine.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
@_user_errors
def bench_train(
    params: ParamsOption = Path("params.yaml"),
    variant: Annotated[str, typer.Option(help="train_lm variant whose architecture and batch size to time")] = "base",
    steps: Annotated[int, typer.Option(help="timed training steps per precision")] = 5,
) -> None:
    """Training tokens/s and GFLOP/s of an LM against this machine's measured matmul peak (fp32, bf16)."""
    from pipeline import bench

    _print_summary(bench.train_benchmark(params, variant, steps))


@bench_app.command("sample")
@_user_errors
def bench_sample(
    dataset: Annotated[str, typer.Option(help="dataset whose base LM and valid windows to use if present")] = "news",
    n: Annotated[int, typer.Option(help="samples per prefix")] = 16,
    windows: Annotated[int, typer.Option(help="prefixes in one batch")] = 8,
    ray_windows: Annotated[int, typer.Option(help="prefixes for the 1-vs-2 Ray workers run")] = 64,
    model: Annotated[Path | None, typer.Option(help="HF causal LM dir (default: models/<dataset>/lm/base, else random init)")] = None,
) -> None:
    """New tokens/s of the shared-prefix sampler vs transformers generate, and of 1 vs 2 Ray workers."""
    from pipeline import bench_sample
    from pipeline.paths import DatasetPaths

    paths = DatasetPaths(dataset)
    report = bench_sample.run_bench(
        model_dir=model or paths.lm("base"), windows_file=paths.windows_split("valid"),
        windows=windows, n=n, ray_windows=ray_windows,
    )
    typer.echo(bench_sample.format_report(report))



@bench_app.command("ebm")
@_user_errors
def bench_ebm(
    dataset: Annotated[str, typer.Option(help="dataset whose base LM, MLM and valid windows to use")] = "news",
    params: ParamsOption = Path("params.yaml"),
    batch: Annotated[int, typer.Option(help="real windows per batch (each paired with an LM sample)")] = 16,
) -> None:
    """Energy training and scoring sequences/s (UNIT, BIT, BIT*) against the base LM's forward pass."""
    from pipeline import bench_ebm
    from pipeline.config import TrainEBMConfig, load_section

    bit_star = load_section(TrainEBMConfig, "train_ebm", params).bit_star.init
    typer.echo(bench_ebm.format_report(bench_ebm.ebm_benchmark(dataset, bit_star, batch)))

if __name__ == "__main__":
    app()
