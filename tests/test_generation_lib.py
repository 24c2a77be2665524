"""Algorithm 1 (importance resampling with weights exp(−E)) and the §4.3 sample analyses."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core.errors import RebmError
from pipeline.generation.resample import (
    BASE_INDEX,
    GENERATIONS_SCHEMA,
    effective_sample_size,
    generations_table,
    importance_resample,
    read_generations,
    resample_uniforms,
    resampling_log_weights,
    select_generations,
    write_generations,
)
from pipeline.generation.sample_analysis import (
    density_summary,
    joint_log_likelihood,
    loglik_by_source,
    repetition_rate,
    sample_metrics,
    unique_ngram_percentage,
    unique_ngram_rows,
)
from pipeline.sampling.sampler import sample_uniforms

VOCAB = [f"w{i}" for i in range(64)]


def decode(ids) -> str:
    return " ".join(VOCAB[i] for i in ids)


def binomial_tolerance(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


# --------------------------------------------------------------------------- Algorithm 1
def test_log_weights_are_minus_energy() -> None:
    e = np.array([[0.5, -2.0, 3.0]])
    np.testing.assert_array_equal(resampling_log_weights(e), -e)
    assert resampling_log_weights(e).dtype == np.float64


def test_low_energy_wins_at_the_softmax_rate() -> None:
    # Two candidates with E = [0, 2]: P(index 0) = e^0 / (e^0 + e^-2) = 1 / (1 + e^-2) ≈ 0.881.
    draws = 40_000
    u = resample_uniforms(7, np.arange(draws))
    energies = np.tile([0.0, 2.0], (draws, 1))
    picked = importance_resample(energies, u)
    expected = 1 / (1 + math.exp(-2))
    freq0 = float((picked == 0).mean())
    assert abs(freq0 - expected) < binomial_tolerance(expected, draws)
    # Flipping the sign of E flips the winner: +E would pick the machine-like sample.
    flipped = importance_resample(-energies + 2.0, u)  # E = [2, 0]
    assert abs(float((flipped == 1).mean()) - expected) < binomial_tolerance(expected, draws)
    assert freq0 > 0.8 and float((flipped == 0).mean()) < 0.2


def test_inverse_cdf_boundaries_are_exact() -> None:
    # −E = log p with p = [0.25, 0.75]: u < 0.25 -> 0, u >= 0.25 -> 1.
    energies = -np.log(np.array([[0.25, 0.75]] * 4))
    u = np.array([0.0, 0.2499, 0.2501, 0.9999])
    assert importance_resample(energies, u).tolist() == [0, 0, 1, 1]


def test_zero_energy_is_plain_lm_sampling() -> None:
    """E ≡ 0: the index is uniform over the n samples and independent of them, so the
    returned sample is distributed as one top-k LM sample (Algorithm 1 = plain sampling)."""
    W, n = 16_000, 8
    counts = np.bincount(importance_resample(np.zeros((W, n)), resample_uniforms(3, np.arange(W))), minlength=n)
    expected = W / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32  # 0.999 quantile of chi-square with 7 degrees of freedom

    # "LM samples": one token per sample from a categorical p; the resampled token has law p.
    p = np.array([0.5, 0.3, 0.2])
    u_lm = sample_uniforms(11, np.arange(W), n, 1)[..., 0]
    tokens = np.searchsorted(np.cumsum(p), u_lm, side="right")  # [W, n]
    sel = select_generations(np.zeros((W, n)), np.arange(W), seed=11)
    chosen = tokens[np.arange(W), sel.joint_index]
    freq = np.bincount(chosen, minlength=3) / W
    for k in range(3):
        assert abs(freq[k] - p[k]) < binomial_tolerance(p[k], W)
    np.testing.assert_allclose(sel.ess, n)


def test_extreme_energies_stay_finite() -> None:
    e = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, 1e4]])
    u = np.array([0.0, 0.7, 0.5])
    idx = importance_resample(e, u)
    assert idx[0] == 1  # weight 1 on the only low-energy sample, even at u = 0
    assert idx[1] == 1  # u = 0.7 in [0.5, 1) of two equal weights
    assert idx[2] == 1  # all equal: uniform, u = 0.5 -> middle
    ess = effective_sample_size(-e)
    assert np.isfinite(ess).all()
    np.testing.assert_allclose(ess, [1.0, 2.0, 3.0])
    # A weight that underflows to 0 at the end of the row is never chosen.
    assert importance_resample(np.array([[0.0, 1e4]]), np.array([0.999999])).tolist() == [0]


def test_effective_sample_size() -> None:
    np.testing.assert_allclose(effective_sample_size(np.zeros(10)), 10.0)
    np.testing.assert_allclose(effective_sample_size(np.array([0.0, -50.0, -50.0, -50.0])), 1.0, atol=1e-12)
    # weights [1, 1, 2, 0]: (4)^2 / (1 + 1 + 4) = 8/3
    lw = np.log(np.array([1.0, 1.0, 2.0, 1e-300]))
    np.testing.assert_allclose(effective_sample_size(lw), 8 / 3)


def test_accepts_torch_tensors_and_rejects_bad_input() -> None:
    e = torch.tensor([[0.0, 3.0], [3.0, 0.0]])
    assert importance_resample(e, torch.tensor([0.5, 0.5])).tolist() == [0, 1]
    with pytest.raises(ValueError, match="non-finite"):
        importance_resample(np.array([[0.0, np.nan]]), np.array([0.5]))
    with pytest.raises(ValueError, match="one uniform per row"):
        importance_resample(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        importance_resample(np.zeros((1, 3)), np.array([1.0]))


def test_select_generations() -> None:
    e = np.array([[0.0, 5.0, -1.0], [2.0, -3.0, 9.0]])
    ids = np.array([10, 42])
    sel = select_generations(e, ids, seed=5)
    assert sel.base_index.tolist() == [BASE_INDEX, BASE_INDEX]
    assert sel.worst_index.tolist() == [1, 2]
    expected = importance_resample(e, resample_uniforms(5, ids))
    np.testing.assert_array_equal(sel.joint_index, expected)
    # Counter-based: a window's choice does not depend on what it is batched with.
    alone = select_generations(e[1:], ids[1:], seed=5)
    assert alone.joint_index[0] == sel.joint_index[1]
    with pytest.raises(RebmError, match=r"windows \[42\]"):
        select_generations(np.array([[0.0, 1.0], [np.inf, 0.0]]), ids, seed=5)


def test_resample_uniforms_use_their_own_stream() -> None:
    ids = np.arange(1000)
    u = resample_uniforms(2020, ids)
    assert u.shape == (1000,) and (u >= 0).all() and (u < 1).all()
    # Not the uniform that drew the first token of sample 0 in the LM sampler.
    assert not np.allclose(u, sample_uniforms(2020, ids, 1, 1)[:, 0, 0])
    np.testing.assert_array_equal(u[500:], resample_uniforms(2020, ids[500:]))


# --------------------------------------------------------------------------- generations table
def make_generations(W: int = 5, n: int = 4, L: int = 6, p: int = 3, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = np.arange(100, 100 + W)
    samples = rng.integers(0, len(VOCAB), size=(W, n, L))
    energy = rng.normal(size=(W, n))
    lm_lp = -rng.uniform(5, 30, size=(W, n))
    sel = select_generations(energy, ids, seed=seed)
    return generations_table(
        ids,
        rng.integers(0, len(VOCAB), size=(W, p)),
        rng.integers(0, len(VOCAB), size=(W, L)),
        rng.normal(size=W) - 1.0,
        -rng.uniform(10, 40, size=W),
        samples,
        energy,
        lm_lp,
        sel,
        decode,
    )


def test_generations_table_round_trip(tmp_path) -> None:
    W, n, L = 5, 4, 6
    rng = np.random.default_rng(1)
    ids = np.arange(W)
    samples = rng.integers(0, len(VOCAB), size=(W, n, L))
    energy = rng.normal(size=(W, n))
    lm_lp = -rng.uniform(5, 30, size=(W, n))
    sel = select_generations(energy, ids, seed=1)
    table = generations_table(
        ids, samples[:, 0, :3], samples[:, 1], np.zeros(W), np.full(W, -9.0), samples, energy, lm_lp, sel, decode
    )
    assert table.schema == GENERATIONS_SCHEMA
    rows = np.arange(W)
    for name, index in (("joint", sel.joint_index), ("base", sel.base_index), ("worst", sel.worst_index)):
        assert table.column(f"{name}_ids").to_pylist() == samples[rows, index].tolist()
        np.testing.assert_array_equal(table.column(f"{name}_energy").to_numpy(), energy[rows, index])
        np.testing.assert_array_equal(table.column(f"{name}_lm_logprob").to_numpy(), lm_lp[rows, index])
        assert table.column(f"{name}_text").to_pylist() == [decode(t) for t in samples[rows, index]]
    assert (table.column("worst_energy").to_numpy() >= table.column("joint_energy").to_numpy()).all()
    assert table.column("joint_index").to_pylist() == sel.joint_index.tolist()

    path = tmp_path / "generations" / "generations.parquet"
    write_generations(path, table)
    back = read_generations(path)
    assert back.equals(table)
    assert all(not f.nullable for f in GENERATIONS_SCHEMA)

    pq.write_table(table.drop_columns(["ess"]), tmp_path / "bad.parquet")
    with pytest.raises(RebmError, match=r"bad\.parquet: missing column 'ess'"):
        read_generations(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="sample_energy"):
        generations_table(ids, samples[:, 0, :3], samples[:, 1], np.zeros(W), np.zeros(W), samples,
                          energy[:, :2], lm_lp, sel, decode)


# --------------------------------------------------------------------------- analyses
SEQS = ["a b a b".split(), "a b c".split()]


def test_unique_ngrams_on_hand_made_text() -> None:
    # within each sequence: n=1 -> {a,b} of 4 + {a,b,c} of 3 = 5/7; n=2 -> 2/3 + 2/2 = 4/5
    assert unique_ngram_percentage(SEQS, 1) == pytest.approx(100 * 5 / 7)
    assert unique_ngram_percentage(SEQS, 2) == pytest.approx(80.0)
    assert unique_ngram_percentage(SEQS, 3) == pytest.approx(100.0)
    assert unique_ngram_percentage(SEQS, 4) == pytest.approx(100.0)  # "a b c" has no 4-gram
    # pooled over all sequences: n=1 -> {a,b,c} of 7; n=2 -> {ab, ba, bc} of 5
    assert unique_ngram_percentage(SEQS, 1, "pooled") == pytest.approx(100 * 3 / 7)
    assert unique_ngram_percentage(SEQS, 2, "pooled") == pytest.approx(60.0)
    assert unique_ngram_percentage([np.array([1, 1, 1, 1])], 1) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="no 5-grams"):
        unique_ngram_percentage(SEQS, 5)
    rows = unique_ngram_rows({"real": SEQS, "base": [["x"] * 4]}, ns=(1, 2))
    assert rows == [{"n": 1, "real": pytest.approx(100 * 5 / 7), "base": 25.0},
                    {"n": 2, "real": pytest.approx(80.0), "base": pytest.approx(100 / 3)}]


def test_repetition_rate() -> None:
    # window "the cat | sat the cat sat", bigrams ending in the continuation:
    # (cat sat) new, (sat the) new, (the cat) seen in the prefix, (cat sat) seen -> 2 of 4
    assert repetition_rate([["sat", "the", "cat", "sat"]], 2, [["the", "cat"]]) == 0.5
    assert repetition_rate([["sat", "the", "cat", "sat"]], 2) == 0.0
    # Without a prefix it is the complement of the within-sequence unique share.
    for n in (1, 2):
        assert repetition_rate(SEQS, n) == pytest.approx(1 - unique_ngram_percentage(SEQS, n) / 100)


def test_density_summary() -> None:
    summary = density_summary({"real": [-10.0, -20.0], "base": [-5.0, -5.0], "joint": [-12.0, -14.0]}, bins=5)
    m = summary.metrics
    assert m["sources"]["real"] == {"mean": -15.0, "std": 5.0, "count": 2}
    assert m["mean_difference"] == {"base": -10.0, "joint": -2.0}  # mean(real) − mean(sample)
    assert m["mean_gap"] == {"base": 10.0, "joint": 2.0}
    centres = [r["loglik"] for r in summary.rows]
    assert centres == pytest.approx([-18.5, -15.5, -12.5, -9.5, -6.5])  # 5 bins of width 3 over [-20, -5]
    for source in ("real", "base", "joint"):
        assert sum(r[source] for r in summary.rows) * 3.0 == pytest.approx(1.0)
    assert summary.rows[-1]["base"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="reference"):
        density_summary({"base": [1.0]})


def test_joint_loglik_and_table_metrics() -> None:
    np.testing.assert_allclose(joint_log_likelihood([-10.0, -20.0], [1.0, -2.0], [0.5, 0.5]), [-11.5, -18.5])
    table = make_generations()
    base = loglik_by_source(table, "base_lm")
    joint = loglik_by_source(table, "joint")
    np.testing.assert_array_equal(base["real"], table.column("gold_lm_logprob").to_numpy())
    np.testing.assert_allclose(
        joint["joint"], table.column("joint_lm_logprob").to_numpy() - table.column("joint_energy").to_numpy()
    )
    metrics = sample_metrics(table)
    assert set(metrics["unique_ngram_pct"]["sequence"]["4"]) == {"real", "base", "joint"}
    assert metrics["windows"] == 5
    assert set(metrics["loglik_density"]) == {"base_lm", "joint"}


def test_paired_sample_checks_decide_the_section_4_3_claims_per_prefix() -> None:
    """Joint continuations with more distinct 3-grams than BASE LM's on every prefix, and log-likelihoods
    closer to real text: both intervals exclude 0 on the claim's side; equal sources give intervals around 0."""
    from pipeline.generation.sample_analysis import paired_sample_checks

    rng = np.random.default_rng(0)
    W = 24
    repetitive = [[1, 2, 3] * 4 for _ in range(W)]  # 12 tokens, 3 distinct 3-grams of 10
    varied = [list(rng.permutation(50)[:12]) for _ in range(W)]
    real_ll = rng.normal(-100, 5, W)
    table = pa.table({
        "gold_ids": varied, "base_ids": repetitive, "joint_ids": varied,
        "gold_lm_logprob": real_ll, "base_lm_logprob": real_ll + 20 + rng.normal(0, 1, W),
        "joint_lm_logprob": real_ll + 6 + rng.normal(0, 1, W),
        "gold_energy": np.zeros(W), "base_energy": np.zeros(W), "joint_energy": np.zeros(W),
    })
    documents = np.repeat(np.arange(12), 2)
    checks = paired_sample_checks(table, documents, 0.95, 1000, seed=0, ns=(1, 3))
    assert checks["documents"] == 12
    assert checks["unique_ngrams"]["3"]["ci"][0] > 0  # joint has more unique 3-grams, clearly
    closer = checks["closer_to_real"]
    assert closer["same_sign"] and closer["ci"][1] < 0  # joint's gap (6) clearly below BASE LM's (20)
    assert (closer["mean_gap"]["base"] == pytest.approx(20, abs=1)
            and closer["mean_gap"]["joint"] == pytest.approx(6, abs=1))

    same = table.set_column(table.schema.get_field_index("joint_ids"), "joint_ids", pa.array(repetitive))
    low, high = paired_sample_checks(same, documents, 0.95, 1000, seed=0, ns=(3,))["unique_ngrams"]["3"]["ci"]
    assert low == high == 0  # identical continuations: no difference at all
