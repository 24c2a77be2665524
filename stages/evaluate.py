"""Stage `evaluate`: Table 1, Figure 1 and Figure 2 (left) on the test windows (paper §3.2, §4).

    LMs      exact continuation perplexity of base, BALM, RALM
    joint    UNIT / BIT / BIT* perplexity ranges, log Z from n_eval[energy] base-LM samples per
             prefix drawn here, with a convergence verdict, the self-normalised perplexity and
             paired intervals over test documents (pipeline/estimation/)
    Fig. 2   the range against the number of samples used, doubling n up to n_eval
    Fig. 1   per-position perplexity by Eq. 5 on a subset of windows, the last position also
             exactly, by scoring every vocabulary token

The LM samples are streamed: chunks of `stream_samples` per prefix are drawn, scored by every
energy and dropped on one pool of Ray actors (each holds the base LM and the energies), so
memory holds per-prefix energies, never the samples' tokens. LM log-probs, each finished chunk
and each energy's real-window scores are kept in results/<dataset>/.evaluation.tmp-checkpoint,
so an interrupted run resumes; outputs go to results/<dataset>/evaluation/.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.core.config import EvaluateConfig
from pipeline.core.io import ArrayCheckpoint, require_model
from pipeline.core.paths import DatasetPaths
from pipeline.core.pool_stage import load_pool_stage
from pipeline.core.seeds import log_z_seed
from pipeline.core.variants import stage_name
from pipeline.data.tokenization import WindowReader, window_documents
from pipeline.estimation.evaluation import count_saved_parameters, evenly_spaced
from pipeline.estimation.evaluation_summary import EvaluationInputs, summarise, write_evaluation
from pipeline.estimation.evaluation_work import EvaluationWork
from pipeline.sampling.actor_pool import ray_session_if


def run(
    dataset: str, params: Path, root: Path = Path("."), ray_address: str | None = None, progress: bool = True
) -> dict:
    started = time.perf_counter()
    stage = load_pool_stage(EvaluateConfig, "evaluate", params)  # precision resolved for the pool's device
    cfg, tok, neg, seed, device = stage.cfg, stage.tok, stage.neg, stage.seed, stage.device
    paths = DatasetPaths(dataset, root)

    reader = WindowReader(paths.windows_split("test"))  # only the evaluated windows are read
    available = reader.rows
    rows = evenly_spaced(cfg.windows or available, available)
    window_ids, windows = reader.take(rows)
    documents = window_documents(paths.windows_split("test"), window_ids)
    lm_dirs = {v: require_model(paths.lm(v), f"{stage_name(v)}@{dataset}") for v in cfg.lms}
    energy_dirs = {v: require_model(paths.energy(v), f"{stage_name(v)}@{dataset}") for v in cfg.energies}
    position_rows = evenly_spaced(cfg.positions.windows, len(rows)) if cfg.positions.energies else rows[:0]
    exact_rows = position_rows[: cfg.positions.exact_last_for(dataset)]

    work = EvaluationWork(window_ids, windows, tok.prefix_len, paths.tokenizer, cfg, neg, device, seed,
                          ArrayCheckpoint(paths.evaluation_checkpoint), progress)
    lm_logprobs = {v: work.lm_logprobs(v, d) for v, d in lm_dirs.items()}
    last_lm = work.last_position_lm(lm_dirs["base"], exact_rows) if len(exact_rows) else None
    with ray_session_if(cfg.num_workers > 0, ray_address, cfg.num_workers * cfg.cpus_per_worker):
        streamed = work.sample_energies(lm_dirs["base"], energy_dirs, log_z_seed(seed), position_rows)
        energies = {v: work.energies(v, d, streamed[v], exact_rows, last_lm, dataset) for v, d in energy_dirs.items()}

    result = summarise(
        EvaluationInputs(
            dataset=dataset, window_ids=window_ids, window_documents=documents, windows=windows,
            prefix_len=tok.prefix_len,
            available_windows=available, lm_logprobs=lm_logprobs,
            parameters={v: count_saved_parameters(d) for v, d in {**lm_dirs, **energy_dirs}.items()},
            energies=energies, position_rows=position_rows, exact_rows=exact_rows, last_lm=last_lm,
        ),
        cfg, seed,
    )
    wall = {k: round(s, 1) for k, s in work.wall.items()} | {"stage": round(time.perf_counter() - started, 1)}
    write_evaluation(paths.evaluation, result, wall)
    work.checkpoint.discard()
    return {**result["metrics"], "wall_seconds": wall}
