"""The evaluate stage's heavy parts, each checkpointed: LM log-probs, LM samples, energies.

Every part is saved in the stage's `ArrayCheckpoint` under a fingerprint of what it depends on
(the windows, the models' bytes, the settings that change its numbers), so a killed run
resumes at the first missing part and a changed input recomputes only what it touches.
`pipeline.estimation.evaluation_summary.summarise` turns the arrays into Table 1 and the figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.config import EvaluateConfig, NegativesConfig
from pipeline.core.io import ArrayCheckpoint, fingerprint
from pipeline.core.precision import pool_device, resolve_dtype
from pipeline.core.seeds import position_seed
from pipeline.estimation.evaluation import completed_windows, last_position_candidates
from pipeline.sampling.negatives import model_digest


class EvaluationWork:
    """The evaluate stage's computations on N test windows [N, T] with prefix length p."""

    def __init__(self, window_ids: np.ndarray, windows: np.ndarray, prefix_len: int, tokenizer_dir: Path,
                 cfg: EvaluateConfig, neg: NegativesConfig, device: torch.device, seed: int,
                 checkpoint: ArrayCheckpoint, progress: bool = True):
        self.window_ids, self.windows, self.p = window_ids, windows, prefix_len
        self.tokenizer_dir, self.cfg, self.neg, self.device, self.seed = tokenizer_dir, cfg, neg, device, seed
        self.checkpoint, self.progress = checkpoint, progress
        self.data_key = fingerprint(seed, prefix_len, windows.shape[1], window_ids, windows)
        self.wall: dict[str, float] = {}
        self.part_keys: dict[str, str] = {}  # checkpoint part -> the key it was computed under
        self._model_keys: dict[Path, str] = {}
        # LM samples and energies run on the pool's device; cfg.precision is already resolved for it
        self.pool_device = pool_device(cfg.num_workers, cfg.gpus_per_worker, device)
        self.sample_dtype = resolve_dtype(neg.dtype, self.pool_device)
        self.pool = {"num_workers": cfg.num_workers, "cpus_per_worker": cfg.cpus_per_worker,
                     "gpus_per_worker": cfg.gpus_per_worker, "device": str(self.pool_device)}

    def _model_key(self, model_dir: Path) -> str:
        if model_dir not in self._model_keys:
            self._model_keys[model_dir] = model_digest(model_dir)
        return self._model_keys[model_dir]

    def _cached(self, name: str, key: str, compute) -> dict[str, np.ndarray]:
        self.part_keys[name] = key
        started = time.perf_counter()
        arrays = self.checkpoint.load(name, key)
        if arrays is None:
            arrays = compute()
            self.checkpoint.save(name, key, **arrays)
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - started
        return arrays

    # -- LMs ---------------------------------------------------------------------------------
    def lm_logprobs(self, variant: str, model_dir: Path) -> np.ndarray:
        """log P(x_t | x_<t) of every continuation token: [N, L] (Table 1's LM rows)."""
        from pipeline.estimation.perplexity import continuation_logprobs
        from pipeline.models.lm import load_lm

        def compute() -> dict[str, np.ndarray]:
            model = load_lm(model_dir, self.device)
            return {"logprobs": continuation_logprobs(model, self.windows, self.p, self.cfg.batch_size, self.device)}

        key = fingerprint(self.data_key, self._model_key(model_dir), self.cfg.batch_size)
        return self._cached(f"lm_{variant}", key, compute)["logprobs"]

    def last_position_lm(self, model_dir: Path, rows: np.ndarray) -> np.ndarray:
        """log P_LM(v | x_<T) for every token v on the given rows: [E, V] float64."""
        from pipeline.models.lm import load_lm

        @torch.no_grad()
        def compute() -> dict[str, np.ndarray]:
            model = load_lm(model_dir, self.device)
            ids = torch.from_numpy(np.ascontiguousarray(self.windows[rows, :-1], dtype=np.int64)).to(self.device)
            logits = model(input_ids=ids).logits[:, -1].float()
            return {"logprobs": torch.log_softmax(logits, dim=-1).double().cpu().numpy()}

        key = fingerprint(self.data_key, self._model_key(model_dir), rows)
        return self._cached("last_position_lm", key, compute)["logprobs"]

    def _sample(self, model_dir: Path, rows: np.ndarray, starts: list[int], n: int, seed_of, desc: str) -> np.ndarray:
        """n full-distribution completions of x_<start for each row and start: [len(starts), R, n, T].

        One job per (start, row), so two actors share the work of a few windows; each sample's
        randomness is a hash of (seed, window_id, sample index, step), so the grouping does not
        change the draws.
        """
        from pipeline.sampling.negatives import SampleJob, run_sample_jobs

        T = self.windows.shape[1]
        out = np.empty((len(starts), len(rows), n, T), dtype=np.int64)
        jobs = [
            SampleJob((i, j), self.window_ids[[row]], np.ascontiguousarray(self.windows[[row], :start]), n,
                      T - start, seed_of(start))
            for i, start in enumerate(starts) for j, row in enumerate(rows)
        ]

        def done(job: SampleJob, result: dict) -> None:
            i, j = job.key
            out[i, j] = completed_windows(self.windows[[rows[j]]], starts[i], result["tokens"].astype(np.int64))[0]

        run_sample_jobs(model_dir, jobs, done, top_k=0, batch_samples=self.neg.batch_samples, dtype=self.sample_dtype,
                        desc=desc, progress=self.progress, **self.pool)
        return out

    def lm_samples(self, model_dir: Path, seed: int, n: int) -> np.ndarray:
        """n LM continuations of every test prefix, as windows [N, n, T]: the log Z samples."""
        rows = np.arange(len(self.windows))
        key = fingerprint(self.data_key, self._model_key(model_dir), seed, n, self.neg.batch_samples, self.sample_dtype)
        return self._cached("log_z_samples", key, lambda: {"tokens": self._sample(
            model_dir, rows, [self.p], n, lambda _: seed, "log Z LM samples")[0]})["tokens"]

    def position_samples(self, model_dir: Path, rows: np.ndarray) -> np.ndarray:
        """For each start index p..T−1: LM completions of x_<start, as windows [W, L, s, T] (Eq. 5's x')."""
        T, s = self.windows.shape[1], self.cfg.positions.samples
        key = fingerprint(self.data_key, self._model_key(model_dir), rows, s, self.neg.batch_samples, self.sample_dtype)

        def compute() -> dict[str, np.ndarray]:
            tokens = self._sample(model_dir, rows, list(range(self.p, T)), s, lambda start: position_seed(self.seed, start),
                                  "per-position LM samples")
            return {"tokens": tokens.transpose(1, 0, 2, 3)}

        return self._cached("position_samples", key, compute)["tokens"]

    # -- energies ----------------------------------------------------------------------------
    def energies(self, variant: str, energy_dir: Path, log_z_tokens: np.ndarray, position_tokens: np.ndarray | None,
                 exact_rows: np.ndarray, last_lm: np.ndarray | None, dataset: str) -> dict[str, np.ndarray]:
        """Energies of the real windows, of their first n_eval[variant] LM samples and, for a
        Figure 1 energy, of the per-position completions and the |V| last-position candidates."""
        from pipeline.estimation.scoring import score_energies

        cfg = self.cfg
        N, T = self.windows.shape
        n = cfg.n_eval[variant]
        blocks = {"real": self.windows, "samples": log_z_tokens[:, :n].reshape(-1, T)}
        if position_tokens is not None:
            blocks["positions"] = position_tokens.reshape(-1, T)
            if len(exact_rows):
                vocab = last_lm.shape[-1]
                blocks["last_candidates"] = np.concatenate(
                    [last_position_candidates(w, vocab) for w in self.windows[exact_rows]])
        # The sampled blocks are named by the keys they were drawn under (hashing the arrays again
        # would read tens of MB per energy); the windows are in data_key.
        key = fingerprint(self.data_key, self._model_key(energy_dir), cfg.precision, cfg.batch_size,
                          cfg.shard_sequences, n, self.part_keys["log_z_samples"],
                          self.part_keys["position_samples"] if position_tokens is not None else None,
                          self.part_keys["last_position_lm"] if "last_candidates" in blocks else None)

        def compute() -> dict[str, np.ndarray]:
            everything = np.concatenate(list(blocks.values()))
            with tqdm(total=len(everything), unit="seq", desc=f"energies {dataset}/{variant}",
                      disable=not self.progress) as bar:
                scored = score_energies(
                    energy_dir, self.tokenizer_dir, everything, shard_sequences=cfg.shard_sequences,
                    batch_size=cfg.batch_size, precision=cfg.precision, on_progress=bar.update, **self.pool,
                )
            out, offset = {}, 0
            for name, block in blocks.items():
                out[name] = scored[offset : offset + len(block)]
                offset += len(block)
            out["samples"] = out["samples"].reshape(N, n)
            if "positions" in out:
                out["positions"] = out["positions"].reshape(position_tokens.shape[:3])
            if "last_candidates" in out:
                out["last_candidates"] = out["last_candidates"].reshape(len(exact_rows), -1)
            return out

        return self._cached(f"energies_{variant}", key, compute)
