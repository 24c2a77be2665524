"""Stage `pretrain_mlm`: the BIT energy's encoder (`energy.bit`) pretrained as a masked LM.

Writes models/<dataset>/mlm/ (save_pretrained of the masked LM and its tokenizer: the LM's
tokens plus padding and mask), mlm_metrics.json and mlm_live/ (the learning curve through dvclive).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from pipeline.core.config import EncoderArch, PretrainMLMConfig, load_device, load_section, load_seed, load_subsection
from pipeline.core.io import fingerprint
from pipeline.core.paths import DatasetPaths
from pipeline.core.precision import resolve_device
from pipeline.data.tokenization import read_window_ids
from pipeline.models.lm import count_parameters, load_tokenizer
from pipeline.models.mlm import build_mlm, mlm_tokenizer
from pipeline.training.distributed import cluster_for, training_device
from pipeline.training.mlm import pretrain_mlm
from pipeline.training.token_store import load_window_rows, remove_stale_stores
from pipeline.training.trainer import run_metrics, save_not_applicable, save_trained_run


def run(dataset: str, params: Path, root: Path = Path(".")) -> dict:
    started = time.perf_counter()
    paths = DatasetPaths(dataset, root)
    cfg = load_section(PretrainMLMConfig, "pretrain_mlm", params, nullable=True)
    if cfg is None:  # only the BIT energy starts from this encoder: null when train_ebm.bit is
        return save_not_applicable(f"pretrain_mlm is null in {params}", {"dataset": dataset, "variant": "mlm"},
                                   model_dir=paths.mlm, live_dir=paths.mlm_live, metrics_path=paths.mlm_metrics,
                                   started=started)
    arch = load_subsection(EncoderArch, "energy.bit", params)
    seed, device = load_seed(params), resolve_device(load_device(params))
    scratch, store = paths.mlm_checkpoint.parent, "mlm-windows"  # the train split, read by rows from disk
    remove_stale_stores(scratch, store)
    train_ids = load_window_rows(paths.windows_split("train"), scratch, store)
    valid_ids = torch.from_numpy(read_window_ids(paths.windows_split("valid")))

    tokenizer = mlm_tokenizer(load_tokenizer(paths.tokenizer, "pretrain_mlm"))
    torch.manual_seed(seed)
    model = build_mlm(arch, tokenizer, max_positions=train_ids.shape[1]).to(device)
    train_device = training_device(cfg.optim, device)
    with cluster_for(cfg.optim):  # a Ray session (RAY_ADDRESS, else local) only above one worker
        result = pretrain_mlm(
            model, tokenizer, train_ids, valid_ids, cfg,
            seed=seed, checkpoint_dir=paths.mlm_checkpoint, device=train_device,
            fingerprint=fingerprint(cfg.model_dump(mode="json"), arch.model_dump(mode="json"), seed,
                                    train_ids.digest()),
            desc=f"{dataset}/mlm",
        )
    metrics = {
        "dataset": dataset,
        "parameters": count_parameters(model.bert),
        "valid_mlm_loss": result.best_valid,
        "valid_mlm_ppl": math.exp(result.best_valid),
        **run_metrics(result, cfg.optim, train_device),
    }
    return save_trained_run(
        model, tokenizer, result, metrics,
        model_dir=paths.mlm, live_dir=paths.mlm_live, metrics_path=paths.mlm_metrics,
        checkpoint_dir=paths.mlm_checkpoint, started=started,
    )
