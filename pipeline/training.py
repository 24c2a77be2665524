"""A small, resumable training loop (nanoGPT-style) shared by every trained model.

The caller supplies the model, a loss function over one batch, the batches of each epoch,
and a validation function; the loop does AdamW with linear warmup and cosine decay
(`transformers.get_cosine_schedule_with_warmup`, the paper's Appendix A.3 recipe), gradient
norm clipping, optional bf16 autocast, periodic validation, keeps the best weights by
validation loss, and records a learning curve.

Resuming: every `checkpoint_every` steps (and at the last step) the loop writes the model
(safetensors), optimizer + scheduler + RNG state (torch.save, tensors only) and its counters
to `checkpoint_dir/last`, replacing the previous one atomically. A rerun with the same
`fingerprint` continues from there: the data order is a pure function of (seed, epoch), so
the resumed run sees the same batches with the same learning rates and dropout masks as an
uninterrupted one. The caller deletes `checkpoint_dir` once the final artifact is written.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from pipeline.config import OptimConfig
from pipeline.io import atomic_output, write_json

LossFn = Callable[[torch.nn.Module, Any], "tuple[torch.Tensor, int]"]  # (mean loss, tokens in batch)
EpochBatches = Callable[[int], Sequence[Any]]  # epoch -> that epoch's batches, a pure function
Evaluate = Callable[[torch.nn.Module], float]  # model -> validation loss (lower is better)
StepHook = Callable[[int], None]


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- data order
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of `n` examples in `epoch`: depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class ShuffledBatches(Sequence):
    """One epoch of row batches of a [N, ...] tensor, shuffled by (seed, epoch); the last partial batch is dropped."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, epoch: int):
        if len(data) < batch_size:
            raise ValueError(f"{len(data)} examples are fewer than one batch of {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.order = torch.from_numpy(epoch_permutation(len(data), seed, epoch))

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.data[self.order[i * self.batch_size : (i + 1) * self.batch_size]]


# --------------------------------------------------------------------------- the loop
@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # optimisation time only (no validation, no checkpointing)
    best_valid: float = math.inf
    best_step: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    fingerprint: str = ""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_seconds: float
    best_valid: float
    best_step: int
    curve: list[dict[str, float]]
    resumed_from: int  # 0 for a fresh run


def optimizer_for(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-d tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=cfg.betas, eps=cfg.eps)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(directory: Path, model: torch.nn.Module, optimizer, scheduler, state: TrainState) -> None:
    with atomic_output(directory / "last", directory=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            tmp / "trainer.pt",
        )
        (tmp / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")


def _load_checkpoint(directory: Path, fingerprint: str, model, optimizer, scheduler, device) -> TrainState | None:
    last = directory / "last"
    if not (last / "state.json").exists():
        return None
    raw = json.loads((last / "state.json").read_text(encoding="utf-8"))
    if raw.get("fingerprint") != fingerprint:
        return None  # a different configuration or data: start afresh
    load_model(model, str(last / "model.safetensors"), device=str(device))
    trainer = torch.load(last / "trainer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    raw["best_valid"] = float(raw["best_valid"])
    return TrainState(**raw)


def discard_checkpoint(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)


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
    autocast when `cfg.precision == "bf16"`. `evaluate(model)` runs every `cfg.eval_every`
    steps and at the end, in eval mode. `on_step(step)` is called after each step, after
    any checkpoint is written (tests use it to simulate a kill).
    """
    checkpoint_dir = Path(checkpoint_dir)
    optimizer = optimizer_for(model, cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    state = _load_checkpoint(checkpoint_dir, fingerprint, model, optimizer, scheduler, device)
    resumed_from = state.step if state else 0
    if state is None:
        discard_checkpoint(checkpoint_dir)  # stale state from another configuration
        state = TrainState(fingerprint=fingerprint)
        torch.manual_seed(seed)  # dropout masks
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    best_path = checkpoint_dir / "best.safetensors"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    model.train()
    loss_sum, loss_count, interval_tokens, interval_seconds = 0.0, 0, 0, 0.0
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=desc, dynamic_ncols=True, mininterval=2.0)
    while state.step < cfg.max_steps:
        epoch_batches = batches(state.epoch)
        if state.batch_in_epoch >= len(epoch_batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
        batch = epoch_batches[state.batch_in_epoch]

        t0 = time.perf_counter()
        with autocast:
            loss, n_tokens = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # also waits for the device, so the timing below is honest
        dt = time.perf_counter() - t0

        state.step += 1
        state.batch_in_epoch += 1
        state.tokens += n_tokens
        state.train_seconds += dt
        loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
        interval_tokens, interval_seconds = interval_tokens + n_tokens, interval_seconds + dt
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{interval_tokens / max(interval_seconds, 1e-9):.0f}",
                        refresh=False)  # redrawn by update() at most every mininterval
        bar.update(1)

        last = state.step == cfg.max_steps
        if state.step % cfg.eval_every == 0 or last:
            valid = evaluate(model)
            model.train()
            state.curve.append({
                "step": state.step,
                "epoch": state.epoch + state.batch_in_epoch / len(epoch_batches),
                "train_loss": loss_sum / loss_count,
                "valid_loss": valid,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": interval_tokens / max(interval_seconds, 1e-9),
                "tokens": state.tokens,
            })
            loss_sum, loss_count, interval_tokens, interval_seconds = 0.0, 0, 0, 0.0
            bar.write(f"{desc} step {state.step}: train {state.curve[-1]['train_loss']:.4f} valid {valid:.4f}")
            if valid < state.best_valid:
                state.best_valid, state.best_step = valid, state.step
                with atomic_output(best_path, directory=False) as tmp:
                    save_model(model, str(tmp))
        if state.step % cfg.checkpoint_every == 0 or last:
            _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, state)
        if on_step is not None:
            on_step(state.step)
    bar.close()

    if best_path.exists():
        load_model(model, str(best_path), device=str(device))
    model.eval()
    return TrainResult(
        steps=state.step,
        tokens=state.tokens,
        train_seconds=state.train_seconds,
        best_valid=state.best_valid,
        best_step=state.best_step,
        curve=state.curve,
        resumed_from=resumed_from,
    )


def write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    """The learning curve as TSV (one row per validation), written atomically."""
    columns = ["step", "epoch", "train_loss", "valid_loss", "lr", "tokens_per_s", "tokens"]
    lines = ["\t".join(columns)]
    for row in curve:
        lines.append("\t".join(
            str(int(row[c])) if c in ("step", "tokens") else f"{row[c]:.6g}" for c in columns
        ))
    with atomic_output(path, directory=False) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def save_trained_run(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    result: TrainResult,
    metrics: dict[str, Any],
    *,
    model_dir: Path,
    curve_path: Path,
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
    write_curve(curve_path, result.curve)
    metrics = {**metrics, "wall_seconds": round(time.perf_counter() - started, 1)}
    write_json(metrics_path, metrics)
    discard_checkpoint(checkpoint_dir)
    return metrics
