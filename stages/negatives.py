"""Stage `negatives`: n base-LM samples of T − p tokens per real prefix, on a Ray actor pool."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.core.config import NegativesConfig, TokenizeConfig, load_device, load_section, load_seed
from pipeline.core.io import write_json
from pipeline.core.paths import DatasetPaths
from pipeline.core.precision import pool_device, resolve_device, resolve_dtype


def run(
    dataset: str,
    params: Path,
    root: Path = Path("."),
    ray_address: str | None = None,
    model_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    from pipeline.sampling.actor_pool import ray_session_if
    from pipeline.sampling.negatives import NegativesSettings, SplitInput, generate_negatives

    cfg = load_section(NegativesConfig, "negatives", params)
    tok = load_section(TokenizeConfig, "tokenize", params)
    seed = load_seed(params)
    work_device = pool_device(cfg.num_workers, cfg.gpus_per_worker, resolve_device(load_device(params)))
    n_per_split = cfg.samples_for(dataset, params)
    paths = DatasetPaths(dataset, root)
    model_dir = Path(model_dir) if model_dir else paths.lm("base")

    # Each split's windows file is read a shard at a time, never whole; `negatives.windows` caps how many.
    splits = {split: SplitInput.from_windows(paths.windows_split(split), tok.prefix_len, n, cfg.windows)
              for split, n in n_per_split.items()}

    start = time.perf_counter()
    with ray_session_if(cfg.num_workers > 0, ray_address, cfg.num_workers * cfg.cpus_per_worker) as session:
        settings = NegativesSettings(
            new_tokens=tok.continuation_len, top_k=cfg.top_k, seed=seed, shard_windows=cfg.shard_windows,
            batch_samples=cfg.batch_samples, num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
            gpus_per_worker=cfg.gpus_per_worker, dtype=resolve_dtype(cfg.dtype, work_device), device=str(work_device),
        )
        stats = generate_negatives(model_dir, splits, paths.negatives, settings, progress=progress)
    ray = (session or {"address": "none (in process)"})["address"]
    summary = {
        "dataset": dataset,
        "model": str(model_dir),
        "ray": ray if ray in ("local", "existing", "none (in process)") else "cluster",
        "top_k": cfg.top_k,
        "stage_wall_seconds": round(time.perf_counter() - start, 3),
        **stats,
    }
    write_json(paths.negatives_stats, summary)
    return summary
