"""Energies of many token windows, in fixed shards, on Ray actors or in this process.

The evaluate and generate stages score hundreds of thousands of sequences (every LM sample
of every test prefix, and |V| candidates per window for the exact last position). The work
is cut into shards of `shard_sequences` consecutive rows, so each shard meets the same
numerics whichever worker runs it and the energies do not depend on the worker count.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.core.precision import autocast
from pipeline.sampling.actor_pool import PoolStats, Task, make_pool, model_directory, ship, worker_info, worker_setup


class EnergyWorker:
    """Holds one energy model and the LM's tokenizer; `score` returns E for a block of windows."""

    def __init__(self, energy_source: str | list, tokenizer_source: str | list, threads: int, precision: str,
                 batch_size: int, device: str = "cpu"):
        from transformers import AutoTokenizer

        from pipeline.core.precision import actor_device
        from pipeline.models.energy import EnergyScorer, load_energy

        worker_setup(threads)
        self.device = actor_device(device)
        with model_directory(energy_source) as energy_dir, model_directory(tokenizer_source) as tok_dir:
            model, body_tokenizer = load_energy(energy_dir)
            lm_tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.scorer = EnergyScorer(model.to(self.device).eval(), body_tokenizer, lm_tokenizer)
        self.precision = precision
        self.batch_size = batch_size

    def ready(self) -> dict:
        return {**worker_info(self.device), "input": "ids" if self.scorer.shares_vocab else "text"}

    def score(self, windows: np.ndarray) -> np.ndarray:
        return score_windows(self.scorer, windows, self.batch_size, self.precision)


@torch.inference_mode()
def score_windows(scorer, windows: np.ndarray, batch_size: int, precision: str = "fp32") -> np.ndarray:
    """E(x) for every row of `windows` ([N, T] LM token ids) as float64 [N].

    Windows that reach the body as text are encoded first; identical encodings are scored once
    (the |V| last-position candidates of one window often differ only in case or in bytes the
    body cannot see), and batches are cut from the encodings sorted by length, so a batch pads
    to about its own length rather than to the longest sequence of the block.
    """
    windows = np.asarray(windows, dtype=np.int64)
    out = np.empty(len(windows), dtype=np.float64)
    was_training = scorer.model.training
    scorer.model.eval()
    amp = autocast(scorer.device, precision)
    try:
        if scorer.shares_vocab:
            for start in range(0, len(windows), batch_size):
                batch = torch.tensor(windows[start : start + batch_size])  # a copy: arrays from Ray are read-only
                with amp:
                    out[start : start + len(batch)] = scorer(batch).double().cpu().numpy()
            return out
        encodings = scorer.input_ids(windows.tolist())
        index: dict[tuple[int, ...], int] = {}
        which = np.array([index.setdefault(tuple(e), len(index)) for e in encodings], dtype=np.int64)
        distinct = list(index)
        order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
        energies = np.empty(len(distinct), dtype=np.float64)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            with amp:
                energies[rows] = scorer.model(**scorer.pad([list(distinct[i]) for i in rows])).double().cpu().numpy()
        out[:] = energies[which]
    finally:
        scorer.model.train(was_training)
    return out


def score_energies(
    energy_dir,
    tokenizer_dir,
    windows: np.ndarray,
    *,
    shard_sequences: int,
    batch_size: int,
    precision: str,
    num_workers: int,
    cpus_per_worker: int = 1,
    gpus_per_worker: float = 0,
    device: str = "cpu",
    on_progress: Callable[[int], None] | None = None,
    stats: PoolStats | None = None,
) -> np.ndarray:
    """E of every row of `windows` [N, T], sharded over `num_workers` actors (0: this process).

    Ray must already be initialised when num_workers > 0 (see `pipeline.sampling.actor_pool.ray_session`).
    `device`: the in-process worker's device, or "cuda" for GPU actors (`precision.pool_device`).
    """
    windows = np.ascontiguousarray(windows, dtype=np.int64)
    local = num_workers == 0
    energy_source = ship(energy_dir, local)
    tokenizer_source = ship(tokenizer_dir, local, require_config=False)
    threads = torch.get_num_threads() if local else cpus_per_worker
    out = np.full(len(windows), np.nan)
    tasks = [
        Task(start, "score", (windows[start : start + shard_sequences],), start)
        for start in range(0, len(windows), shard_sequences)
    ]
    if not tasks:
        return out
    saved_threads = torch.get_num_threads()
    pool = make_pool(EnergyWorker, (energy_source, tokenizer_source, threads, precision, batch_size, device),
                     num_workers, cpus_per_worker, name=f"energies of {energy_dir}", gpus_per_worker=gpus_per_worker)
    if stats is not None:
        stats.workers = pool.info

    def done(task: Task, energies: np.ndarray) -> None:
        out[task.payload : task.payload + len(energies)] = energies
        if on_progress is not None:
            on_progress(len(energies))

    try:
        pool.run(tasks, done, stats or PoolStats())
    finally:
        pool.shutdown()
        torch.set_num_threads(saved_threads)
    if np.isnan(out).any():
        raise RuntimeError(f"energies of {energy_dir}: {int(np.isnan(out).sum())} sequences were not scored")
    return out
