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

Scale-out: `pipeline.training.trainer.train` runs this loop in the process or, with
`cfg.workers > 1`, data-parallel on Ray Train (`pipeline.training.distributed`); with
`cfg.grad_accum > 1` each step accumulates micro-batches. Either way a step still consumes
exactly the batch of `cfg.batch_size` rows a single process would, cut into
`workers x grad_accum` equal micro-batches, so the run does not depend on the cluster.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from pipeline.core.config import OptimConfig
from pipeline.core.io import atomic_output
from pipeline.core.precision import autocast as precision_autocast

LossFn = Callable[[torch.nn.Module, Any], "tuple[torch.Tensor, int]"]  # (mean loss, tokens in batch)
EpochBatches = Callable[[int], Sequence[Any]]  # epoch -> that epoch's batches, a pure function
Evaluate = Callable[[torch.nn.Module], float]  # model -> validation loss (lower is better)
StepHook = Callable[[int], None]


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

    def micro_batch(self, i: int, part: int, parts: int) -> torch.Tensor:
        """Rows `part`·m … (`part`+1)·m of batch `i` (m = batch_size / parts), reading only those rows."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        size = self.batch_size // parts
        start = i * self.batch_size + part * size
        return self.data[self.order[start : start + size]]


def slice_batch(batch: Any, part: int, parts: int) -> Any:
    """Part `part` of `parts` equal row slices of a batch: a tensor, or a dict / list / tuple of
    tensors that share their first dimension (an NCE batch is {"real": …, "lm": …})."""
    if isinstance(batch, torch.Tensor):
        if len(batch) % parts:
            raise ValueError(f"a batch of {len(batch)} rows does not split into {parts} equal micro-batches")
        size = len(batch) // parts
        return batch[part * size : (part + 1) * size]
    if isinstance(batch, dict):
        return {key: slice_batch(value, part, parts) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(value, part, parts) for value in batch)
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into micro-batches")


def rank_micro_batches(epoch_batches: Sequence[Any], i: int, rank: int, world: int, accum: int) -> list[Any]:
    """The `accum` micro-batches replica `rank` of `world` computes for batch `i`.

    Batch i is cut into world·accum equal slices in row order; replica r takes slices
    r·accum … r·accum + accum − 1. Which rows a replica reads is thus a pure function of
    (seed, epoch, i, rank, world, accum), and together the replicas cover exactly the batch a
    single process would use. Batches with a `micro_batch(i, part, parts)` method (ShuffledBatches)
    read only their rows; others are built whole and sliced.
    """
    parts = world * accum
    wanted = range(rank * accum, (rank + 1) * accum)
    if hasattr(epoch_batches, "micro_batch"):
        return [epoch_batches.micro_batch(i, part, parts) for part in wanted]
    whole = epoch_batches[i]
    return [slice_batch(whole, part, parts) for part in wanted]


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
    step_seconds: list[float] = field(default_factory=list)  # each step this call ran (benchmarks)


def optimizer_for(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-d tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=cfg.betas, eps=cfg.eps)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(directory: Path, model: torch.nn.Module, optimizer, scheduler, state: TrainState) -> None:
    with atomic_output(directory / "last", directory=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / "trainer.pt",
        )
        (tmp / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json as TrainState keyword arguments."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    raw["best_valid"] = float(raw["best_valid"])
    return raw


def _load_checkpoint(directory: Path, fingerprint: str, model, optimizer, scheduler, device) -> TrainState | None:
    last = directory / "last"
    if not (last / "state.json").exists():
        return None
    raw = read_state(last / "state.json")
    if raw.get("fingerprint") != fingerprint:
        return None  # a different configuration or data: start afresh
    load_model(model, str(last / "model.safetensors"), device=str(device))
    trainer = torch.load(last / "trainer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return TrainState(**raw)


def discard_checkpoint(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)


class CheckpointStore(Protocol):
    """Where the loop keeps its resumable state and its best weights so far."""

    fingerprint: str
    best_path: Path  # best weights by validation, written by rank 0 when they improve

    def restore(self, model, optimizer, scheduler, device: torch.device) -> TrainState | None:
        """Load the last checkpoint of this configuration into the objects, or None to start afresh."""

    def save(self, model, optimizer, scheduler, state: TrainState, step_seconds: list[float]) -> None:
        """Write a checkpoint (called by every replica at the same steps)."""


class DirectoryCheckpoints:
    """The single-process store: `directory/last` (replaced atomically) and `directory/best.safetensors`."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.best_path = self.directory / "best.safetensors"

    def restore(self, model, optimizer, scheduler, device: torch.device) -> TrainState | None:
        state = _load_checkpoint(self.directory, self.fingerprint, model, optimizer, scheduler, device)
        if state is None:
            discard_checkpoint(self.directory)  # stale state from another configuration
        self.directory.mkdir(parents=True, exist_ok=True)
        return state

    def save(self, model, optimizer, scheduler, state: TrainState, step_seconds: list[float]) -> None:
        _save_checkpoint(self.directory, model, optimizer, scheduler, state)


