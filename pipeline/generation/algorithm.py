"""Algorithm 1 end to end: on the test prefixes (stage `generate`) or on one user's prompt.

For each prefix the base LM draws n_gen top-k samples (Ray actors), the energy scores them and
the real continuation, and one sample is resampled with probability softmax(−E)
(`pipeline.generation.resample`). `GenerationWork` keeps each finished part (samples,
energies) in a checkpoint keyed by everything it depends on, so an interrupted stage resumes;
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
from pipeline.sampling.negatives import SampleJob, model_digest, run_sample_jobs


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
        from pipeline.data.tokenization import read_windows

        all_ids, all_windows = read_windows(windows_file)
        rows = evenly_spaced(cfg.windows, len(all_ids)) if cfg.windows else np.arange(len(all_ids))
        return cls(all_ids[rows], np.ascontiguousarray(all_windows[rows], dtype=np.int64), cfg=cfg, **kwargs)

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
        from pipeline.core.precision import resolve_dtype

        return resolve_dtype(self.neg.dtype, torch_device(self.device))

    @property
    def pool(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"num_workers": cfg.num_workers, "cpus_per_worker": cfg.cpus_per_worker,
                "gpus_per_worker": cfg.gpus_per_worker, "device": str(self.device)}

    def samples_key(self, lm_dir: Path) -> str:
        cfg, neg = self.cfg, self.neg
        return fingerprint(self.seed, self.prefix_len, self.windows.shape[1], self.window_ids, self.windows, cfg.n_gen,
                           cfg.top_k, cfg.shard_windows, neg.batch_samples, self.sample_dtype, model_digest(lm_dir))

    def samples(self, lm_dir: Path, desc: str) -> dict[str, np.ndarray]:
        """n_gen top-k LM continuations per prefix and their log-probs (Ray must be up if num_workers > 0)."""
        cfg, p, (W, T), n = self.cfg, self.prefix_len, self.windows.shape, self.cfg.n_gen
        t0, key = time.perf_counter(), self.samples_key(lm_dir)
        samples = self.checkpoint.load("samples", key)
        if samples is None:
            samples = {"tokens": np.empty((W, n, T - p), np.int64), "logprob": np.empty((W, n))}
            jobs = [
                SampleJob(start, self.window_ids[start : start + cfg.shard_windows],
                          np.ascontiguousarray(self.windows[start : start + cfg.shard_windows, :p]), n, T - p,
                          generation_seed(self.seed))
                for start in range(0, W, cfg.shard_windows)
            ]

            def done(job: SampleJob, result: dict) -> None:
                samples["tokens"][job.key : job.key + len(job.window_ids)] = result["tokens"]
                samples["logprob"][job.key : job.key + len(job.window_ids)] = result["logprob"]

            run_sample_jobs(lm_dir, jobs, done, top_k=cfg.top_k, batch_samples=self.neg.batch_samples,
                            dtype=self.sample_dtype, desc=desc, progress=self.progress, **self.pool)
            self.checkpoint.save("samples", key, **samples)
        self._timed("sampling", t0)
        return samples

    def energies(self, energy_dir: Path, lm_tokenizer_dir: Path, lm_dir: Path, samples: dict[str, np.ndarray],
                 desc: str) -> dict[str, np.ndarray]:
        """E of every real window ("gold") and of every sample ("samples", W x n)."""
        from tqdm import tqdm

        from pipeline.estimation.scoring import score_energies

        cfg, p, (W, T), n = self.cfg, self.prefix_len, self.windows.shape, self.cfg.n_gen
        t0 = time.perf_counter()
        key = fingerprint(self.samples_key(lm_dir), model_digest(energy_dir), cfg.precision, cfg.batch_size,
                          cfg.shard_sequences)
        energies = self.checkpoint.load("energies", key)
        if energies is None:
            sample_windows = np.concatenate(
                [np.broadcast_to(self.windows[:, None, :p], (W, n, p)), samples["tokens"]], axis=-1
            ).reshape(W * n, T)
            with tqdm(total=W * (n + 1), unit="seq", desc=desc, disable=not self.progress) as bar:
                e = score_energies(
                    energy_dir, lm_tokenizer_dir, np.concatenate([self.windows, sample_windows]),
                    shard_sequences=cfg.shard_sequences, batch_size=cfg.batch_size, precision=cfg.precision,
                    on_progress=bar.update, **self.pool,
                )
            energies = {"gold": e[:W], "samples": e[W:].reshape(W, n)}
            self.checkpoint.save("energies", key, **energies)
        self._timed("energies", t0)
        return energies

    def generations(self, gold_lp: np.ndarray, samples: dict[str, np.ndarray], energies: dict[str, np.ndarray],
                    lm_tokenizer_dir: Path):
        """The generations table: gold, base, joint and worst continuation of every prefix."""
        from transformers import AutoTokenizer

        from pipeline.generation.resample import generations_table, select_generations

        lm_tokenizer = AutoTokenizer.from_pretrained(lm_tokenizer_dir)
        p = self.prefix_len
        selection = select_generations(energies["samples"], self.window_ids, self.seed)
        return generations_table(
            self.window_ids, self.windows[:, :p], self.windows[:, p:], energies["gold"], gold_lp,
            samples["tokens"], energies["samples"], samples["logprob"], selection,
            decode=lambda ids: lm_tokenizer.decode(list(ids)),
        )


def torch_device(device: Any):
    import torch

    return device if isinstance(device, torch.device) else torch.device(device)


def write_analyses(paths: DatasetPaths, table, cfg: GenerateConfig, dataset: str) -> dict:
    """§4.3 on the generations: unique n-grams (Figure 2 right), log-likelihood densities
    (Figure 3), a few examples; returns the metrics they summarise to."""
    from pipeline.generation.sample_analysis import density_summary, loglik_by_source, sample_metrics, unique_ngram_rows

    out = paths.generation_results
    out.mkdir(parents=True, exist_ok=True)
    ids = {s: table.column(f"{c}_ids").to_pylist() for s, c in (("real", "gold"), ("base", "base"), ("joint", "joint"))}
    write_tsv(out / "unique_ngrams.tsv", unique_ngram_rows(ids))
    for scorer in ("base_lm", "joint"):
        write_tsv(out / f"density_{scorer}.tsv", density_summary(loglik_by_source(table, scorer), cfg.density_bins).rows)
    write_text(out / "examples.md", examples_markdown(dataset, table, cfg))
    return {
        "dataset": dataset,
        "energy": cfg.energy,
        "n_gen": cfg.n_gen,
        "top_k": cfg.top_k,
        **sample_metrics(table),
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
    header = [
        f"{'BASE LM (top-k sample)':<{width}} | JOINT ({result['energy']}, resampled from {result['samples']}, "
        f"ESS {result['ess']:.1f})",
        f"{'E = %.3f, log P_LM = %.2f' % (result['base_energy'], result['base_lm_logprob']):<{width}} | "
        f"E = {result['joint_energy']:.3f}, log P_LM = {result['joint_lm_logprob']:.2f}",
        "-" * width + "-+-" + "-" * width,
    ]
    return "\n".join(header + [f"{a:<{width}} | {b}" for a, b in zip(left, right)])
