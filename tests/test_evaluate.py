"""Stage evaluate and its estimators on toy models small enough to check by brute force."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import N_NEG, N_TEST, PREFIX, SEQ  # noqa: E402  (the toy run's shape)
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.core.errors import RebmError
from pipeline.estimation.bounds import log_partition_bounds
from pipeline.estimation.evaluation import completed_windows, per_position_logprob_bounds
from pipeline.models.energy import EnergyScorer
from pipeline.sampling.sampler import Sampler
from stages import evaluate as stage


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_toy_run

    return build_toy_run(tmp_path_factory.mktemp("evaluate"))


def evaluate(root: Path, **overrides) -> dict:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, *keys = dotted.split("__")
        target = params[section]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    path = root / "params-run.yaml"
    path.write_text(yaml.safe_dump(params))
    return stage.run("toy", path, root=root, progress=False)


@pytest.fixture(scope="module")
def result(project: Path) -> dict:
    return evaluate(project)


def read_tsv(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / "results/toy/evaluation" / name, sep="\t")


def test_zero_energy_reproduces_the_base_lm_everywhere(project: Path, result: dict) -> None:
    base = result["perplexity"]["base"]["ppl"]
    unit = result["joint"]["unit"]
    assert unit["ppl_low"] == pytest.approx(base, rel=1e-12) and unit["ppl_high"] == pytest.approx(base, rel=1e-12)
    positions = read_tsv(project, "position_ppl.tsv")
    assert list(positions["position"]) == list(range(PREFIX + 1, SEQ + 1))
    np.testing.assert_allclose(positions["unit_ppl_low"], positions["base_ppl"], rtol=1e-5)
    np.testing.assert_allclose(positions["unit_ppl_high"], positions["base_ppl"], rtol=1e-5)
    last = read_tsv(project, "last_position.tsv")
    unit_last = last[last["energy"] == "unit"]
    np.testing.assert_allclose(unit_last["exact_logprob"], unit_last["base_logprob"], atol=1e-9)


def test_exact_last_position_equals_brute_force(project: Path, result: dict) -> None:
    from transformers import AutoTokenizer

    from pipeline.data.tokenization import read_windows
    from pipeline.models.energy import load_energy
    from pipeline.models.lm import load_lm

    ids, windows = read_windows(project / "data/toy/windows/test.parquet")
    lm = load_lm(project / "models/toy/lm/base")
    model, body_tok = load_energy(project / "models/toy/energy/bit")
    scorer = EnergyScorer(model.eval(), body_tok, AutoTokenizer.from_pretrained(project / "data/toy/tokenizer"))
    last = read_tsv(project, "last_position.tsv")
    bit = last[last["energy"] == "bit"]
    assert len(bit) == 2
    for _, row in bit.iterrows():
        window = windows[list(ids).index(row["window_id"])]
        with torch.no_grad():
            lm_lp = torch.log_softmax(lm(input_ids=torch.tensor(window[None, :-1])).logits[0, -1].double(), -1)
            terms = []
            for v in range(lm.config.vocab_size):  # one candidate at a time, no batching
                candidate = torch.tensor(np.concatenate([window[:-1], [v]])[None])
                terms.append(lm_lp[v].item() - scorer(candidate).item())
        expected = terms[window[-1]] - torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0).item()
        assert row["exact_logprob"] == pytest.approx(expected, abs=1e-5)
        assert row["exact_logprob"] != pytest.approx(row["base_logprob"], abs=1e-4)  # the energy matters


def test_ranges_tables_and_figures(project: Path, result: dict) -> None:
    bit = result["joint"]["bit"]
    assert bit["ppl_low"] <= bit["ppl_high"]
    curve = read_tsv(project, "ppl_vs_samples.tsv")
    assert list(curve["samples"]) == [2, 4, 8]
    assert (curve["bit_ppl_low"] <= curve["bit_ppl_high"]).all()
    assert curve["bit_ppl_low"].iloc[-1] == pytest.approx(bit["ppl_low"], rel=1e-4)
    table = (project / "results/toy/evaluation/table1.md").read_text()
    for name in ("BASE LM", "BALM", "JOINT UNIT", "JOINT BIT-BASE"):
        assert f"| {name} |" in table
    metrics = json.loads((project / "results/toy/evaluation/metrics.json").read_text())
    assert metrics["n_eval"] == {"unit": N_NEG, "bit": N_NEG}
    assert metrics["continuation_tokens"] == N_TEST * (SEQ - PREFIX)
    assert metrics["positions"]["bit"]["last_position"]["exact_windows"] == 2
    assert not (project / "results/toy/.evaluation.tmp-checkpoint").exists()


def without_wall(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "wall_seconds"}


def test_an_interrupted_run_resumes_from_its_finished_parts(project: Path, result: dict, monkeypatch) -> None:
    from pipeline.estimation.evaluation_work import EvaluationWork

    scored, sampled = [], []
    real_energies, real_sample = EvaluationWork.energies, EvaluationWork._sample

    class Crash(Exception):
        pass

    def crash_on_second(self, variant, *args, **kwargs):
        if scored:
            raise Crash
        scored.append(variant)
        return real_energies(self, variant, *args, **kwargs)

    monkeypatch.setattr(EvaluationWork, "energies", crash_on_second)
    with pytest.raises(Crash):
        evaluate(project)
    assert (project / "results/toy/.evaluation.tmp-checkpoint/energies_unit.npz").exists()

    def count_score(self, variant, *args, **kwargs):
        scored.append(variant)
        return real_energies(self, variant, *args, **kwargs)

    def count_sample(self, *args, **kwargs):
        sampled.append(args[0])
        return real_sample(self, *args, **kwargs)

    scored.clear()
    monkeypatch.setattr(EvaluationWork, "energies", count_score)
    monkeypatch.setattr(EvaluationWork, "_sample", count_sample)
    resumed = evaluate(project)
    # Both variants ask for their energies, but unit's come from the checkpoint; no LM sample is redrawn.
    assert scored == ["unit", "bit"] and sampled == []
    assert not (project / "results/toy/.evaluation.tmp-checkpoint").exists()
    assert without_wall(resumed) == without_wall(result)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_actors_give_the_in_process_result(project: Path, result: dict) -> None:
    on_ray = evaluate(project, evaluate__num_workers=2)
    a, b = without_wall(on_ray), without_wall(result)
    assert a["perplexity"] == b["perplexity"]
    for variant in ("unit", "bit"):
        for key in ("ppl_low", "ppl_high"):
            assert a["joint"][variant][key] == pytest.approx(b["joint"][variant][key], rel=1e-6)
        exact = a["positions"][variant]["last_position"]["exact_ppl"]
        assert exact == pytest.approx(b["positions"][variant]["last_position"]["exact_ppl"], rel=1e-6)


def test_a_window_subset_is_scored_as_those_windows_alone(project: Path, tmp_path: Path) -> None:
    import shutil

    from pipeline.core.paths import DatasetPaths
    from pipeline.data.tokenization import read_windows
    from pipeline.estimation.evaluation import evenly_spaced
    from pipeline.estimation.perplexity import continuation_logprobs
    from pipeline.models.lm import load_lm

    copy_root = tmp_path / "project"
    shutil.copytree(project, copy_root)  # the module's outputs stay those of the full run
    subset = evaluate(copy_root, evaluate__windows=3)
    assert subset["test_windows"] == 3 < N_TEST == subset["test_windows_available"]
    assert subset["continuation_tokens"] == 3 * (SEQ - PREFIX)

    paths, cpu = DatasetPaths("toy", copy_root), torch.device("cpu")
    _, windows = read_windows(paths.windows_split("test"))
    logprobs = continuation_logprobs(load_lm(paths.lm("base"), cpu), windows[evenly_spaced(3, N_TEST)], PREFIX, 8, cpu)
    assert subset["perplexity"]["base"]["ppl"] == pytest.approx(math.exp(-logprobs.sum() / logprobs.size), abs=1e-3)


def test_bad_settings_name_the_key_or_file(project: Path) -> None:
    with pytest.raises(RebmError, match=r"evaluate.*n_eval: no sample count for \['bit'\]"):
        evaluate(project, evaluate__n_eval={"unit": 8})
    with pytest.raises(RebmError, match=r"positions.energies: \['bit_star'\] not in evaluate.energies"):
        evaluate(project, evaluate__positions__energies=["bit_star"])
    with pytest.raises(RebmError, match=r"models/toy/energy/bit_star: not found; run stage train_ebm_bit_star@toy"):
        evaluate(project, evaluate__energies=["bit_star"], evaluate__n_eval={"bit_star": 8},
                 evaluate__positions__energies=[])


def test_verdicts_reference_points_and_intervals(project: Path, result: dict) -> None:
    base = result["perplexity"]["base"]["ppl"]
    unit, bit = result["joint"]["unit"], result["joint"]["bit"]
    # E ≡ 0: every log-weight is 0, so log Z = 0 exactly at every n, converged, and nothing moves.
    assert unit["verdict"] == f"converged at n = {N_NEG}" and unit["convergence"]["gap"] == 0
    assert unit["self_normalised_ppl"] == pytest.approx(base, rel=1e-9)
    assert unit["ratio_to_base_ci_low"] == pytest.approx([1.0, 1.0]) == unit["ratio_to_base_ci_high"]
    # bit: |E| ~ 1, the interval brackets the point ratio of each end; the self-normalised number is log Z = 0.
    for end in ("low", "high"):
        low, high = bit[f"ratio_to_base_ci_{end}"]
        assert low <= bit[f"ppl_{end}"] / base <= high
    balm = result["perplexity"]["balm"]
    assert balm["ratio_to_base_ci"][0] <= balm["ppl"] / base <= balm["ratio_to_base_ci"][1]
    assert "ratio_to_base_ci" not in result["perplexity"]["base"]
    curve = read_tsv(project, "ppl_vs_samples.tsv")
    assert curve["bit_mean_log_z_lower"].iloc[-1] == pytest.approx(bit["convergence"]["mean_log_z_lower"], abs=1e-4)
    table = (project / "results/toy/evaluation/table1.md").read_text()
    assert bit["verdict"] in table and "self-normalised" in table


def assert_close(a, b, rel: float, path: str = "") -> None:
    """Nested metrics equal, numbers within `rel` (bools, strings and shapes exactly)."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, (path, a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_samples_stream_in_chunks_each_checkpointed(project: Path, result: dict, tmp_path: Path, monkeypatch) -> None:
    """stream_samples 3 (n = 8, Figure 1's s = 6): log Z chunks 0-3, 3-6, 6-8 and two Figure 1 chunks (drawn
    with the first log Z chunk), each a checkpoint part; a run killed after the second log Z chunk draws only
    the third, and the metrics are those of one chunk (only energy batches of other sizes differ, in
    float32's last bits)."""
    import shutil

    from pipeline.core.io import ArrayCheckpoint
    from pipeline.estimation.evaluation_work import EvaluationWork

    root = tmp_path / "project"
    shutil.copytree(project, root)
    real_save, real_sample = ArrayCheckpoint.save, EvaluationWork._sample

    class Crash(Exception):
        pass

    def save_then_crash(self, name, key, **arrays):
        real_save(self, name, key, **arrays)
        if name == "log_z_samples_3-6":
            raise Crash

    monkeypatch.setattr(ArrayCheckpoint, "save", save_then_crash)
    with pytest.raises(Crash):
        evaluate(root, evaluate__stream_samples=3)
    checkpoint = root / "results/toy/.evaluation.tmp-checkpoint"
    assert sorted(p.name for p in checkpoint.glob("*_samples_*")) == [
        "log_z_samples_0-3.npz", "log_z_samples_3-6.npz", "position_samples_0-3.npz", "position_samples_3-6.npz"]
    with np.load(checkpoint / "log_z_samples_3-6.npz") as part:  # energies only, one array per energy
        assert sorted(part.files) == ["__key__", "bit", "unit"] and part["bit"].shape == (N_TEST, 3)

    drawn: list[str] = []

    def count(self, pool, chunks):
        drawn.extend(chunk.name for chunk in chunks)
        return real_sample(self, pool, chunks)

    monkeypatch.setattr(ArrayCheckpoint, "save", real_save)
    monkeypatch.setattr(EvaluationWork, "_sample", count)
    resumed = evaluate(root, evaluate__stream_samples=3)
    assert drawn == ["log_z_samples_6-8"]  # Figure 1's chunks were drawn with the first log Z chunk
    assert not checkpoint.exists()
    # 5e-5: the paired intervals of the BIT rows (|E| ~ 60) turn float32's last bits into ~1e-5 of exp(·).
    assert_close(without_wall(resumed), without_wall(result), rel=5e-5)


