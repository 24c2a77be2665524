"""The evaluate stage's heavy parts, each checkpointed: LM log-probs, the energies of the LM
samples (streamed), the energies of the real windows and of the last-position candidates.

Every part is saved in the stage's `ArrayCheckpoint` under a fingerprint of what it depends on
(the windows, the models' bytes, the settings that change its numbers), so a killed run
resumes at the first missing part and a changed input recomputes only what it touches.

The LM samples are streamed: the estimators need only the energy of each sample, never its
tokens, so samples are drawn, scored and dropped in chunks. A chunk is one range of
`evaluate.stream_samples` sample indices of every test prefix (log Z) or of every Figure 1
(window, start) prefix; it has one job per prefix. Every missing chunk's jobs run on ONE pool
(opened once, fed chunk after chunk, shut down at the end) of `SampleEnergyWorker`s, each holding
the base LM and every energy: a worker draws its job's samples in forward batches of
`negatives.batch_samples`, scores each batch with every energy whose n_eval covers it and
returns only the energies. A chunk becomes one checkpoint part when its last job is in. Memory
thus holds the per-prefix energies ([N, n_eval[e]] float64 per energy, [W, L, s] per Figure 1
energy) and one forward batch of tokens per worker, whatever n. Sample k of a prefix is drawn
with the uniforms of index k (`first_sample`), so chunking does not change the draws; only a
forward batch of another size could change the last bits of the LM's numerics.
`pipeline.estimation.evaluation_summary.summarise` turns the arrays into Table 1 and the figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.config import EvaluateConfig, NegativesConfig
from pipeline.core.io import ArrayCheckpoint, fingerprint
from pipeline.core.precision import pool_device, resolve_dtype
from pipeline.core.seeds import position_seed
from pipeline.estimation.diagnostics import futile_draw, look_points
from pipeline.estimation.evaluation import completed_windows, last_position_candidates
from pipeline.sampling.negatives import SampleJob, model_digest


class SampleEnergyWorker:
    """A pool worker holding the base LM (a `SamplerWorker`) and energies (`EnergyWorker`s):
    `sample_energies` draws one job's LM samples and returns only their energies."""

    def __init__(self, lm_source: str | list, energy_sources: dict[str, str | list], tokenizer_source: str | list,
                 threads: int, batch_samples: int, dtype: str, precision: str, batch_size: int, device: str = "cpu"):
        from pipeline.estimation.scoring import EnergyWorker
        from pipeline.sampling.negatives import SamplerWorker

        self.lm = SamplerWorker(lm_source, threads, 0, batch_samples, dtype, device)  # top_k 0: the full distribution
        self.energies = {v: EnergyWorker(source, tokenizer_source, threads, precision, batch_size, device)
                         for v, source in energy_sources.items()}
        self.batch_samples = max(1, batch_samples)

    def ready(self) -> dict:
        return {**self.lm.ready(), "energies": sorted(self.energies)}

    def sample_energies(self, window_ids: np.ndarray, prefixes: np.ndarray, n: int, new_tokens: int, seed: int,
                        first_sample: int, counts: dict[str, int]) -> dict[str, np.ndarray]:
        """E of [prefix | sample] for samples first_sample … first_sample + n − 1 of each prefix [W, p]:
        {energy: [W, counts[energy]]}, each energy scoring the first counts[energy] of them."""
        W = len(prefixes)
        out = {v: np.empty((W, c)) for v, c in counts.items()}
        for a in range(0, n, self.batch_samples):
            m = min(self.batch_samples, n - a)
            tokens = self.lm.sample(window_ids, prefixes, m, new_tokens, seed, first_sample + a)["tokens"]
            full = completed_windows(prefixes, prefixes.shape[1], tokens.astype(np.int64))  # [W, m, T]
            for v, c in counts.items():
                k = min(c - a, m)
                if k > 0:
                    out[v][:, a : a + k] = self.energies[v].score(full[:, :k].reshape(W * k, -1)).reshape(W, k)
        return out


@dataclass
class _Chunk:
    """One checkpoint part of the streamed samples: sample indices k0 … k0 + n − 1 of every job's prefix."""

    name: str
    key: str
    k0: int
    jobs: list[SampleJob]  # key: the index of the job's row in each out array
    counts: dict[str, int]  # energy -> how many of the chunk's samples it scores (the first ones)
    out: dict[str, np.ndarray]  # energy -> the stage's array [..., n]; the chunk fills [..., k0 : k0 + count]

    def arrays(self) -> dict[str, np.ndarray]:
        return {v: self.out[v][..., self.k0 : self.k0 + c] for v, c in self.counts.items()}


