"""Data-parallel training on Ray Train: the loop of `pipeline.training.loop`, on `workers` replicas.

`pipeline.training.trainer.train` hands a run here when its `OptimConfig.workers` is above 1. A
`ray.train.torch.TorchTrainer` starts that many workers on the Ray cluster the entry point
attached to (`pipeline.sampling.actor_pool.ray_session`: $RAY_ADDRESS, else a local Ray); Ray Train
sets up the torch.distributed process group (gloo on CPU workers, NCCL with `use_gpu`). Each
worker runs the unchanged loop (`run_loop`) as one replica:

- Global batch. Step i of epoch e uses the batch a single process would (rows fixed by
  (seed, e)), cut into workers x grad_accum equal micro-batches; replica r computes its own
  grad_accum of them (`rank_micro_batches`), so it reads only its shard of the windows.
  Gradients are averaged over the replicas with one all-reduce per step (flat buckets, like
  DDP's) before clipping, so every replica takes the same AdamW step and the run equals the
  single-process one up to float reduction order. The reduction is explicit rather than a
  `DistributedDataParallel` wrapper because the loss functions may reach the model through
  other objects (the NCE loss calls it through an `EnergyScorer`), which DDP's forward hooks
  would miss. Dropout masks (and MLM masks) are drawn per replica, seeded by (seed, rank).
- Checkpoints. Every `checkpoint_every` steps rank 0 reports a Ray Train checkpoint (weights,
  optimizer, scheduler, every replica's RNG state, counters, best weights so far) to the
  run's storage: `<checkpoint_dir>/ray` on the driver, or $REBM_RAY_STORAGE (a shared path or
  s3:// URI, which a multi-node cluster needs), and waits until Ray Train has committed it.
  A failed worker makes Ray Train restart the worker group (`FailureConfig(max_failures)`),
  which resumes from `ray.train.get_checkpoint()` rather than step 0. The run's name carries the
  configuration fingerprint, so a rerun of a killed stage resumes from the same storage too.
- Result. The driver loads the best weights of the final checkpoint into its own model (back
  on the device it came on); the stage then writes it atomically to its DVC output directory
  (`pipeline.training.trainer.save_trained_run`), exactly as a single-process run does.

The model and the loss/batch/validation closures are shipped to the workers in one pickle
through the object store (so a loss function holding the model still holds the same object,
and no shared filesystem is needed for the data). Nothing here starts Ray or imports it at
module import.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from pipeline.core.config import OptimConfig
from pipeline.core.errors import RebmError
from pipeline.training.loop import (
    EpochBatches,
    Evaluate,
    LossFn,
    Replica,
    StepHook,
    TrainResult,
    TrainState,
    read_state,
    rng_state,
    run_loop,
    set_rng_state,
)

STORAGE_ENV = "REBM_RAY_STORAGE"  # Ray Train storage for checkpoints (a multi-node cluster needs shared storage)
BUCKET_ELEMENTS = 1 << 24  # gradient elements per all-reduce (64 MB in fp32)


# --------------------------------------------------------------------------- for the stages
def training_device(cfg: OptimConfig, device: torch.device) -> torch.device:
    """The device the training loop (and its closures) runs on: `device` in a single process,
    else the workers' device (`cuda` with use_gpu, Ray Train picking each worker's GPU)."""
    if cfg.workers == 1:
        return device
    return torch.device("cuda" if cfg.use_gpu else "cpu")


@contextlib.contextmanager
def cluster_for(cfg: OptimConfig, address: str | None = None) -> Iterator[dict | None]:
    """For an entry point: a Ray session when `cfg` trains on several workers, else nothing.

    Attaches to `address` / $RAY_ADDRESS, or starts a local Ray sized for the workers.
    """
    if cfg.workers == 1:
        yield None
        return
    from pipeline.sampling.actor_pool import ray_session

    with ray_session(address, num_cpus=max(cfg.workers * cfg.cpus_per_worker, os.cpu_count() or 1)) as session:
        yield session


def replica_seed(seed: int, rank: int) -> int:
    """Dropout seed of replica `rank`: rank 0 uses `seed` itself, like the single process."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _log(message: str) -> None:
    # stderr, not print(): Ray Train patches print() in workers and would log the line twice.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- the driver
