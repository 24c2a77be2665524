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

from pipeline.core.errors import RebmError
from pipeline.core.variants import ENERGY_VARIANTS, LM_VARIANTS

app = typer.Typer(
    name="rebm",
    help="Residual energy-based models for text generation: the DVC pipeline's commands.",
    no_args_is_help=True,
    add_completion=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file to read")]
DatasetArg = Annotated[str, typer.Argument(help="dataset key under `datasets:` in params.yaml")]
RayAddressOption = Annotated[
    str | None,
    typer.Option("--ray-address", help="Ray cluster to attach to (default: $RAY_ADDRESS, else a local Ray)"),
]


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
    ray_address: RayAddressOption = None,
) -> None:
    """Sample n continuations per prefix from the base LM on Ray actors into data/<dataset>/negatives."""
    from stages import negatives as stage

    _print_summary(stage.run(dataset, params, ray_address=ray_address))


@app.command("train-lm")
@_user_errors
def train_lm(
    dataset: DatasetArg,
    variant: Annotated[str, typer.Argument(help=f"{', '.join(LM_VARIANTS)} (ralm needs the trained base)")],
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
    variant: Annotated[str, typer.Argument(help=", ".join(ENERGY_VARIANTS))],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Train an energy model by conditional NCE against the base LM's samples; writes
    models/<dataset>/energy/<variant>."""
    from stages import train_ebm as stage

    _print_summary(stage.run(dataset, variant, params))


@app.command()
@_user_errors
def evaluate(
    dataset: DatasetArg,
    params: ParamsOption = Path("params.yaml"),
    ray_address: RayAddressOption = None,
) -> None:
    """Table 1 (LM perplexities, joint-model ranges), Figure 1 and Figure 2 (left) into results/<dataset>/evaluation."""
    from stages import evaluate as stage

    _print_summary(stage.run(dataset, params, ray_address=ray_address))


@app.command()
@_user_errors
def generate(
    dataset: DatasetArg,
    params: ParamsOption = Path("params.yaml"),
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="generate for this text instead of the test set")
    ] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="read the prompt from a file")] = None,
    samples: Annotated[
        int | None,
        typer.Option("--samples", help="Algorithm 1: top-k samples to resample from (default generate.n_gen); "
                     "stepwise: completions per candidate (default stepwise.samples)"),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed for the prompt's samples (default: params seed)")] = None,
    method: Annotated[
        str,
        typer.Option("--method", help="algorithm1: resample n top-k LM samples by exp(-E) (§3.3, Algorithm 1). "
                     "stepwise: top-k auto-regressive sampling (§3.3, Appendix A.1), each token drawn from Eq. 5 "
                     "over the base LM's top K (stepwise.candidates) with n completions each (stepwise.samples), "
                     "energy stepwise.energy; it costs (T - p) x K x n LM samples and energy evaluations: "
                     "40 x 12 x 32 = 15,360 at the defaults (1:55 measured on a 2-core AMX Xeon with BIT*; "
                     "expect about 3x on AVX2-only CPUs), against 32 for Algorithm 1. "
                     "Needs --prompt or --prompt-file."),
    ] = "algorithm1",
    candidates: Annotated[
        int | None,
        typer.Option("--candidates", help="stepwise: K, the base LM's top K next tokens (default stepwise.candidates)"),
    ] = None,
    ray_address: RayAddressOption = None,
) -> None:
    """Algorithm 1 on the test prefixes (the DVC stage), or on --prompt / --prompt-file text, side by side;
    --method stepwise decodes the prompt token by token from Eq. 5 instead."""
    from stages import generate as stage

    if method not in ("algorithm1", "stepwise"):
        raise RebmError(f"--method {method}: choose algorithm1 or stepwise")
    if prompt is not None and prompt_file is not None:
        raise RebmError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise RebmError(f"--prompt-file {prompt_file}: no such file")
        prompt = prompt_file.read_text(encoding="utf-8")
    if method == "stepwise":
        if prompt is None:
            raise RebmError("--method stepwise decodes a prompt: give --prompt or --prompt-file")
        from stages import stepwise

        result = stepwise.run_prompt(dataset, params, prompt, samples=samples, candidates=candidates, seed=seed)
        typer.echo(stepwise.stepwise_summary(result))
        return
    if prompt is not None:
        typer.echo(stage.side_by_side(stage.run_prompt(dataset, params, prompt, n_gen=samples, seed=seed)))
        return
    _print_summary(stage.run(dataset, params, ray_address=ray_address))


@app.command()
@_user_errors
def stepwise(
    dataset: DatasetArg,
    params: ParamsOption = Path("params.yaml"),
    ray_address: RayAddressOption = None,
) -> None:
    """Appendix A.1: Eq. 5 over the base LM's top K on repetition and control contexts of LM samples;
    Table 3 and the repetition claim into results/<dataset>/stepwise."""
    from stages import stepwise as stage

    _print_summary(stage.run(dataset, params, ray_address=ray_address))


@app.command()
@_user_errors
def report(params: ParamsOption = Path("params.yaml")) -> None:
    """Table 1, Figures 1-3, examples, Table 2 (if votes exist), stage times and provenance for every
    dataset: reports/report.md, a self-contained reports/report.html and reports/figures/*.png."""
    from stages import report as stage

    _print_summary(stage.run(params))


@app.command()
@_user_errors
def plan(
    params: Annotated[Path, typer.Argument(help="params file to check and plan")] = Path("params.yaml"),
    windows: Annotated[
        list[str] | None,
        typer.Option("--windows", help="DATASET=TRAIN,VALID,TEST windows per split (k/M/G allowed), repeatable; "
                     "default: data/<dataset>/tokenize_stats.json when it matches the params"),
    ] = None,
    model_config: Annotated[
        list[str] | None,
        typer.Option("--model-config", help="NAME=DIR: read the config of a pretrained model (e.g. roberta-base) "
                     "from DIR or DIR/config.json, repeatable"),
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="directory holding data/<dataset>/")] = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Validate every section of a params file (all errors, exit 2), then print each stage's
    sequences, tokens and FLOPs."""
    from pipeline.tools import plan as planner
    configs = {}
    for spec in model_config or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise RebmError(f"--model-config {spec!r}: expected NAME=DIR")
        configs[name] = Path(path)
    result = planner.build_plan(params, root, planner.parse_windows(windows or []), configs)
    typer.echo(planner.plan_json(result) if as_json else planner.format_plan(result), nl=False)


bench_app = typer.Typer(help="Measure throughput on this machine.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
@_user_errors
def bench_train(
    params: ParamsOption = Path("params.yaml"),
    variant: Annotated[str, typer.Option(help="train_lm variant whose architecture and batch size to time")] = "base",
    steps: Annotated[int, typer.Option(help="timed training steps per precision (or per worker count)")] = 5,
    workers: Annotated[int, typer.Option(
        help="above 1: tokens/s of the training loop on 1 worker (baseline) vs this many Ray Train workers")] = 1,
    precision: Annotated[str, typer.Option(
        help="auto: fp32 and bf16 where bf16 is native, fp32 alone where it is emulated; or fp32, bf16, fp32,bf16")
    ] = "auto",
) -> None:
    """Training tokens/s and GFLOP/s of an LM against this machine's matmul peak measured in the same
    precision (pipeline_precision: what `precision: auto` trains in here); with --workers N, the
    data-parallel loop on N Ray Train workers against 1 worker, same model and batch."""
    from pipeline.tools import bench
    if workers > 1:
        _print_summary(bench.data_parallel_benchmark(params, variant, workers, steps))
    else:
        _print_summary(bench.train_benchmark(params, variant, steps, precision=precision))


@bench_app.command("sample")
@_user_errors
def bench_sample(
    dataset: Annotated[str, typer.Option(help="dataset whose base LM and valid windows to use if present")] = "news",
    n: Annotated[int, typer.Option(help="samples per prefix")] = 16,
    windows: Annotated[int, typer.Option(help="prefixes in one batch")] = 8,
    ray_windows: Annotated[int, typer.Option(help="prefixes for the 1-vs-2 Ray workers run")] = 64,
    model: Annotated[
        Path | None,
        typer.Option(help="HF causal LM dir (default: gpt2: models/<dataset>/lm/base, else random init; "
                          "llama: random init)"),
    ] = None,
    arch: Annotated[
        str, typer.Option(help="random-init architecture without --model: gpt2 or llama (same size as the base LM)")
    ] = "gpt2",
    device: Annotated[str, typer.Option(help="auto (cuda if available), cpu, cuda or cuda:N")] = "auto",
) -> None:
    """New tokens/s of the shared-prefix sampler vs transformers generate, and of 1 vs 2 Ray workers (CPU)."""
    from pipeline.core.paths import DatasetPaths
    from pipeline.tools import bench_sample

    if arch not in ("gpt2", "llama"):
        raise RebmError(f"--arch must be gpt2 or llama, got {arch!r}")
    paths = DatasetPaths(dataset)
    report = bench_sample.run_bench(
        model_dir=model if model is not None else (paths.lm("base") if arch == "gpt2" else None),
        windows_file=paths.windows_split("valid"), windows=windows, n=n, ray_windows=ray_windows,
        arch=arch, device=device,
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
    from pipeline.core.config import TrainEBMConfig, load_section
    from pipeline.tools import bench_ebm

    bit_star = load_section(TrainEBMConfig, "train_ebm", params).bit_star.init
    typer.echo(bench_ebm.format_report(bench_ebm.ebm_benchmark(dataset, bit_star, batch)))


@bench_app.command("gpu")
@_user_errors
def bench_gpu(
    windows: Annotated[Path, typer.Option(help="windows Parquet file (test split) to sample and score")] = Path(
        "data/news/windows/test.parquet"),
    lm: Annotated[Path, typer.Option(help="the base LM (a saved HF causal LM)")] = Path("models/news/lm/base"),
    energy: Annotated[Path, typer.Option(help="an energy model that reads LM token ids")] = Path(
        "models/news/energy/bit"),
    device: Annotated[str, typer.Option(help="auto, cuda, cuda:N or cpu")] = "auto",
    samples: Annotated[int, typer.Option(help="LM samples per test prefix for the Table-1 range")] = 20000,
    n_windows: Annotated[int, typer.Option("--n-windows", help="test windows for the Table-1 range")] = 4,
    prefix_len: Annotated[int, typer.Option(help="tokenize.prefix_len of the windows")] = 120,
    scale: Annotated[float, typer.Option(help="shrink every batch and count (below 1: a CPU dry run)")] = 1.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON")] = None,
) -> None:
    """Training, sampling and scoring throughput on one CUDA device, device-vs-CPU agreement, and a
    Table-1 range with its convergence verdict (imports neither pydantic, Ray nor DVC)."""
    from pipeline.tools import bench_gpu

    report = bench_gpu.gpu_check(windows, lm, energy, device, samples, n_windows, prefix_len, scale)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    typer.echo(bench_gpu.format_report(report))


@bench_app.command("statistics")
@_user_errors
def bench_statistics(
    quick: Annotated[
        bool, typer.Option("--quick", help="fewer simulated replicates (about a minute on 2 cores)")
    ] = False,
    seed: Annotated[int, typer.Option(help="seed of every simulation")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
) -> None:
    """Simulations with known truth, no models: the paired interval's coverage at nominal 0.95 per
    scenario, and how often the log Z rule calls an unconverged estimate converged."""
    from pipeline.tools import bench_statistics as study

    report = study.statistics_study(quick=quick, seed=seed)
    typer.echo(json.dumps(report, indent=2) if as_json else study.format_report(report))


@bench_app.command("scale")
@_user_errors
def bench_scale(
    sizes: Annotated[str | None, typer.Option(help="train-split sizes in GB of int32 tokens, increasing "
                                              "(default 0.25,1,4; --quick 0.005,0.02)")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="small sizes: under 5 minutes on 2 cores")] = False,
    params: Annotated[Path, typer.Option(help="params file (tokenize and evaluate sections)")] = Path("params.yaml"),
    workdir: Annotated[Path | None, typer.Option(help="scratch directory (default: a temporary one)")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="keep the synthetic projects")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
) -> None:
    """Peak RSS of tokenize, train_ebm (the whole train split streamed, a few steps) and evaluate,
    each in a fresh process, on synthetic corpora of growing size; the goal is flat (largest ≤ 1.3x
    smallest). The full default writes about 3 x 5.25 GB of text and takes hours on 2 cores."""
    import tempfile

    from pipeline.tools import bench_scale as scale

    chosen = scale.parse_sizes(sizes) if sizes else scale.QUICK_SIZES_GB if quick else scale.SIZES_GB
    scratch = workdir or Path(tempfile.mkdtemp(prefix="rebm-bench-scale-"))

    def log(line: str) -> None:
        typer.echo(line, err=True)

    result = scale.scale_benchmark(chosen, params, scratch, keep=keep, log=log)
    typer.echo(json.dumps(result, indent=2) if as_json else scale.format_scale(result))


# --------------------------------------------------------------------------- seeds
seeds_app = typer.Typer(
    help="Run-to-run spread of Table 1: the pipeline rerun under k seeds as DVC experiments.",
    no_args_is_help=True,
)
app.add_typer(seeds_app, name="seeds")
PresetOption = Annotated[Path, typer.Option("--preset", help="seeds preset: seeds and the stages each run reproduces")]


@seeds_app.command("run")
@_user_errors
def seeds_run(preset: PresetOption = Path("params/seeds.yaml")) -> None:
    """`dvc exp run --temp -S seed=<s> <targets>` for every seed of the preset not yet kept as an
    experiment of this commit (the seed of params.yaml is the workspace's run). Each run is a whole
    default run up to evaluate: about 30 minutes on a 2-core AMX Xeon."""
    from pipeline.tools import seeds

    ran = seeds.run_seeds(seeds.load_preset(preset))
    typer.echo(f"ran seeds {ran}; now `rebm seeds collect`")


@seeds_app.command("collect")
@_user_errors
def seeds_collect(
    preset: PresetOption = Path("params/seeds.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
) -> None:
    """Read each seed's Table 1 and write results/seed_spread.json (the report shows it beside each row)."""
    from pipeline.core.precision import machine_description
    from pipeline.tools import seeds

    result = seeds.collect(seeds.load_preset(preset), machine=machine_description())
    typer.echo(json.dumps(result, indent=2) if as_json else seeds.format_spread(result))


@seeds_app.command("compare")
@_user_errors
def seeds_compare(
    other: Annotated[
        Path, typer.Argument(help="another run's checkout (reads its results/<dataset>/evaluation/metrics.json)")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
) -> None:
    """Whether results/seed_spread.json's next-run interval covers each Table 1 row of another run
    (a fresh clone on another CPU kind, say); a row it does not cover is "inconclusive" across runs."""
    from pipeline.reporting.spread import load_spread
    from pipeline.tools import seeds

    spread = load_spread()
    if spread is None:
        raise RebmError("no results/seed_spread.json: run `rebm seeds run` and `rebm seeds collect` first")
    rows = seeds.compare_run(spread, seeds.read_evaluations(other, list(spread["rows"])))
    typer.echo(json.dumps(rows, indent=2) if as_json else seeds.format_comparison(rows))


# --------------------------------------------------------------------------- humaneval
humaneval_app = typer.Typer(
    help="Human evaluation (paper Table 2, Appendix A.4): export an A/B sheet, score the votes.",
    no_args_is_help=True,
)
app.add_typer(humaneval_app, name="humaneval")


@humaneval_app.command("export")
@_user_errors
def humaneval_export(
    datasets: Annotated[
        list[str],
        typer.Argument(help="dataset keys (reads data/<dataset>/generations/generations.parquet) or NAME=PATH"),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="directory for sheet.html and pairs.csv")
    ] = Path("reports/humaneval"),
    pair: Annotated[
        list[str] | None,
        typer.Option("--pair", help="MODEL_1:MODEL_2 to compare, repeatable (default: joint:base, joint:gold)"),
    ] = None,
    windows: Annotated[
        int | None, typer.Option(help="windows compared per dataset; the rest feed attention checks (default: all)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="randomises sides and order (default: seed in params)")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Write a self-contained HTML rating sheet and the CSV key of its A/B pairs (1 in 4 is an attention check)."""
    from stages import humaneval as stage

    _print_summary(stage.export(datasets, out, params, pairs=pair, windows=windows, seed=seed))


@humaneval_app.command("score")
@_user_errors
def humaneval_score(
    votes: Annotated[list[Path], typer.Argument(help="votes CSV file(s): rater_id, pair_id, choice (A or B)")],
    pairs: Annotated[
        Path, typer.Option("--pairs", help="the key written by export")
    ] = Path("reports/humaneval/pairs.csv"),
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the table as JSON")] = None,
) -> None:
    """Drop raters who fail an attention check and print Table 2: preference rate and one-sided binomial p-value."""
    from stages import humaneval as stage

    typer.echo(stage.score(votes, pairs, json_out).markdown(), nl=False)

if __name__ == "__main__":
    app()