class _LazyPool:
    """The SampleEnergyWorker pool, opened on the first chunk that must be drawn (a run resumed from
    a complete checkpoint opens none) and shut down once at the end."""

    def __init__(self, work: EvaluationWork, model_dir: Path, energy_dirs: dict[str, Path]):
        self.work, self.model_dir, self.energy_dirs = work, model_dir, energy_dirs
        self.pool = None
        self.saved_threads = torch.get_num_threads()

    def get(self):
        from pipeline.sampling.actor_pool import make_pool, ship

        if self.pool is None:
            w = self.work
            local = w.pool["num_workers"] == 0
            self.pool = make_pool(
                SampleEnergyWorker,
                (ship(self.model_dir, local), {v: ship(d, local) for v, d in self.energy_dirs.items()},
                 ship(w.tokenizer_dir, local, require_config=False),
                 torch.get_num_threads() if local else w.pool["cpus_per_worker"], w.neg.batch_samples,
                 w.sample_dtype, w.cfg.precision, w.cfg.batch_size, w.pool["device"]),
                w.pool["num_workers"], w.pool["cpus_per_worker"], name="evaluate: LM samples and energies",
                gpus_per_worker=w.pool["gpus_per_worker"])
        return self.pool

    def __enter__(self) -> _LazyPool:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.pool is not None:
                self.pool.shutdown()
        finally:
            torch.set_num_threads(self.saved_threads)


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

    # -- LM samples, streamed into their energies ----------------------------------------------
    def sample_energies(self, model_dir: Path, energy_dirs: dict[str, Path], seed: int,
                        position_rows: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Energies of the LM samples, per energy: "samples" [N, n], of the log Z samples of every
        test prefix (seeded by `seed`), and, for a Figure 1 energy, "positions" [W, L, s], of the
        completions of x_<start for start = p … T−1 on `position_rows` (Eq. 5's x').

        n is n_eval[e], or less where the draw stopped at a look (`evaluate.convergence.stop_khat`:
        the weights' tail showed that no affordable n gives a reliable log Z). Streamed in chunks
        of `stream_samples` per prefix, cut at the looks too (module docstring); finished chunks
        are loaded from the checkpoint and only the missing ones are drawn, so a resumed run
        stops where the first one did.
        """
        started = time.perf_counter()
        cfg, (N, T), p = self.cfg, self.windows.shape, self.p
        step = cfg.stream_samples
        lm_key = self._model_key(model_dir)
        energy_keys = {v: self._model_key(d) for v, d in energy_dirs.items()}
        # What a chunk's numbers depend on besides its models and sample range (see SampleEnergyWorker).
        settings = [self.neg.batch_samples, self.sample_dtype, cfg.precision, cfg.batch_size]
        prefixes: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (id, prefix), shared by their jobs

        def job(index: tuple, row: int, start: int, n: int, job_seed: int, k0: int) -> SampleJob:
            if (row, start) not in prefixes:
                prefixes[row, start] = (self.window_ids[[row]],
                                        np.ascontiguousarray(self.windows[[row], :start], dtype=np.int64))
            return SampleJob(index, *prefixes[row, start], n, T - start, job_seed, k0)

        out = {v: {"samples": np.empty((N, cfg.n_eval[v]))} for v in energy_dirs}
        figure1 = [v for v in cfg.positions.energies if v in energy_dirs] if len(position_rows) else []
        s = cfg.positions.samples
        for v in figure1:
            out[v]["positions"] = np.empty((len(position_rows), T - p, s))
        position_chunks = []
        for k0 in range(0, s if figure1 else 0, step):
            k1 = min(k0 + step, s)
            key = fingerprint(self.data_key, lm_key, position_rows, k0, k1, settings,
                              [[v, energy_keys[v]] for v in figure1])
            jobs = [job((j, i), row, start, k1 - k0, position_seed(self.seed, start), k0)
                    for i, start in enumerate(range(p, T)) for j, row in enumerate(position_rows)]
            position_chunks.append(_Chunk(f"position_samples_{k0}-{k1}", key, k0, jobs,
                                          dict.fromkeys(figure1, k1 - k0), {v: out[v]["positions"] for v in figure1}))

        # n_eval is a cap: at each look an energy whose draw is futile (diagnostics.futile_draw)
        # stops, and later chunks draw only for the energies still active.
        stop = cfg.convergence
        looks = {v: set(look_points(stop.stop_after, cfg.n_eval[v])) if stop.stop_khat is not None else set()
                 for v in energy_dirs}
        n_max = max((cfg.n_eval[v] for v in energy_dirs), default=0)
        cuts = sorted({*range(0, n_max, step), *set().union(*looks.values()), n_max}) if n_max else [0]
        drawn = dict.fromkeys(energy_dirs, 0)
        active = set(energy_dirs)
        with _LazyPool(self, model_dir, energy_dirs) as pool:
            pending = position_chunks  # Figure 1's chunks ride along with the first log Z chunk
            for k0, k1 in zip(cuts[:-1], cuts[1:], strict=False):
                counts = {v: min(k1, cfg.n_eval[v]) - k0 for v in energy_dirs if v in active and cfg.n_eval[v] > k0}
                if not counts:
                    break
                key = fingerprint(self.data_key, lm_key, seed, k0, k1, settings,
                                  [[v, energy_keys[v], c] for v, c in counts.items()])
                chunk = _Chunk(f"log_z_samples_{k0}-{k1}", key, k0,
                               [job((j,), j, p, k1 - k0, seed, k0) for j in range(N)],
                               counts, {v: out[v]["samples"] for v in counts})
                self._load_or_draw([chunk, *pending], pool)
                pending = []
                for v, c in counts.items():
                    drawn[v] = k0 + c
                    if drawn[v] in looks[v] and futile_draw(-out[v]["samples"][:, : drawn[v]], stop.stop_khat):
                        active.discard(v)
            self._load_or_draw(pending, pool)
        for v in energy_dirs:
            out[v]["samples"] = out[v]["samples"][:, : drawn[v]]
        self.wall["sample_energies"] = time.perf_counter() - started
        return out

    def _load_or_draw(self, chunks: list[_Chunk], pool: _LazyPool) -> None:
        """Fill each chunk's arrays from the checkpoint, or draw and score the missing ones."""
        missing = []
        for chunk in chunks:
            self.part_keys[chunk.name] = chunk.key
            arrays = self.checkpoint.load(chunk.name, chunk.key)
            if arrays is None or set(arrays) != set(chunk.counts):
                missing.append(chunk)
                continue
            for v, a in arrays.items():
                chunk.out[v][..., chunk.k0 : chunk.k0 + a.shape[-1]] = a
        if missing:
            self._sample(pool.get(), missing)

    def _sample(self, pool, chunks: list[_Chunk]) -> None:
        """Draw and score every job of `chunks` on the pool of SampleEnergyWorkers; each chunk is
        saved to the checkpoint as its last job lands.

        One job per (prefix, chunk), so actors share the work of a few windows; each sample's
        randomness is a hash of (seed, window_id, sample index, step), so the grouping does not
        change the draws.
        """
        from pipeline.sampling.actor_pool import PoolStats, Task

        tasks = [Task((c, *job.key), "sample_energies", (job.window_ids, job.prefixes, job.n, job.new_tokens,
                                                          job.seed, job.first_sample, chunk.counts), (chunk, job))
                 for c, chunk in enumerate(chunks) for job in chunk.jobs]
        left = [len(chunk.jobs) for chunk in chunks]
        bar = tqdm(total=sum(len(chunk.jobs) * chunk.jobs[0].n for chunk in chunks if chunk.jobs), unit="sample",
                   desc="LM samples -> energies", disable=not self.progress)

        def done(task: Task, result: dict[str, np.ndarray]) -> None:
            chunk, job = task.payload
            for v, energies in result.items():
                chunk.out[v][job.key][chunk.k0 : chunk.k0 + energies.shape[1]] = energies[0]
            bar.update(job.n)
            left[task.key[0]] -= 1
            if left[task.key[0]] == 0:
                self.checkpoint.save(chunk.name, chunk.key, **chunk.arrays())

        try:
            pool.run(tasks, done, PoolStats())
        finally:
            bar.close()

    # -- energies ----------------------------------------------------------------------------
    def energies(self, variant: str, energy_dir: Path, streamed: dict[str, np.ndarray], exact_rows: np.ndarray,
                 last_lm: np.ndarray | None, dataset: str) -> dict[str, np.ndarray]:
        """Energies of the real windows and, for a Figure 1 energy, of the |V| last-position candidates,
        with the streamed energies of the LM samples (`sample_energies`) alongside.

        The candidates are scored in fp32 whatever `precision` says: the exact last position is
        the estimator's check, and bf16 energies move with the batch they land in (up to 0.02
        on a real window) by more than the gap the check looks for. The real last token is one of
        the candidates, so the exact value's numerator and denominator come from that one pass."""
        from pipeline.estimation.scoring import score_energies

        cfg = self.cfg
        key = fingerprint(self.data_key, self._model_key(energy_dir), cfg.precision, cfg.batch_size,
                          cfg.shard_sequences)

        def scored(block: np.ndarray, precision: str, what: str) -> np.ndarray:
            with tqdm(total=len(block), unit="seq", desc=f"{what} {dataset}/{variant}",
                      disable=not self.progress) as bar:
                return score_energies(
                    energy_dir, self.tokenizer_dir, block, shard_sequences=cfg.shard_sequences,
                    batch_size=cfg.batch_size, precision=precision, on_progress=bar.update, **self.pool,
                )

        out = dict(self._cached(f"energies_{variant}", key,
                                lambda: {"real": scored(self.windows, cfg.precision, "energies")}))
        if "positions" in streamed and len(exact_rows):
            vocab = last_lm.shape[-1]
            candidates = np.concatenate([last_position_candidates(w, vocab) for w in self.windows[exact_rows]])
            exact_key = fingerprint(key, "fp32", self.part_keys["last_position_lm"])
            out |= self._cached(f"last_candidates_{variant}", exact_key, lambda: {
                "last_candidates": scored(candidates, "fp32", "exact last position (fp32)").reshape(
                    len(exact_rows), -1)})
        return {**out, **streamed}
