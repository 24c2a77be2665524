"""What the stages that run a pool of samplers and scorers (evaluate, generate) read first.

Both read their own section, `tokenize` and `negatives` (the sampler's batch and dtype), the
seed and the device, and resolve `precision: auto` for the device the pool computes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import NegativesConfig, TokenizeConfig, load_device, load_section, load_seed
from pipeline.core.precision import pool_device, resolve_device, resolve_precision


@dataclass(frozen=True)
class PoolStage:
    cfg: Any  # the stage's section, precision resolved (fp32 | bf16)
    tok: TokenizeConfig
    neg: NegativesConfig
    seed: int
    device: torch.device  # the stage's own device (params `device`)
    work_device: torch.device  # where the pool's samples and energies run


def load_pool_stage(model: type, section: str, params: Path) -> PoolStage:
    cfg = load_section(model, section, params)
    device = resolve_device(load_device(params))
    work_device = pool_device(cfg.num_workers, cfg.gpus_per_worker, device)
    cfg = cfg.model_copy(update={"precision": resolve_precision(cfg.precision, work_device)})
    return PoolStage(cfg, load_section(TokenizeConfig, "tokenize", params),
                     load_section(NegativesConfig, "negatives", params), load_seed(params), device, work_device)
