"""Stage `generate`: Algorithm 1 on the test prefixes, and the sample analyses of §4.3
(`pipeline.generation.algorithm`).

Writes data/<dataset>/generations/generations.parquet (gold, base, joint and worst
continuations with energies and LM log-probs) and results/<dataset>/generation/: metrics.json
(unique n-grams, repetition, log-likelihood density gaps, ESS), unique_ngrams.tsv (Figure 2
right), density_base_lm.tsv and density_joint.tsv (Figure 3), examples.md.

`run_prompt` is the interactive path (`rebm generate <dataset> --prompt …`): the same
models and Algorithm 1 on a user's own text, in this process.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.core.config import GenerateConfig, TokenizeConfig, load_device, load_section, load_seed
from pipeline.core.io import ArrayCheckpoint, require_model, write_json
from pipeline.core.paths import DatasetPaths
from pipeline.core.pool_stage import load_pool_stage
from pipeline.core.precision import resolve_device
from pipeline.core.variants import stage_name
from pipeline.data.tokenization import window_documents
from pipeline.generation.algorithm import GenerationWork, generate_for_prompt, side_by_side, write_analyses
from pipeline.generation.resample import write_generations
from pipeline.models.energy import input_markers
from pipeline.sampling.actor_pool import ray_session_if

__all__ = ["run", "run_prompt", "side_by_side"]


def _models(paths: DatasetPaths, energy: str) -> tuple[Path, Path]:
    return (require_model(paths.lm("base"), f"{stage_name('base')}@{paths.dataset}"),
            require_model(paths.energy(energy), f"{stage_name(energy)}@{paths.dataset}"))


def run(
    dataset: str, params: Path, root: Path = Path("."), ray_address: str | None = None, progress: bool = True
) -> dict:
    started = time.perf_counter()
    stage = load_pool_stage(GenerateConfig, "generate", params)  # precision resolved for the pool's device
    cfg, tok, neg, seed, device, work_device = (stage.cfg, stage.tok, stage.neg, stage.seed, stage.device,
                                                stage.work_device)
    paths = DatasetPaths(dataset, root)
    lm_dir, energy_dir = _models(paths, cfg.energy)

    work = GenerationWork.for_test_split(paths.windows_split("test"), cfg, prefix_len=tok.prefix_len, neg=neg,
                                         seed=seed, checkpoint=ArrayCheckpoint(paths.generation_checkpoint),
                                         device=work_device, progress=progress)
    gold_lp = work.gold_logprobs(lm_dir, device)
    with ray_session_if(cfg.num_workers > 0, ray_address, cfg.num_workers * cfg.cpus_per_worker):
        drawn = work.sample_energies(lm_dir, energy_dir, paths.tokenizer, f"{dataset}: Algorithm 1 ({cfg.energy})")
        gold_energies = work.gold_energies(energy_dir, paths.tokenizer)

    table = work.generations(gold_lp, gold_energies, drawn, paths.tokenizer)
    write_generations(paths.generations_file, table)
    documents = window_documents(paths.windows_split("test"), table.column("window_id").to_numpy())
    metrics = write_analyses(paths, table, cfg, dataset, documents, seed)
    metrics["energy_input_markers"] = input_markers(energy_dir, paths.tokenizer)
    work.wall["stage"] = time.perf_counter() - started
    metrics["wall_seconds"] = {k: round(v, 1) for k, v in work.wall.items()}
    write_json(paths.generation_results / "metrics.json", metrics)
    work.checkpoint.discard()
    return metrics


def run_prompt(dataset: str, params: Path, prompt: str, root: Path = Path("."), n_gen: int | None = None,
               seed: int | None = None) -> dict:
    """Algorithm 1 for a user's text: the base-LM sample and the joint sample, in this process."""
    cfg = load_section(GenerateConfig, "generate", params)
    tok = load_section(TokenizeConfig, "tokenize", params)
    seed = load_seed(params) if seed is None else seed
    device = resolve_device(load_device(params))
    paths = DatasetPaths(dataset, root)
    lm_dir, energy_dir = _models(paths, cfg.energy)
    return generate_for_prompt(prompt, lm_dir, energy_dir, paths.tokenizer, cfg, tok.prefix_len, tok.seq_len,
                               n_gen or cfg.n_gen, seed, device)