# (params, mean loss of this replica's micro-batches, its tokens) -> (global mean loss, global tokens);
# averages the gradients over the replicas in place.
GradientSync = Callable[[list[torch.nn.Parameter], torch.Tensor, int], "tuple[torch.Tensor, int]"]


@dataclass(frozen=True)
class Replica:
    """This process's place in a data-parallel run; the default is the single process."""

    rank: int = 0
    world: int = 1
    sync: GradientSync | None = None


def _accumulate(model, loss_fn: LossFn, micro_batches: list[Any], autocast) -> tuple[torch.Tensor, int]:
    """Backward over each micro-batch with its loss scaled by 1/len, so the gradient is their mean."""
    total, tokens = None, 0
    for batch in micro_batches:
        with autocast:
            loss, n_tokens = loss_fn(model, batch)
        (loss / len(micro_batches)).backward()
        total = loss.detach() if total is None else total + loss.detach()
        tokens += n_tokens
    return total / len(micro_batches), tokens


@dataclass
class _Interval:
    """Training loss and throughput since the last validation (what the curve and the bar show)."""

    loss_sum: float = 0.0
    loss_count: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class _Run:
    """What one call of `run_loop` works with: the objects it steps and the replica's settings."""

    model: torch.nn.Module
    loss_fn: LossFn
    cfg: OptimConfig
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    autocast: Any
    replica: Replica

    @property
    def parts(self) -> int:
        return self.replica.world * self.cfg.grad_accum


def _next_batch(run: _Run, epoch_batches: Sequence[Any], i: int) -> Any:
    """Batch `i` whole (one replica, no accumulation), or this replica's micro-batches of it."""
    if run.parts == 1:
        return epoch_batches[i]
    return rank_micro_batches(epoch_batches, i, run.replica.rank, run.replica.world, run.cfg.grad_accum)


def _train_step(run: _Run, batch: Any) -> tuple[float, int, float]:
    """One optimisation step: forward, backward (synced across replicas), clip, AdamW, LR schedule.

    Returns (mean loss, tokens, seconds)."""
    t0 = time.perf_counter()
    if run.parts == 1:
        with run.autocast:
            loss, n_tokens = run.loss_fn(run.model, batch)
        loss.backward()
    else:
        loss, n_tokens = _accumulate(run.model, run.loss_fn, batch, run.autocast)
        if run.replica.sync is not None:
            loss, n_tokens = run.replica.sync(run.params, loss, n_tokens)
    torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_value = loss.item()  # also waits for the device, so the timing below is honest
    return loss_value, n_tokens, time.perf_counter() - t0