def streamed_peak(root: Path, scratch: Path, n: int) -> tuple[int, dict]:
    """Peak traced memory (Python objects and numpy buffers, worker included: num_workers 0) of
    `EvaluationWork.sample_energies` with n log Z samples per prefix, 256 per chunk."""
    import gc
    import tracemalloc

    from pipeline.core.config import EvaluateConfig, NegativesConfig, load_section
    from pipeline.core.io import ArrayCheckpoint
    from pipeline.core.paths import DatasetPaths
    from pipeline.data.tokenization import read_windows
    from pipeline.estimation.evaluation_work import EvaluationWork

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"].update(n_eval={"unit": n, "bit": n}, stream_samples=256, batch_size=64)
    params["evaluate"]["convergence"]["stop_khat"] = None  # the toy's heavy tails would stop the draw at 1024
    path = scratch / f"params-{n}.yaml"
    path.write_text(yaml.safe_dump(params))
    cfg, neg = load_section(EvaluateConfig, "evaluate", path), load_section(NegativesConfig, "negatives", path)
    paths = DatasetPaths("toy", root)
    ids, windows = read_windows(paths.windows_split("test"))
    checkpoint = ArrayCheckpoint(scratch / f"checkpoint-{n}")
    real_save = checkpoint.save

    def save(name, key, **arrays):  # free the forward passes' cyclic garbage: measure what is held
        real_save(name, key, **arrays)
        gc.collect()

    checkpoint.save = save
    work = EvaluationWork(ids, windows, PREFIX, paths.tokenizer, cfg, neg, torch.device("cpu"), 7, checkpoint, False)
    energy_dirs = {v: paths.energy(v) for v in cfg.energies}
    for model_dir in (paths.lm("base"), *energy_dirs.values()):
        work._model_key(model_dir)  # hashing the models' files is not the sample path
    gc.collect()
    tracemalloc.start()
    try:
        out = work.sample_energies(paths.lm("base"), energy_dirs, 11, np.arange(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, out


def test_peak_memory_of_the_samples_does_not_grow_with_their_tokens(project: Path, tmp_path: Path) -> None:
    streamed_peak(project, tmp_path, 32)  # first-time imports and caches
    small, _ = streamed_peak(project, tmp_path, 64)
    large, out = streamed_peak(project, tmp_path, 2048)
    assert out["bit"]["samples"].shape == (N_TEST, 2048) and np.isfinite(out["bit"]["samples"]).all()
    energies = 2 * N_TEST * (2048 - 64) * 8  # the per-prefix float64 energies of unit and bit
    tokens = N_TEST * (2048 - 64) * SEQ * 8  # what holding the samples as int64 windows would add
    print(f"peak {small:,} B at n = 64, {large:,} B at n = 2048: +{large - small:,} B "
          f"(energies +{energies:,} B, tokens would be +{tokens:,} B)")
    assert large - small < 2 * energies + 128 * 1024 < tokens


# --------------------------------------------------------------------------- estimators
def test_per_position_bounds_telescope_to_the_sequence_likelihood() -> None:
    """With one energy per column, Eq. 5's terms telescope: Σ_t log P(x_t|x_<t) = log P_LM − E(x) − (−c_0)."""
    rng = np.random.default_rng(0)
    W, L, n = 3, 5, 4
    column = rng.normal(size=(W, L))
    energies = np.repeat(column[:, :, None], n, axis=2)
    real = rng.normal(size=W)
    base = -rng.random((W, L)) * 5
    lower, upper = per_position_logprob_bounds(base, real, energies)
    np.testing.assert_allclose(lower, upper, atol=1e-12)
    log_z = -column[:, 0]  # every completion from p+1 on has energy c_0: Z = exp(−c_0)
    np.testing.assert_allclose(lower.sum(1), base.sum(1) - real - log_z, atol=1e-12)


def test_completed_windows_keep_the_prefix_and_append_each_sample() -> None:
    windows = np.arange(2 * 6).reshape(2, 6)
    cont = np.full((2, 3, 2), -1)
    out = completed_windows(windows, 4, cont)
    assert out.shape == (2, 3, 6)
    assert (out[:, :, :4] == windows[:, None, :4]).all() and (out[:, :, 4:] == -1).all()


def test_bounds_bracket_log_z_of_a_real_lm_and_energy_by_enumeration() -> None:
    """A 6-token GPT-2 and 3 new tokens: Z over all 216 continuations, vs T_n and U_n from its samples."""
    vocab, prefix, new = 6, 2, 3
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=8, n_embd=16, n_layer=1, n_head=2)).eval()
    with torch.no_grad():
        lm.lm_head.weight.mul_(8)  # a peaked LM, so samples differ from uniform guessing
    prefix_ids = np.array([[1, 2]])
    grid = np.stack(np.meshgrid(*[np.arange(vocab)] * new, indexing="ij"), -1).reshape(-1, new)
    full = torch.from_numpy(np.concatenate([np.repeat(prefix_ids, len(grid), 0), grid], 1))
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=full).logits[:, prefix - 1 : -1].double(), -1)
        lm_logprob = logp.gather(-1, full[:, prefix:, None]).squeeze(-1).sum(-1)
    energy = torch.from_numpy(np.random.default_rng(1).normal(0, 1.5, len(grid)))
    assert abs(lm_logprob.exp().sum().item() - 1) < 1e-9  # the enumeration is complete
    log_z = torch.logsumexp(lm_logprob - energy, 0).item()

    trials = 3000
    samples = Sampler(lm, batch_samples=4096).sample(
        np.repeat(prefix_ids, trials, 0), np.arange(trials), 32, new, seed=11
    ).tokens.astype(np.int64)  # [trials, 32, 3]
    index = (samples * np.array([vocab**2, vocab, 1])).sum(-1)  # row of each sample in `grid`
    gaps = []
    for n in (4, 32):
        lower, upper = log_partition_bounds(-energy[torch.from_numpy(index[:, :n])])
        assert lower.mean().item() < log_z < upper.mean().item()
        gaps.append(upper.mean().item() - lower.mean().item())
    assert gaps[1] < gaps[0] / 3
    assert math.isfinite(log_z)


