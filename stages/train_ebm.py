"""Stage `train_ebm`: an energy model trained by conditional NCE against the base LM's samples
(`pipeline.training.nce`): unit (JOINT UNIT), bit (JOINT BIT-BASE), bit_star (JOINT BIT-BASE*),
bit_large (JOINT BIT-LARGE*); a variant set to null in params is recorded as not applicable.

Writes models/<dataset>/energy/<variant>/ (save_pretrained + the body's tokenizer),
<variant>_metrics.json and <variant>_live/ (the learning curve through dvclive).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.core.config import (
    EnergyVariantConfig,
    TokenizeConfig,
    TrainEBMConfig,
    load_device,
    load_section,
    load_seed,
)
from pipeline.core.io import file_digest, fingerprint
from pipeline.core.paths import DatasetPaths
from pipeline.core.precision import resolve_device
from pipeline.core.variants import check_variant
from pipeline.models.lm import count_parameters, load_tokenizer
from pipeline.training.distributed import cluster_for, training_device
from pipeline.training.ebm_data import load_nce_data, remove_stale_stores
from pipeline.training.nce import (
    energy_body_name,
    energy_body_source,
    energy_run_metrics,
    energy_scorer,
    train_energy,
    validate,
)
from pipeline.training.trainer import run_metrics, save_not_applicable, save_trained_run


def run(dataset: str, variant: str, params: Path, root: Path = Path(".")) -> dict:
    check_variant(variant, "energy")
    started = time.perf_counter()
    paths = DatasetPaths(dataset, root)
    cfg: EnergyVariantConfig | None = getattr(load_section(TrainEBMConfig, "train_ebm", params), variant)
    if cfg is None:
        return save_not_applicable(f"train_ebm.{variant} is null in {params}", {"dataset": dataset, "variant": variant},
                                   model_dir=paths.energy(variant), live_dir=paths.energy_live(variant),
                                   metrics_path=paths.energy_metrics(variant), started=started)
    prefix_len = load_section(TokenizeConfig, "tokenize", params).prefix_len
    seed, device = load_seed(params), resolve_device(load_device(params))

    scratch, store = paths.energy_checkpoint(variant).parent, f"{variant}-nce"  # beside the checkpoints
    remove_stale_stores(scratch, store)
    train_data = load_nce_data(paths.windows_split("train"), paths.negatives_split("train"), prefix_len,
                               scratch=scratch, name=store)
    valid_data = load_nce_data(paths.windows_split("valid"), paths.negatives_split("valid"), prefix_len,
                               limit=cfg.eval_windows, scratch=scratch, name=store)
    lm_tokenizer = load_tokenizer(paths.tokenizer, f"train_ebm.{variant}")
    source = energy_body_source(variant, cfg.init, paths)
    body_tokenizer = load_tokenizer(source, f"train_ebm.{variant}")
    train_device = training_device(cfg.optim, device)  # the Ray Train workers' device above one worker
    torch.manual_seed(seed)
    body_name = energy_body_name(variant, cfg.init, source)
    scorer = energy_scorer(variant, source, body_tokenizer, lm_tokenizer, cfg.keep_layout, device, body_name)
    print(f"{dataset}/{variant}: {count_parameters(scorer.model):,} parameters, body from {source}, "
          f"{'token ids' if scorer.shares_vocab else 'detokenised text'} in, "
          f"{len(train_data)} train windows x {train_data.samples_per_prefix} LM samples")

    with cluster_for(cfg.optim):  # a Ray session (RAY_ADDRESS, else local) only above one worker
        result = train_energy(
            scorer, train_data, valid_data, cfg.optim,
            seed=seed, checkpoint_dir=paths.energy_checkpoint(variant), device=train_device,
            fingerprint=fingerprint(
                cfg.model_dump(mode="json"), seed, prefix_len, source,
                file_digest(Path(source) / "config.json"), train_data.digest(),
            ),
            desc=f"{dataset}/{variant}",
        )
    valid = validate(scorer, valid_data, cfg.optim.eval_batch_size, seed)
    metrics = {"dataset": dataset, "variant": variant, "body": body_name,
               **energy_run_metrics(scorer, train_data, valid_data, valid),
               **run_metrics(result, cfg.optim, train_device, per_s="sequences")}
    return save_trained_run(
        scorer.model, body_tokenizer, result, metrics,
        model_dir=paths.energy(variant), live_dir=paths.energy_live(variant),
        metrics_path=paths.energy_metrics(variant), checkpoint_dir=paths.energy_checkpoint(variant), started=started,
    )