@dataclass
class _Job:
    """Everything a worker needs, pickled once (object identity between its parts survives)."""

    model: torch.nn.Module
    loss_fn: LossFn
    batches: EpochBatches
    evaluate: Evaluate
    cfg: OptimConfig
    seed: int
    device: torch.device
    fingerprint: str
    desc: str
    on_step: StepHook | None


def run_name(desc: str, fingerprint: str) -> str:
    """The Ray Train run name: a rerun of the same configuration finds (and resumes) its checkpoints."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", desc).strip("-") or "train"
    return f"{slug}-{fingerprint[:16]}" if fingerprint else f"{slug}-{uuid.uuid4().hex[:12]}"


def train_data_parallel(
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
    """`pipeline.training.trainer.train` on `cfg.workers` Ray Train workers; same contract and result.

    `device` is the workers' device (see `training_device`). Needs a Ray session (the entry
    point opens one: `cluster_for` / `ray_session`). `on_step(step)` runs on every worker
    after each step (tests use it to kill one).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        raise RebmError(f"{desc}: {cfg.workers} workers need a Ray session; the entry point opens one "
                        "(pipeline.training.distributed.cluster_for or pipeline.sampling.actor_pool.ray_session)")
    home = next(model.parameters()).device
    model.to("cpu")  # shipped to the workers with the closures, in one pickle
    job = _Job(model, loss_fn, batches, evaluate, cfg, seed, torch.device(device), fingerprint, desc, on_step)
    storage = os.environ.get(STORAGE_ENV) or str(Path(checkpoint_dir).resolve() / "ray")
    name = run_name(desc, fingerprint)
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    _log(f"{desc}: data-parallel on {cfg.workers} Ray Train workers ({'GPU' if cfg.use_gpu else 'CPU'}, "
         f"{cfg.batch_size // (cfg.workers * cfg.grad_accum)} rows x {cfg.grad_accum} micro-batches each per "
         f"step of {cfg.batch_size}); checkpoints in {storage}/{name}")
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise RebmError(f"{desc}: data-parallel training failed (after up to {cfg.max_failures} restarts from "
                        f"the last checkpoint): {exc}") from exc
    finally:
        model.to(home)
    if result.checkpoint is None:
        raise RebmError(f"{desc}: the Ray Train run ended without a checkpoint ({storage}/{name})")
    with result.checkpoint.as_directory() as directory:
        directory = Path(directory)
        state = TrainState(**read_state(directory / "state.json"))
        info = json.loads((directory / "run.json").read_text(encoding="utf-8"))
        best = directory / "best.safetensors"
        load_model(model, str(best if best.exists() else directory / "model.safetensors"), device=str(home))
    model.eval()
    _log(f"{desc}: Ray Train run finished at step {state.step} (this attempt started at step "
         f"{info['resumed_from']}; best valid {state.best_valid:.4f} at step {state.best_step})")
    return TrainResult(
        steps=state.step,
        tokens=state.tokens,
        train_seconds=state.train_seconds,
        best_valid=state.best_valid,
        best_step=state.best_step,
        curve=state.curve,
        resumed_from=info["resumed_from"],
        step_seconds=info["step_seconds"],
    )


# --------------------------------------------------------------------------- the workers
def _worker_main(config: dict[str, Any]) -> None:
    """One Ray Train worker: the training loop as replica `rank` of `world`."""
    import ray.train

    job: _Job = config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job.cfg.cpus_per_worker)
    device = job.device
    if device.type == "cuda":
        from ray.train.torch import get_device

        device = get_device()
        torch.cuda.set_device(device)  # the closures' bare "cuda" then means this worker's GPU
    model = job.model.to(device)
    with tempfile.TemporaryDirectory(prefix="rebm-replica-") as scratch:
        store = RayTrainCheckpoints(job.fingerprint, rank, world, job.desc, Path(scratch))
        result = run_loop(
            model, job.loss_fn, job.batches, job.evaluate, job.cfg,
            store=store, seed=replica_seed(job.seed, rank), device=device, desc=job.desc,
            on_step=job.on_step, replica=Replica(rank=rank, world=world, sync=average_gradients),
        )
        if not result.step_seconds:  # restored at the last step (a rerun): say so in a final checkpoint
            store.report_restored()


