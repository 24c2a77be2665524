"""The model variants of the paper's Table 1: one registry that stages, params, the report and
`rebm plan` all read, so adding or renaming a variant happens here and nowhere else.

    LMs       base (BASE LM), balm (BALM), ralm (RALM)                    stage train_lm_<key>
    energies  unit (JOINT UNIT), bit (JOINT BIT-BASE), bit_star (JOINT BIT-BASE*),
              bit_large (JOINT BIT-LARGE*)                                stage train_ebm_<key>

A variant whose params entry is null (`train_lm.balm: null`) is not applicable to that run: its
stage writes a `not_applicable.json` record instead of a model, and Table 1 says so.
"""

from __future__ import annotations

from typing import Literal, get_args

from pipeline.core.errors import RebmError

LMVariant = Literal["base", "balm", "ralm"]
EnergyVariant = Literal["unit", "bit", "bit_star", "bit_large"]
LM_VARIANTS: tuple[str, ...] = get_args(LMVariant)
ENERGY_VARIANTS: tuple[str, ...] = get_args(EnergyVariant)
# Energies whose body is a pretrained encoder named by `train_ebm.<variant>.init` (the starred
# rows of Table 1); unit and bit start from the pipeline's own base LM and pretrain_mlm encoder.
PRETRAINED_ENERGIES: tuple[str, ...] = ("bit_star", "bit_large")

DISPLAY_NAMES = {
    "base": "BASE LM",
    "balm": "BALM",
    "ralm": "RALM",
    "unit": "JOINT UNIT",
    "bit": "JOINT BIT-BASE",
    "bit_star": "JOINT BIT-BASE*",
    "bit_large": "JOINT BIT-LARGE*",
}


# What `rebm plan` calls each variant's model in its tables (the trained model, not Table 1's row).
PLAN_NAMES = {
    "base": "base LM",
    "balm": "BALM",
    "ralm": "RALM (base + phi)",
    "unit": "UNIT energy",
    "bit": "BIT energy",
    "bit_star": "BIT* energy",
    "bit_large": "BIT-LARGE* energy",
}


def plan_name(variant: str) -> str:
    """`rebm plan`'s name of a variant's model ("bit_star" -> "BIT* energy"); unknown ones as given."""
    return PLAN_NAMES.get(variant, variant)


def display_name(variant: str) -> str:
    """Table 1's name of a model variant ("bit_star" -> "JOINT BIT-BASE*"); unknown ones upper-cased."""
    return DISPLAY_NAMES.get(variant, variant.upper())


def stage_name(variant: str) -> str:
    """The dvc.yaml stage (before `@<dataset>`) that trains `variant`."""
    return f"train_lm_{variant}" if variant in LM_VARIANTS else f"train_ebm_{variant}"


def check_variant(variant: str, kind: Literal["lm", "energy"]) -> str:
    """`variant` if it is a known LM (`kind="lm"`) or energy variant; a RebmError naming the choices if not."""
    known = LM_VARIANTS if kind == "lm" else ENERGY_VARIANTS
    if variant not in known:
        what = "LM" if kind == "lm" else "energy"
        raise RebmError(f"unknown {what} variant '{variant}' (expected one of: {', '.join(known)})")
    return variant