def test_config_rejects_an_exact_subset_larger_than_the_windows(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    bad = copy.deepcopy(params)
    bad["evaluate"]["positions"]["exact_last_windows"] = 5
    path = project / "params-bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(RebmError, match="exact_last_windows"):
        stage.run("toy", path, root=project, progress=False)


def test_a_futile_draw_stops_at_a_look_and_resumes_there(project: Path, tmp_path: Path, monkeypatch) -> None:
    """n_eval is a cap: at the look n = 64 BIT's weights stop its draw; UNIT's constant weights
    (k̂ = −inf) draw on to 256. Later chunks score UNIT only; the verdict says why it stopped, and a
    resumed run stops at the same place without drawing anything. The toy's weights are not heavy
    enough for a real stop, so every finite k̂ is read as 5 (`rebm bench statistics` checks the fit)."""
    import shutil

    from pipeline.estimation import diagnostics
    from pipeline.estimation.evaluation_work import EvaluationWork

    real_khat = diagnostics.pareto_khat
    monkeypatch.setattr(diagnostics, "pareto_khat", lambda lw: np.where(np.isfinite(k := real_khat(lw)), 5.0, k))

    root = tmp_path / "project"
    shutil.copytree(project, root)
    settings = {"evaluate__n_eval": {"unit": 256, "bit": 256}, "evaluate__stream_samples": 64,
                "evaluate__convergence__stop_khat": 0.71, "evaluate__convergence__stop_after": 64,
                "evaluate__positions__energies": []}
    real_sample, drawn = EvaluationWork._sample, []

    def spy(self, pool, chunks):
        drawn.extend((chunk.name, sorted(chunk.counts)) for chunk in chunks)
        checkpoint = root / "results/toy/.evaluation.tmp-checkpoint"
        real_sample(self, pool, chunks)
        shutil.copytree(checkpoint, tmp_path / "kept", dirs_exist_ok=True)  # what a kill would leave

    monkeypatch.setattr(EvaluationWork, "_sample", spy)
    first = evaluate(root, **settings)
    bit, unit = first["joint"]["bit"], first["joint"]["unit"]
    assert (bit["n_eval"], bit["n_eval_cap"], unit["n_eval"], unit["stopped"]) == (64, 256, 256, None)
    assert (bit["stopped"].startswith("stopped at n = 64: mean per-prefix PSIS k̂")
            and not bit["convergence"]["converged"])
    assert bit["convergence"]["reason"].startswith(bit["stopped"])
    assert drawn == [("log_z_samples_0-64", ["bit", "unit"])] + [
        (f"log_z_samples_{k}-{k + 64}", ["unit"]) for k in (64, 128, 192)]

    drawn.clear()
    shutil.copytree(tmp_path / "kept", root / "results/toy/.evaluation.tmp-checkpoint")
    resumed = evaluate(root, **settings)
    assert drawn == [] and without_wall(resumed) == without_wall(first)
