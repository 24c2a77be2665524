"""Algorithm 1 end to end: on the test prefixes (stage `generate`) or on one user's prompt.

For each prefix the base LM draws n_gen top-k samples (Ray actors), the energy scores them and
the real continuation, and one sample is resampled with probability softmax(−E)
(`pipeline.generation.resample`). `GenerationWork` streams: a worker draws, scores and picks
for one shard of prefixes and returns only the picks' tokens, each finished shard kept in a
checkpoint keyed by everything it depends on, so an interrupted stage resumes;
`write_analyses` turns the generations into the sample analyses of §4.3.
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import GenerateConfig, NegativesConfig
from pipeline.core.errors import RebmError
from pipeline.core.io import ArrayCheckpoint, fingerprint, write_text, write_tsv
from pipeline.core.paths import DatasetPaths
from pipeline.core.seeds import generation_seed, text_key
from pipeline.core.variants import DISPLAY_NAMES
from pipeline.estimation.evaluation import evenly_spaced
from pipeline.sampling.negatives import model_digest


@dataclass
class GenerationWork:
    """The test prefixes of one dataset and the checkpointed parts of Algorithm 1 on them."""

    window_ids: np.ndarray
    windows: np.ndarray  # (W, T) int64: prefix and real continuation
    prefix_len: int
    cfg: GenerateConfig  # precision already resolved (fp32 | bf16)
    neg: NegativesConfig
    seed: int
    checkpoint: ArrayCheckpoint
    device: Any = "cpu"  # where the pools' samples and energies run (`precision.pool_device`)
    progress: bool = True
    wall: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_test_split(cls, windows_file: Path, cfg: GenerateConfig, **kwargs: Any) -> GenerationWork:
        from pipeline.data.tokenization import WindowReader

        reader = WindowReader(windows_file)  # only the windows generated from are read
        rows = evenly_spaced(cfg.windows, reader.rows) if cfg.windows else np.arange(reader.rows)
        ids, windows = reader.take(rows)
        return cls(ids, np.ascontiguousarray(windows, dtype=np.int64), cfg=cfg, **kwargs)

    def _timed(self, name: str, started: float) -> None:
        self.wall[name] = time.perf_counter() - started

    def gold_logprobs(self, lm_dir: Path, device: Any) -> np.ndarray:
        """log P_LM of each real continuation."""
        from pipeline.estimation.perplexity import continuation_logprobs
        from pipeline.models.lm import load_lm

        t0 = time.perf_counter()
        lp = continuation_logprobs(load_lm(lm_dir, device), self.windows, self.prefix_len, self.cfg.batch_size,
                                   device).sum(axis=1)
        self._timed("gold_logprobs", t0)
        return lp

    @property
    def sample_dtype(self) -> str:
        import torch

        from pipeline.core.precision import resolve_dtype

        return resolve_dtype(self.neg.dtype, torch.device(self.device))

    @property
    def pool(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"num_workers": cfg.num_workers, "cpus_per_worker": cfg.cpus_per_worker,
                "gpus_per_worker": cfg.gpus_per_worker, "device": str(self.device)}

    def samples_key(self, lm_dir: Path) -> str:
        cfg, neg = self.cfg, self.neg
        return fingerprint(self.seed, self.prefix_len, self.windows.shape[1], self.window_ids, self.windows, cfg.n_gen,
                           cfg.top_k, cfg.shard_windows, neg.batch_samples, self.sample_dtype, model_digest(lm_dir))

    def sample_energies(self, lm_dir: Path, energy_dir: Path, lm_tokenizer_dir: Path, desc: str) -> dict:
        """Algorithm 1's draws, streamed shard by shard (Ray must be up if num_workers > 0).

        A worker draws `n_gen` top-k samples for each prefix of a shard, scores them, picks the
        base, joint and worst sample, and returns the energies and LM log-probs of all n and the
        tokens of the three picks only; each finished shard is a checkpoint part. Memory holds
        W x n floats, never the W x n x L sample tokens.
        """
        from tqdm import tqdm

        from pipeline.sampling.actor_pool import PoolStats, Task, make_pool, ship

        cfg, p, (W, T), n = self.cfg, self.prefix_len, self.windows.shape, self.cfg.n_gen
        t0 = time.perf_counter()
        key = fingerprint(self.samples_key(lm_dir), model_digest(energy_dir), cfg.precision, cfg.batch_size)
        out = {"energies": np.empty((W, n)), "logprob": np.empty((W, n)),
               **{f"{s}_ids": np.empty((W, T - p), np.int64) for s in PICKS}}
        todo = []
        for start in range(0, W, cfg.shard_windows):
            stop = min(start + cfg.shard_windows, W)
            part = self.checkpoint.load(f"shard_{start}", key)
            if part is None:
                todo.append(Task(start, "sample_select", (self.window_ids[start:stop],
                                 np.ascontiguousarray(self.windows[start:stop, :p]), n, T - p,
                                 generation_seed(self.seed), self.seed), stop))
            else:
                for name, array in part.items():
                    out[name][start:stop] = array
        if todo:
            local = cfg.num_workers == 0
            args = (ship(lm_dir, local), ship(energy_dir, local), ship(lm_tokenizer_dir, local, require_config=False),
                    cfg.cpus_per_worker, cfg.top_k, self.neg.batch_samples, self.sample_dtype, cfg.precision,
                    cfg.batch_size, self.pool["device"])
            pool = make_pool(GenerateWorker, args, cfg.num_workers, cfg.cpus_per_worker, name=desc,
                             gpus_per_worker=cfg.gpus_per_worker)
            bar = tqdm(total=sum(t.payload - t.key for t in todo) * n, unit="sample", desc=desc,
                       disable=not self.progress)

            def done(task: Task, result: dict) -> None:
                for name, array in result.items():
                    out[name][task.key : task.payload] = array
                self.checkpoint.save(f"shard_{task.key}", key, **result)
                bar.update((task.payload - task.key) * n)

            try:
                pool.run(todo, done, PoolStats())
            finally:
                bar.close()
                pool.shutdown()
        self._timed("samples_energies", t0)
        return out

    def gold_energies(self, energy_dir: Path, lm_tokenizer_dir: Path) -> np.ndarray:
        """E of every real window."""
        from pipeline.estimation.scoring import score_energies

        cfg, t0 = self.cfg, time.perf_counter()
        energies = score_energies(energy_dir, lm_tokenizer_dir, self.windows, shard_sequences=cfg.shard_sequences,
                                  batch_size=cfg.batch_size, precision=cfg.precision, **self.pool)
        self._timed("gold_energies", t0)
        return energies

    def generations(self, gold_lp: np.ndarray, gold_energies: np.ndarray, drawn: dict, lm_tokenizer_dir: Path):
        """The generations table: gold, base, joint and worst continuation of every prefix."""
        from transformers import AutoTokenizer

        from pipeline.generation.resample import generations_table, select_generations

        lm_tokenizer = AutoTokenizer.from_pretrained(lm_tokenizer_dir)
        p = self.prefix_len
        # per window, the same picks the workers made: they depend on that window's energies alone
        selection = select_generations(drawn["energies"], self.window_ids, self.seed)
        return generations_table(
            self.window_ids, self.windows[:, :p], self.windows[:, p:], gold_energies, gold_lp,
            {s: drawn[f"{s}_ids"] for s in PICKS}, drawn["energies"], drawn["logprob"], selection,
            decode=lambda ids: lm_tokenizer.decode(list(ids)),
        )


PICKS = ("base", "joint", "worst")


class GenerateWorker:
    """A pool worker holding the base LM (top-k sampler) and the energy: `sample_select` is
    Algorithm 1 on a shard of prefixes, returning the picks' tokens and everyone's numbers."""

    def __init__(self, lm_source, energy_source, tokenizer_source, threads: int, top_k: int, batch_samples: int,
                 dtype: str, precision: str, batch_size: int, device: str = "cpu"):
        from pipeline.estimation.scoring import EnergyWorker
        from pipeline.sampling.negatives import SamplerWorker

        self.lm = SamplerWorker(lm_source, threads, top_k, batch_samples, dtype, device)
        self.energy = EnergyWorker(energy_source, tokenizer_source, threads, precision, batch_size, device)

    def ready(self) -> dict:
        return self.lm.ready()

    def sample_select(self, window_ids: np.ndarray, prefixes: np.ndarray, n: int, new_tokens: int, sample_seed: int,
                      select_seed: int) -> dict[str, np.ndarray]:
        from pipeline.estimation.evaluation import completed_windows
        from pipeline.generation.resample import select_generations

        drawn = self.lm.sample(window_ids, prefixes, n, new_tokens, sample_seed)
        tokens = drawn["tokens"].astype(np.int64)
        W = len(prefixes)
        full = completed_windows(prefixes, prefixes.shape[1], tokens).reshape(W * n, -1)
        energies = self.energy.score(full).reshape(W, n)
        selection = select_generations(energies, window_ids, select_seed)
        rows = np.arange(W)
        return {"energies": energies, "logprob": drawn["logprob"],
                **{f"{s}_ids": tokens[rows, getattr(selection, f"{s}_index")] for s in PICKS}}


def write_analyses(paths: DatasetPaths, table, cfg: GenerateConfig, dataset: str, documents: np.ndarray,
                   seed: int) -> dict:
    """§4.3 on the generations: unique n-grams (Figure 2 right), log-likelihood densities
    (Figure 3) with paired intervals over the prefixes' `documents`, a few examples; returns the
    metrics they summarise to."""
    from pipeline.generation.sample_analysis import (
        density_summary,
        loglik_by_source,
        paired_sample_checks,
        sample_metrics,
        unique_ngram_rows,
    )

    out = paths.generation_results
    out.mkdir(parents=True, exist_ok=True)
    ids = {s: table.column(f"{c}_ids").to_pylist() for s, c in (("real", "gold"), ("base", "base"), ("joint", "joint"))}
    write_tsv(out / "unique_ngrams.tsv", unique_ngram_rows(ids))
    for scorer in ("base_lm", "joint"):
        write_tsv(out / f"density_{scorer}.tsv",
                  density_summary(loglik_by_source(table, scorer), cfg.density_bins).rows)
    write_text(out / "examples.md", examples_markdown(dataset, table, cfg))
    return {
        "dataset": dataset,
        "energy": cfg.energy,
        "n_gen": cfg.n_gen,
        "top_k": cfg.top_k,
        **sample_metrics(table),
        "paired": paired_sample_checks(table, documents, cfg.bootstrap.level, cfg.bootstrap.resamples, seed),
    }


def examples_markdown(dataset: str, table, cfg: GenerateConfig, count: int = 3) -> str:
    """A few prefixes with their gold, base-LM, joint and worst continuations (paper Tables 5–6)."""
    joint_name = DISPLAY_NAMES[cfg.energy]
    lines = [f"### Example generations — {dataset} ({joint_name}, {cfg.n_gen} top-{cfg.top_k} samples per prefix)", ""]
    data = table.to_pydict()
    for i in evenly_spaced(count, table.num_rows):
        lines += [f"**Prefix** (window {data['window_id'][i]}): …{data['prefix_text'][i][-400:]}", "",
                  "| model | continuation | energy | LM log-prob |", "|---|---|---|---|"]
        for key, name in (("gold", "Gold"), ("base", "BASE LM"), ("joint", joint_name), ("worst", "worst LM sample")):
            text = data[f"{key}_text"][i].replace("|", "\\|").replace("\n", " ⏎ ")
            lines.append(f"| {name} | {text} | {data[f'{key}_energy'][i]:.3f} | {data[f'{key}_lm_logprob'][i]:.2f} |")
        lines.append("")
    return "\n".join(lines)


def generate_for_prompt(prompt: str, lm_dir: Path, energy_dir: Path, lm_tokenizer_dir: Path, cfg: GenerateConfig,
                        prefix_len: int, seq_len: int, n_gen: int, seed: int, device: Any) -> dict:
    """Algorithm 1 for a user's text, in this process: the base-LM sample and the joint sample."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.estimation.scoring import score_windows
    from pipeline.generation.resample import select_generations
    from pipeline.models.energy import EnergyScorer, load_energy
    from pipeline.models.lm import load_lm
    from pipeline.sampling.sampler import Sampler

    if not prompt.strip():
        raise RebmError("--prompt: the prompt is empty")
    n = n_gen
    lm_tokenizer = AutoTokenizer.from_pretrained(lm_tokenizer_dir)
    prefix = lm_tokenizer(prompt)["input_ids"][-prefix_len:]  # the models were trained on p-token prefixes
    window_id = text_key(prompt)  # seeds this prompt's draws
    lm = load_lm(lm_dir, device)
    out = Sampler(lm, top_k=cfg.top_k).sample(np.array([prefix]), np.array([window_id]), n, seq_len - prefix_len,
                                              generation_seed(seed))
    model, body_tokenizer = load_energy(energy_dir)
    scorer = EnergyScorer(model.to(device).eval(), body_tokenizer, lm_tokenizer)
    full = np.concatenate([np.repeat(np.array([prefix]), n, 0), out.tokens[0].astype(np.int64)], axis=1)
    with torch.no_grad():
        energies = score_windows(scorer, full, cfg.batch_size, cfg.precision)
    selection = select_generations(energies[None], np.array([window_id]), seed)
    pick = {"base": int(selection.base_index[0]), "joint": int(selection.joint_index[0])}
    return {
        "prompt_tokens_used": len(prefix),
        "samples": n,
        "energy": cfg.energy,
        "ess": float(selection.ess[0]),
        **{f"{k}_text": lm_tokenizer.decode(out.tokens[0, i].tolist()) for k, i in pick.items()},
        **{f"{k}_energy": float(energies[i]) for k, i in pick.items()},
        **{f"{k}_lm_logprob": float(out.logprob[0, i]) for k, i in pick.items()},
    }


def side_by_side(result: dict, width: int = 48) -> str:
    """The base-LM and joint continuations in two columns, for the terminal."""
    left = textwrap.wrap(result["base_text"], width) or [""]
    right = textwrap.wrap(result["joint_text"], width) or [""]
    rows = max(len(left), len(right))
    left += [""] * (rows - len(left))
    right += [""] * (rows - len(right))
    base_scores = f"E = {result['base_energy']:.3f}, log P_LM = {result['base_lm_logprob']:.2f}"
    header = [
        f"{'BASE LM (top-k sample)':<{width}} | JOINT ({result['energy']}, resampled from {result['samples']}, "
        f"ESS {result['ess']:.1f})",
        f"{base_scores:<{width}} | "
        f"E = {result['joint_energy']:.3f}, log P_LM = {result['joint_lm_logprob']:.2f}",
        "-" * width + "-+-" + "-" * width,
    ]
    return "\n".join(header + [f"{a:<{width}} | {b}" for a, b in zip(left, right, strict=True)])
