"""Stage `train_ebm`: an energy model trained by conditional NCE against the base LM's samples.

    unit      causal body initialised from the trained base LM            (JOINT UNIT)
    bit       bidirectional body initialised from the pretrain_mlm encoder (JOINT BIT-BASE)
    bit_star  bidirectional body from a pretrained encoder (`init`)        (JOINT BIT-BASE*)

Writes models/<dataset>/energy/<variant>/ (save_pretrained + the body's tokenizer),
<variant>_metrics.json and <variant>_curve.tsv.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModel

from pipeline.config import (
    EnergyVariantConfig,
    TokenizeConfig,
    TrainEBMConfig,
    load_device,
    load_section,
    load_seed,
)
from pipeline.distributed import cluster_for, training_device
from pipeline.ebm_data import load_nce_data
from pipeline.energy import EnergyModel, EnergyScorer, resolve_pretrained
from pipeline.errors import RebmError
from pipeline.io import file_digest, fingerprint
from pipeline.lm import count_parameters, load_tokenizer
from pipeline.nce import train_energy, validate
from pipeline.paths import DatasetPaths
from pipeline.precision import resolve_precision
from pipeline.training import resolve_device, save_trained_run

VARIANTS = ("unit", "bit", "bit_star")


def _body_source(variant: str, cfg: EnergyVariantConfig, paths: DatasetPaths) -> str:
    """Where the energy body's initial weights and tokenizer come from."""
    if variant == "bit_star":
        return resolve_pretrained(cfg.init)
    source = paths.lm("base") if variant == "unit" else paths.mlm
    if not (source / "config.json").exists():
        stage = f"train_lm_base@{paths.dataset}" if variant == "unit" else f"pretrain_mlm@{paths.dataset}"
        raise RebmError(f"{source}: not found; the {variant} energy starts from it (run stage {stage} first)")
    return str(source)


def run(dataset: str, variant: str, params: Path, root: Path = Path(".")) -> dict:
    if variant not in VARIANTS:
        raise RebmError(f"unknown energy variant '{variant}' (expected one of: {', '.join(VARIANTS)})")
    started = time.perf_counter()
    paths = DatasetPaths(dataset, root)
    cfg: EnergyVariantConfig = getattr(load_section(TrainEBMConfig, "train_ebm", params), variant)
    prefix_len = load_section(TokenizeConfig, "tokenize", params).prefix_len
    seed, device = load_seed(params), resolve_device(load_device(params))

    train_data = load_nce_data(paths.windows_split("train"), paths.negatives_split("train"), prefix_len)
    valid_data = load_nce_data(paths.windows_split("valid"), paths.negatives_split("valid"), prefix_len,
                               limit=cfg.eval_windows)
    lm_tokenizer = load_tokenizer(paths.tokenizer, f"train_ebm.{variant}")
    source = _body_source(variant, cfg, paths)
    body_tokenizer = load_tokenizer(source, f"train_ebm.{variant}")
    train_device = training_device(cfg.optim, device)  # the Ray Train workers' device above one worker
    torch.manual_seed(seed)
    model = EnergyModel.from_body(AutoModel.from_pretrained(source), "unit" if variant == "unit" else "bit",
                                  keep_layout=cfg.keep_layout)
    scorer = EnergyScorer(model.to(device), body_tokenizer, lm_tokenizer)
    print(f"{dataset}/{variant}: {count_parameters(model):,} parameters, body from {source}, "
          f"{'token ids' if scorer.shares_vocab else 'detokenised text'} in, "
          f"{len(train_data)} train windows x {train_data.samples_per_prefix} LM samples")

    with cluster_for(cfg.optim):  # a Ray session (RAY_ADDRESS, else local) only above one worker
        result = train_energy(
            scorer, train_data, valid_data, cfg.optim,
            seed=seed, checkpoint_dir=paths.energy_checkpoint(variant), device=train_device,
            fingerprint=fingerprint(
                cfg.model_dump(mode="json"), seed, prefix_len, source,
                file_digest(Path(source) / "config.json"), train_data.windows, train_data.negatives,
            ),
            desc=f"{dataset}/{variant}",
        )
    valid = validate(scorer, valid_data, cfg.optim.eval_batch_size, seed)
    metrics = {
        "dataset": dataset,
        "variant": variant,
        "body": source,
        "input": "token_ids" if scorer.shares_vocab else "detokenized_text",
        "input_markers": scorer.markers.as_dict() if scorer.markers else None,  # line breaks, end of document
        "parameters": count_parameters(model),
        "negatives_per_prefix": train_data.samples_per_prefix,
        "train_windows": len(train_data),
        "valid_windows": len(valid_data),
        **{f"valid_{key}": value for key, value in valid.items()},
        "steps": result.steps,
        "best_step": result.best_step,
        "train_seconds": round(result.train_seconds, 1),
        "train_sequences_per_s": round(result.tokens / max(result.train_seconds, 1e-9), 1),
        "resumed_from_step": result.resumed_from,
        "device": str(train_device),
        "workers": cfg.optim.workers,
        "precision": resolve_precision(cfg.optim.precision, train_device),
    }
    return save_trained_run(
        model, body_tokenizer, result, metrics,
        model_dir=paths.energy(variant), curve_path=paths.energy_curve(variant),
        metrics_path=paths.energy_metrics(variant), checkpoint_dir=paths.energy_checkpoint(variant), started=started,
    )