def _validate(run: _Run, state: TrainState, evaluate: Evaluate, interval: _Interval, epoch_len: int,
              best_path: Path) -> float:
    """Validate, append a point to the learning curve and keep the weights if they are the best so far."""
    valid = evaluate(run.model)
    run.model.train()
    state.curve.append({
        "step": state.step,
        "epoch": state.epoch + state.batch_in_epoch / epoch_len,
        "train_loss": interval.loss_sum / interval.loss_count,
        "valid_loss": valid,
        "lr": run.scheduler.get_last_lr()[0],
        "tokens_per_s": interval.tokens_per_s,
        "tokens": state.tokens,
    })
    if valid < state.best_valid:
        state.best_valid, state.best_step = valid, state.step
        with atomic_output(best_path, directory=False) as tmp:
            save_model(run.model, str(tmp))
    return valid


def _restore_or_start(run: _Run, store: CheckpointStore, seed: int, device: torch.device) -> TrainState:
    """The last checkpoint of this configuration, or a fresh state with dropout seeded by `seed`."""
    state = store.restore(run.model, run.optimizer, run.scheduler, device)
    if state is None:
        state = TrainState(fingerprint=store.fingerprint)
        torch.manual_seed(seed)  # dropout masks
    return state


def run_loop(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: EpochBatches,
    evaluate: Evaluate,
    cfg: OptimConfig,
    *,
    store: CheckpointStore,
    seed: int,
    device: torch.device,
    desc: str = "train",
    on_step: StepHook | None = None,
    replica: Replica = Replica(),
) -> TrainResult:
    """The loop itself, for one process: the single process, or one replica of a data-parallel run.

    Every replica takes the same steps over the same global batches (its own micro-batches of
    them), averages gradients through `replica.sync` before clipping, and so holds the same
    weights; only rank 0 validates, keeps the best weights and shows progress. `seed` seeds
    dropout on a fresh start. With one replica and `grad_accum == 1` a step is exactly the
    classic forward, backward, clip, AdamW step.
    """
    optimizer = optimizer_for(model, cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    run = _Run(model, loss_fn, cfg, optimizer, scheduler, params, precision_autocast(device, cfg.precision), replica)
    state = _restore_or_start(run, store, seed, device)
    resumed_from = state.step
    best_path = store.best_path
    lead = replica.rank == 0
    step_seconds: list[float] = []

    model.train()
    interval = _Interval()
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=desc, dynamic_ncols=True, mininterval=2.0,
               disable=not lead)
    while state.step < cfg.max_steps:
        epoch_batches = batches(state.epoch)
        if state.batch_in_epoch >= len(epoch_batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            continue
        batch = _next_batch(run, epoch_batches, state.batch_in_epoch)
        loss_value, n_tokens, dt = _train_step(run, batch)
        step_seconds.append(dt)

        state.step += 1
        state.batch_in_epoch += 1
        state.tokens += n_tokens
        state.train_seconds += dt
        interval.add(loss_value, n_tokens, dt)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{interval.tokens_per_s:.0f}",
                        refresh=False)  # redrawn by update() at most every mininterval
        bar.update(1)

        last = state.step == cfg.max_steps
        if state.step % cfg.eval_every == 0 or last:
            if lead:
                valid = _validate(run, state, evaluate, interval, len(epoch_batches), best_path)
                bar.write(f"{desc} step {state.step}: train {state.curve[-1]['train_loss']:.4f} valid {valid:.4f}")
            interval = _Interval()
        if state.step % cfg.checkpoint_every == 0 or last:
            store.save(model, optimizer, scheduler, state, step_seconds)
        if on_step is not None:
            on_step(state.step)
    bar.close()

    if best_path.exists():
        load_model(model, str(best_path), device=str(device))
    model.eval()
    return TrainResult(steps=state.step, tokens=state.tokens, train_seconds=state.train_seconds,
                       best_valid=state.best_valid, best_step=state.best_step, curve=state.curve,
                       resumed_from=resumed_from, step_seconds=step_seconds)