class RayTrainCheckpoints:
    """A `CheckpointStore` over Ray Train: `ray.train.report` to save, `ray.train.get_checkpoint` to restore."""

    def __init__(self, fingerprint: str, rank: int, world: int, desc: str, scratch: Path):
        self.fingerprint, self.rank, self.world, self.desc = fingerprint, rank, world, desc
        self.scratch = scratch
        self.best_path = scratch / "best.safetensors"  # rank 0's best weights, copied into every checkpoint
        self.resumed_from = 0

    def restore(self, model, optimizer, scheduler, device: torch.device) -> TrainState | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            raw = read_state(directory / "state.json")
            if raw.get("fingerprint") != self.fingerprint:
                raise RuntimeError(f"{checkpoint.path}: checkpoint of another configuration "
                                   f"({raw.get('fingerprint')!r}, expected {self.fingerprint!r})")
            load_model(model, str(directory / "model.safetensors"), device=str(device))
            trainer = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=True)
            optimizer.load_state_dict(trainer["optimizer"])
            scheduler.load_state_dict(trainer["scheduler"])
            rngs = trainer["rng"]
            if self.rank < len(rngs):
                set_rng_state(rngs[self.rank])
            if (directory / "best.safetensors").exists() and self.rank == 0:
                shutil.copyfile(directory / "best.safetensors", self.best_path)
        state = TrainState(**raw)
        self.resumed_from = state.step
        _log(f"{self.desc}: rank {self.rank}/{self.world} resumed from the Ray Train checkpoint at step "
             f"{state.step} ({checkpoint.path})")
        return state

    def save(self, model, optimizer, scheduler, state: TrainState, step_seconds: list[float]) -> None:
        import ray.train
        import torch.distributed as dist

        rngs: list[Any] = [None] * self.world
        dist.all_gather_object(rngs, rng_state())  # every replica's dropout stream, saved by rank 0
        metrics = {"step": state.step, "tokens": state.tokens}
        if state.curve:
            metrics |= {"train_loss": state.curve[-1]["train_loss"], "valid_loss": state.curve[-1]["valid_loss"]}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="rebm-checkpoint-", dir=self.scratch) as tmp:
            tmp = Path(tmp)
            save_model(model, str(tmp / "model.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs},
                       tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")
            (tmp / "run.json").write_text(json.dumps({
                "resumed_from": self.resumed_from, "step_seconds": step_seconds, "world": self.world,
            }), encoding="utf-8")
            if self.best_path.exists():
                shutil.copyfile(self.best_path, tmp / "best.safetensors")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        # Ray Train registers a report when its controller next polls the workers (every few
        # seconds); wait for that, so a worker lost from here on resumes from this step.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        _log(f"{self.desc}: checkpoint at step {state.step} committed to Ray Train")


    def report_restored(self) -> None:
        """Re-report the restored final checkpoint with this attempt's run.json (no step was taken)."""
        import ray.train

        if self.rank != 0:
            ray.train.report({"step": self.resumed_from}, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="rebm-checkpoint-", dir=self.scratch) as tmp:
            ray.train.get_checkpoint().to_directory(tmp)
            run = json.loads((Path(tmp) / "run.json").read_text(encoding="utf-8"))
            run |= {"resumed_from": self.resumed_from, "step_seconds": []}
            (Path(tmp) / "run.json").write_text(json.dumps(run), encoding="utf-8")
            ray.train.report({"step": self.resumed_from, "resumed_from": self.resumed_from},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def average_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """All-reduce: gradients averaged over the replicas (in place), loss averaged, tokens summed.

    A parameter with a gradient on some replica gets a zero gradient on the others; one with
    none anywhere keeps `grad=None`, so AdamW skips it as in a single process.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    device = params[0].device
    has_grad = [float(p.grad is not None) for p in params]
    stats = torch.tensor([float(loss), float(tokens), *has_grad], dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    grads: dict[torch.dtype, list[torch.Tensor]] = {}
    for p, seen in zip(params, stats[2:].tolist(), strict=True):
        if seen > 0:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.setdefault(p.grad.dtype, []).append(p.grad)
    for same_dtype in grads.values():
        for bucket in _buckets(same_dtype):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
    return stats[0] / world, int(round(stats[1].item()))


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and size + t.numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket
