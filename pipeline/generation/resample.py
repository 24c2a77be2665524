"""Generation from the joint model by importance resampling (paper §3.3, Algorithm 1).

Algorithm 1 ("Top-k Joint Sampling"): draw n samples x_1..x_n from P_LM with top-k
sampling, score s_i = E_θ(x_i), return x_i with probability exp(−s_i) / Σ_j exp(−s_j).
It is self-normalised importance sampling with the LM as proposal: the target is
P_LM · exp(−E) / Z, so the importance weight of an LM sample is exp(−E) (the LM factor
cancels). Real text gets LOW energy, so the minus sign makes low-energy samples win
(docs/design.md: a public follow-up shipped +E, which picks the most machine-like sample).

Randomness is counter-based like the rest of the pipeline: the uniform that resamples the
window `window_id` is a hash of (seed, window_id) from `pipeline.sampling.sampler.sample_uniforms`,
on a stream of its own, so the choice depends neither on batching nor on worker order.

This module is the library half of the `generate` stage: the stage samples the LM, scores
energies and log-probs, then calls `select_generations` and `generations_table`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.errors import RebmError
from pipeline.core.io import read_table, write_table
from pipeline.sampling.sampler import sample_uniforms

# Index of the plain top-k LM sample among the n drawn for a prefix. The n samples are
# i.i.d. top-k draws (each from its own counter-based uniforms), so any index fixed in
# advance — i.e. chosen without looking at the energies — is distributed exactly as one
# top-k LM sample. Taking it from the same set that Algorithm 1 resamples (rather than a
# separate draw) makes "base" and "joint" differ only by the resampling step: same LM,
# same k, same prefix, and they coincide when the resampler happens to pick sample 0.
BASE_INDEX = 0

# Separates the resampling uniforms from the LM sampler's, which use the same
# (seed, window_id, sample_idx, step) counters: without it, the uniform resampling window w
# would be the one that drew the first token of sample 0 of w — correlated choices.
_RESAMPLE_STREAM = 0x5245_5341_4D50_4C45  # "RESAMPLE"

SYSTEMS = ("gold", "base", "joint", "worst")

GENERATIONS_SCHEMA = pa.schema(
    [pa.field("window_id", pa.int64(), nullable=False)]
    + [pa.field(f"{s}_ids", pa.list_(pa.int32()), nullable=False) for s in ("prefix", *SYSTEMS)]
    + [pa.field(f"{s}_text", pa.string(), nullable=False) for s in ("prefix", *SYSTEMS)]
    + [pa.field(f"{s}_energy", pa.float64(), nullable=False) for s in SYSTEMS]
    # Σ over the continuation of log P_LM(token | history) under the FULL softmax (no top-k
    # renormalisation), so it is the base LM's log-likelihood used in Figure 3 (left).
    + [pa.field(f"{s}_lm_logprob", pa.float64(), nullable=False) for s in SYSTEMS]
    + [
        pa.field("joint_index", pa.int32(), nullable=False),  # which of the n samples Algorithm 1 returned
        pa.field("ess", pa.float64(), nullable=False),  # effective sample size of the weights exp(−E)
    ]
)
"""One row per test prefix: the `generate` stage's Parquet (data/<dataset>/generations/)."""


def _as_float64(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor; avoids importing torch here
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        raise ValueError(f"{name} must have a last dimension of samples, got a scalar")
    return array


def resampling_log_weights(energies: Any) -> np.ndarray:
    """log of Algorithm 1's unnormalised weights: −E (float64, same shape as `energies`)."""
    return -_as_float64(energies, "energies")


def _log_softmax(log_weights: np.ndarray) -> np.ndarray:
    # Subtract the row max before exp: only differences of energies are exponentiated, so
    # energies of ±1e4 (and any spread up to ~700 nats per step) stay finite.
    top = log_weights.max(axis=-1, keepdims=True)
    shifted = log_weights - top
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _check_finite(log_weights: np.ndarray) -> None:
    bad = ~np.isfinite(log_weights).all(axis=-1)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(-1))
        raise ValueError(
            f"energies contain non-finite values in {len(rows)} row(s) (first flat row index {rows[0]})"
        )


def importance_resample(energies: Any, u: Any) -> np.ndarray:
    """Draw one index per row from softmax(−E) over the last axis (Algorithm 1's resampling).

    energies: [..., n] (ndarray or tensor); u: uniforms in [0, 1) of shape [...], one per row.
    Inverse CDF: the index i with cdf_{i−1} ≤ u < cdf_i, computed from the log-softmax in
    float64. A sample whose weight underflows to exactly 0 is never returned (ties in the
    CDF resolve to the right). Returns int64 indices of shape [...].
    """
    log_weights = resampling_log_weights(energies)
    _check_finite(log_weights)
    u = np.asarray(u.detach().cpu().numpy() if hasattr(u, "detach") else u, dtype=np.float64)
    if u.shape != log_weights.shape[:-1]:
        raise ValueError(f"u has shape {u.shape}, expected one uniform per row {log_weights.shape[:-1]}")
    if ((u < 0) | (u >= 1)).any():
        raise ValueError("u must lie in [0, 1)")
    cdf = np.cumsum(np.exp(_log_softmax(log_weights)), axis=-1)
    # Scale by the last CDF value (1 up to rounding) so u never lands past the end.
    x = u * cdf[..., -1]
    index = (cdf <= x[..., None]).sum(axis=-1)
    return np.minimum(index, log_weights.shape[-1] - 1).astype(np.int64)


def effective_sample_size(log_weights: Any) -> np.ndarray:
    """Kish's ESS (Σw)² / Σw² over the last axis, from log-weights, in float64.

    = exp(2·logsumexp(lw) − logsumexp(2·lw)); n for equal weights, → 1 when one dominates.
    A small ESS means Algorithm 1 effectively picks one sample (its approximation of the
    joint model is then only as good as that sample set).
    """
    lw = _as_float64(log_weights, "log_weights")
    _check_finite(lw)
    top = lw.max(axis=-1, keepdims=True)
    shifted = lw - top
    lse1 = np.log(np.exp(shifted).sum(axis=-1))
    lse2 = np.log(np.exp(2 * shifted).sum(axis=-1))
    return np.exp(2 * lse1 - lse2)


def resample_uniforms(seed: int, window_ids: Any) -> np.ndarray:
    """float64 [W] in [0, 1): the uniform that resamples each window, hash of (seed, window_id)."""
    stream_seed = (int(seed) ^ _RESAMPLE_STREAM) & ((1 << 64) - 1)
    ids = np.asarray(window_ids, dtype=np.int64).reshape(-1)
    return sample_uniforms(stream_seed, ids, 1, 1)[:, 0, 0]


@dataclass(frozen=True)
class Selection:
    """Which of the n samples of each of W prefixes fills each column of the generations table."""

    joint_index: np.ndarray  # int64 [W]: Algorithm 1's resampled sample
    base_index: np.ndarray  # int64 [W]: the plain top-k LM sample (BASE_INDEX)
    worst_index: np.ndarray  # int64 [W]: the highest-energy sample (what the energy rejects most)
    ess: np.ndarray  # float64 [W]: effective sample size of the weights exp(−E)


def select_generations(energies: Any, window_ids: Any, seed: int) -> Selection:
    """For energies [W, n] of n top-k LM samples per prefix: joint, base and worst indices.

    joint = importance_resample(E, resample_uniforms(seed, window_ids)) (Algorithm 1);
    base = BASE_INDEX (sample 0: a plain top-k LM sample, see BASE_INDEX);
    worst = argmax E (the sample the energy finds least like real text).
    """
    e = _as_float64(energies, "energies")
    ids = np.asarray(window_ids, dtype=np.int64)
    if e.ndim != 2 or ids.shape != (e.shape[0],) or e.shape[1] < 1:
        raise ValueError(f"energies must be [W, n] with one window id per row, got {e.shape} and {ids.shape}")
    finite = np.isfinite(e).all(axis=-1)
    if not finite.all():
        bad = ids[~finite][:5].tolist()
        raise RebmError(f"energies of windows {bad} contain NaN or inf (is the energy model diverged?)")
    joint = importance_resample(e, resample_uniforms(seed, ids))
    return Selection(
        joint_index=joint,
        base_index=np.full(len(ids), BASE_INDEX, dtype=np.int64),
        worst_index=e.argmax(axis=-1).astype(np.int64),
        ess=effective_sample_size(-e),
    )


def generations_table(
    window_ids: Any,
    prefix_ids: Sequence[Sequence[int]] | np.ndarray,
    gold_ids: Sequence[Sequence[int]] | np.ndarray,
    gold_energy: Any,
    gold_lm_logprob: Any,
    sample_ids: np.ndarray | Mapping[str, np.ndarray],
    sample_energy: Any,
    sample_lm_logprob: Any,
    selection: Selection,
    decode: Callable[[Sequence[int]], str],
) -> pa.Table:
    """Build GENERATIONS_SCHEMA rows for W prefixes from their n samples and a Selection.

    sample_ids [W, n, L] int (or only the picks: {"base", "joint", "worst"} -> [W, L], what the
    streaming generate stage keeps), sample_energy and sample_lm_logprob [W, n]; gold_* [W];
    `decode` turns token ids into text (the LM tokenizer's decode). Errors name the argument.
    """
    ids = np.asarray(window_ids, dtype=np.int64)
    W = len(ids)
    picked_only = isinstance(sample_ids, Mapping)  # {"base", "joint", "worst"}: [W, L] each, the picks alone
    samples = None if picked_only else np.asarray(sample_ids)
    if not picked_only and (samples.ndim != 3 or samples.shape[0] != W):
        raise ValueError(f"sample_ids must be [W={W}, n, L], got shape {samples.shape}")
    energy = _as_float64(sample_energy, "sample_energy")
    n = samples.shape[1] if samples is not None else (energy.shape[-1] if energy.ndim == 2 else 0)
    lm_logprob = _as_float64(sample_lm_logprob, "sample_lm_logprob")
    for name, array in (("sample_energy", energy), ("sample_lm_logprob", lm_logprob)):
        if array.shape != (W, n):
            raise ValueError(f"{name} must be [W={W}, n={n}], got shape {array.shape}")
    gold_e = _as_float64(gold_energy, "gold_energy").reshape(-1)
    gold_lp = _as_float64(gold_lm_logprob, "gold_lm_logprob").reshape(-1)
    for name, seqs in (("prefix_ids", prefix_ids), ("gold_ids", gold_ids), ("gold_energy", gold_e),
                       ("gold_lm_logprob", gold_lp)):
        if len(seqs) != W:
            raise ValueError(f"{name} has {len(seqs)} rows, expected W={W}")
    for name in ("joint_index", "base_index", "worst_index", "ess"):
        if getattr(selection, name).shape != (W,):
            raise ValueError(f"selection.{name} must have shape ({W},)")

    rows = np.arange(W)
    columns: dict[str, list[Any]] = {"window_id": ids.tolist()}
    prefix_lists = [np.asarray(p).astype(np.int64).tolist() for p in prefix_ids]
    gold_lists = [np.asarray(g).astype(np.int64).tolist() for g in gold_ids]
    picked = {s: getattr(selection, f"{s}_index").astype(np.int64) for s in ("base", "joint", "worst")}
    columns["prefix_ids"] = prefix_lists
    columns["gold_ids"] = gold_lists
    for s, index in picked.items():
        chosen = np.asarray(sample_ids[s]) if picked_only else samples[rows, index]
        columns[f"{s}_ids"] = chosen.astype(np.int64).tolist()
    for s in ("prefix", *SYSTEMS):
        columns[f"{s}_text"] = [decode(t) for t in columns[f"{s}_ids"]]
    columns["gold_energy"] = gold_e.tolist()
    columns["gold_lm_logprob"] = gold_lp.tolist()
    for s, index in picked.items():
        columns[f"{s}_energy"] = energy[rows, index].tolist()
        columns[f"{s}_lm_logprob"] = lm_logprob[rows, index].tolist()
    columns["joint_index"] = picked["joint"].tolist()
    columns["ess"] = np.asarray(selection.ess, dtype=np.float64).tolist()
    return pa.Table.from_pydict({f.name: columns[f.name] for f in GENERATIONS_SCHEMA}, schema=GENERATIONS_SCHEMA)


def write_generations(path: str | Path, table: pa.Table) -> None:
    """Atomically write a generations table (cast to GENERATIONS_SCHEMA)."""
    write_table(path, table, GENERATIONS_SCHEMA)


def read_generations(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a generations Parquet file, failing with the file and column if the schema is off."""
    table = read_table(path, GENERATIONS_SCHEMA, columns)
    for name in table.column_names:
        if table.column(name).null_count:
            raise RebmError(f"{path}: column '{name}' has {table.column(name).null_count} null value(s)")
    return table

