"""One entry to training: the loop in this process, or on Ray Train above one worker.

`train` is what every recipe calls (the causal LMs, the masked LM, the NCE energy);
`save_trained_run` writes a finished run's model, curve and metrics; `run_metrics` is the
one place that turns a `TrainResult` into the fields every training stage's metrics share.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.core.config import OptimConfig
from pipeline.core.io import NOT_APPLICABLE_FILE, atomic_output, write_json
from pipeline.core.precision import resolve_precision
from pipeline.training.distributed import train_data_parallel
from pipeline.training.loop import (
    DirectoryCheckpoints,
    EpochBatches,
    Evaluate,
    LossFn,
    StepHook,
    TrainResult,
    discard_checkpoint,
    run_loop,
)


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: EpochBatches,
    evaluate: Evaluate,
    cfg: OptimConfig,
    *,
    checkpoint_dir: Path,
    seed: int,
    device: torch.device,
    fingerprint: str = "",
    desc: str = "train",
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train `model` (already on `device`) for `cfg.max_steps` steps; returns with the best weights loaded.

    `loss_fn(model, batch)` returns (mean loss, number of tokens it covered); it runs under
    autocast when `cfg.precision` resolves to bf16 (pipeline.core.precision). `evaluate(model)` runs
    every `cfg.eval_every` steps and at the end, in eval mode. `on_step(step)` is called after
    each step, after any checkpoint is written (tests use it to simulate a kill).

    With `cfg.workers > 1` this runs on Ray Train (`pipeline.training.distributed.train_data_parallel`,
    which needs a Ray session opened by the entry point); `device` is then the workers' device
    and the returned model is back on the device it came on.
    """
    if cfg.workers > 1:
        return train_data_parallel(
            model, loss_fn, batches, evaluate, cfg, checkpoint_dir=Path(checkpoint_dir), seed=seed, device=device,
            fingerprint=fingerprint, desc=desc, on_step=on_step,
        )
    store = DirectoryCheckpoints(Path(checkpoint_dir), fingerprint)
    return run_loop(model, loss_fn, batches, evaluate, cfg, store=store, seed=seed, device=device, desc=desc,
                    on_step=on_step)


CURVE_COLUMNS = ("epoch", "train_loss", "valid_loss", "lr", "tokens_per_s", "tokens")  # logged per validation step


def write_curve(live_dir: Path, curve: list[dict[str, float]]) -> None:
    """The learning curve through dvclive: `live_dir`/plots/metrics/<column>.tsv (step, value; one
    row per validation) and metrics.json (the last row), values to 6 significant digits.

    dvclive writes into a scratch folder outside the repository (inside `dvc exp run` it would
    otherwise `git add` whatever it finds untracked under its folder, here a temporary sibling);
    the files are then moved into place atomically. An empty curve still leaves both files' folder.
    """
    from dvclive import Live

    with tempfile.TemporaryDirectory(prefix="rebm-live-") as scratch:
        with Live(scratch, save_dvc_exp=False, dvcyaml=False, report=None) as live:
            for row in curve:
                live.step = int(row["step"])
                for column in CURVE_COLUMNS:
                    value = row[column]
                    live.log_metric(column, int(value) if column == "tokens" else float(f"{value:.6g}"))
        (Path(scratch) / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
        with atomic_output(live_dir, directory=True) as tmp:
            shutil.copytree(scratch, tmp, dirs_exist_ok=True)


def save_trained_run(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    result: TrainResult,
    metrics: dict[str, Any],
    *,
    model_dir: Path,
    live_dir: Path,
    metrics_path: Path,
    checkpoint_dir: Path,
    started: float,
) -> dict[str, Any]:
    """Write a finished run's outputs, each atomically, then drop its resumable checkpoint.

    The checkpoint goes last, so a kill anywhere before it leaves a rerun that resumes at the
    final step instead of training again. `started` is the stage's `time.perf_counter()` start.
    """
    with atomic_output(model_dir, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_curve(live_dir, result.curve)
    metrics = {**metrics, "wall_seconds": round(time.perf_counter() - started, 1)}
    write_json(metrics_path, metrics)
    discard_checkpoint(checkpoint_dir)
    return metrics


def save_not_applicable(
    reason: str, metrics: dict[str, Any], *, model_dir: Path, live_dir: Path, metrics_path: Path, started: float,
) -> dict[str, Any]:
    """A variant this run does not train (its params entry is null): a record where the model
    would be, an empty curve and metrics saying why, so DVC has the stage's outputs and the
    report can mark the row "not applicable" instead of missing."""
    record = {**metrics, "applicable": False, "reason": reason,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    with atomic_output(model_dir, directory=True) as tmp:
        write_json(tmp / NOT_APPLICABLE_FILE, record)
    write_curve(live_dir, [])
    write_json(metrics_path, record)
    print(f"{metrics.get('dataset', '?')}/{metrics.get('variant', '?')}: not applicable ({reason})")
    return record


def run_metrics(result: TrainResult, cfg: OptimConfig, device: torch.device, per_s: str = "tokens") -> dict[str, Any]:
    """The metrics every training stage reports about its run (`per_s`: what `result.tokens` counts)."""
    return {
        "steps": result.steps,
        "best_step": result.best_step,
        "train_seconds": round(result.train_seconds, 1),
        f"train_{per_s}_per_s": round(result.tokens / max(result.train_seconds, 1e-9), 1),
        "resumed_from_step": result.resumed_from,
        "device": str(device),
        "workers": cfg.workers,
        "precision": resolve_precision(cfg.precision, device),
    }
