"""Stage `train_lm`: the base LM and the paper's two baselines, BALM and RALM
(`pipeline.training.causal`).

Writes models/<dataset>/lm/<variant>/ (save_pretrained + tokenizer), <variant>_metrics.json
(parameter counts, continuation perplexity on valid and test) and <variant>_live/ (the learning curve through dvclive).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.core.config import (
    EncoderArch,
    LMVariantConfig,
    RalmConfig,
    TokenizeConfig,
    load_device,
    load_section,
    load_seed,
    load_subsection,
)
from pipeline.core.errors import RebmError
from pipeline.core.io import fingerprint
from pipeline.core.paths import DatasetPaths
from pipeline.core.precision import resolve_device
from pipeline.core.variants import check_variant
from pipeline.data.tokenization import read_window_ids
from pipeline.training.causal import assemble_lm, heldout_perplexity, train_causal_lm
from pipeline.training.distributed import cluster_for, training_device
from pipeline.training.token_store import load_window_rows, remove_stale_stores
from pipeline.training.trainer import run_metrics, save_not_applicable, save_trained_run


def run(dataset: str, variant: str, params: Path, root: Path = Path(".")) -> dict:
    check_variant(variant, "lm")
    started = time.perf_counter()
    paths = DatasetPaths(dataset, root)
    cfg = load_subsection(RalmConfig if variant == "ralm" else LMVariantConfig, f"train_lm.{variant}", params,
                          nullable=variant != "base")
    if cfg is None:
        return save_not_applicable(f"train_lm.{variant} is null in {params}", {"dataset": dataset, "variant": variant},
                                   model_dir=paths.lm(variant), live_dir=paths.lm_live(variant),
                                   metrics_path=paths.lm_metrics(variant), started=started)
    seed, device = load_seed(params), resolve_device(load_device(params))
    prefix_len = load_section(TokenizeConfig, "tokenize", params).prefix_len
    # The train split is read by rows from an on-disk store; valid and test (small) are held.
    scratch, store = paths.lm_checkpoint(variant).parent, f"{variant}-windows"
    remove_stale_stores(scratch, store)
    splits = {"train": load_window_rows(paths.windows_split("train"), scratch, store),
              **{split: read_window_ids(paths.windows_split(split)) for split in ("valid", "test")}}
    seq_len = splits["train"].shape[1]
    if not 0 < prefix_len < seq_len:
        raise RebmError(f"tokenize.prefix_len={prefix_len} must be below the windows' length {seq_len} "
                        f"({paths.windows}); rerun the tokenize stage")
    balm = {"base_cfg": load_subsection(LMVariantConfig, "train_lm.base", params),
            "bit_arch": load_subsection(EncoderArch, "energy.bit", params)} if variant == "balm" else {}

    torch.manual_seed(seed)
    lm = assemble_lm(variant, cfg, paths, splits["train"], **balm)
    lm.model.to(device)
    for key, value in lm.metrics.items():
        if isinstance(value, int):
            print(f"{dataset}/{variant}: {key} = {value:,}")
    train_device = training_device(cfg.optim, device)  # the Ray Train workers' device when optim.workers > 1
    with cluster_for(cfg.optim):  # a Ray session (RAY_ADDRESS, else local) only above one worker
        result = train_causal_lm(
            lm.model, splits["train"], splits["valid"], prefix_len, cfg.optim,
            seed=seed, device=train_device, checkpoint_dir=paths.lm_checkpoint(variant),
            fingerprint=fingerprint(cfg.model_dump(mode="json"), seed, prefix_len, lm.depends_on,
                                    splits["train"].digest()),
            desc=f"{dataset}/{variant}",
        )
    metrics = {
        "dataset": dataset, "variant": variant, "prefix_len": prefix_len, "seq_len": seq_len, **lm.metrics,
        **heldout_perplexity(lm.model, splits, prefix_len, cfg.optim, device),
        "train_tokens": result.tokens, **run_metrics(result, cfg.optim, train_device),
    }
    return save_trained_run(
        lm.model, lm.tokenizer, result, metrics,
        model_dir=paths.lm(variant), live_dir=paths.lm_live(variant), metrics_path=paths.lm_metrics(variant),
        checkpoint_dir=paths.lm_checkpoint(variant), started=started,
    )
