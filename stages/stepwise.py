"""Stage `stepwise`: Appendix A.1 — the joint model factorised token by token (Eq. 5 over the base
LM's top K), Table 3 and the repetition claim (`pipeline.generation.stepwise`).

`run_prompt` is `rebm generate <dataset> --method stepwise --prompt …`: top-k auto-regressive
sampling (§3.3) of a user's text with the same models, in this process.

Writes data/<dataset>/stepwise/candidates.parquet (one row per context and candidate) and
results/<dataset>/stepwise/: table3.md and metrics.json (the claim with paired intervals and
verdicts, convergence counts). Resumable: each context is checkpointed as it lands.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.core.config import NegativesConfig, StepwiseConfig, TokenizeConfig, load_device, load_section, load_seed
from pipeline.core.io import ArrayCheckpoint, require_model, write_json
from pipeline.core.paths import DatasetPaths
from pipeline.core.pool_stage import load_pool_stage
from pipeline.core.precision import resolve_device, resolve_dtype
from pipeline.core.variants import stage_name
from pipeline.data.tokenization import WindowReader, window_documents
from pipeline.estimation.evaluation import evenly_spaced
from pipeline.generation.stepwise_work import (
    StepwiseRun,
    make_worker_pool,
    stepwise_prompt,
    stepwise_summary,
    worker_args,
    write_outputs,
)
from pipeline.sampling.actor_pool import ray_session_if
from pipeline.sampling.negatives import model_digest


def run(dataset: str, params: Path, root: Path = Path("."), ray_address: str | None = None,
        progress: bool = True) -> dict:
    started = time.perf_counter()
    stage = load_pool_stage(StepwiseConfig, "stepwise", params)
    cfg, tok, neg, seed = stage.cfg, stage.tok, stage.neg, stage.seed
    paths = DatasetPaths(dataset, root)
    lm_dir = require_model(paths.lm("base"), f"{stage_name('base')}@{dataset}")
    energy_dir = require_model(paths.energy(cfg.energy), f"{stage_name(cfg.energy)}@{dataset}")
    dtype = resolve_dtype(neg.dtype, stage.work_device)

    reader = WindowReader(paths.windows_split("test"))  # only the windows used are read
    ids, windows = reader.take(evenly_spaced(cfg.windows, reader.rows))
    work = StepwiseRun(ids, windows, window_documents(paths.windows_split("test"), ids), tok.prefix_len, cfg, seed,
                       ArrayCheckpoint(paths.stepwise_checkpoint), progress)
    contexts = work.contexts(work.sampled_windows(lm_dir, stage.device, dtype))
    models_key = "/".join((model_digest(lm_dir), model_digest(energy_dir), str(seed), dtype, cfg.precision))
    args = worker_args(lm_dir, energy_dir, paths.tokenizer, cfg, neg, dtype, str(stage.work_device))
    with ray_session_if(cfg.num_workers > 0 and bool(contexts), ray_address, cfg.num_workers * cfg.cpus_per_worker):
        results = work.estimate(contexts, models_key, make_worker_pool(args, cfg))

    metrics = write_outputs(work, contexts, results, paths, dataset)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(paths.stepwise_results / "metrics.json", metrics)
    work.checkpoint.discard()
    return metrics


def run_prompt(dataset: str, params: Path, prompt: str, root: Path = Path("."), samples: int | None = None,
               candidates: int | None = None, seed: int | None = None, progress: bool = True) -> dict:
    cfg = load_section(StepwiseConfig, "stepwise", params)
    cfg = cfg.model_copy(update={"samples": samples or cfg.samples, "candidates": candidates or cfg.candidates})
    tok = load_section(TokenizeConfig, "tokenize", params)
    paths = DatasetPaths(dataset, root)
    lm_dir = require_model(paths.lm("base"), f"{stage_name('base')}@{dataset}")
    energy_dir = require_model(paths.energy(cfg.energy), f"{stage_name(cfg.energy)}@{dataset}")
    return stepwise_prompt(prompt, lm_dir, energy_dir, paths.tokenizer, cfg,
                           load_section(NegativesConfig, "negatives", params), tok.prefix_len, tok.seq_len,
                           load_seed(params) if seed is None else seed, resolve_device(load_device(params)), progress)


__all__ = ["run", "run_prompt", "stepwise_summary"]
