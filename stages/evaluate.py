"""Stage `evaluate`: Table 1, Figure 1 and Figure 2 (left) on the test windows (paper §3.2, §4).

    LMs      exact continuation perplexity of base, BALM, RALM
    joint    UNIT / BIT / BIT* perplexity ranges, log Z from n_eval base-LM samples per prefix
    Fig. 2   the range against the number of samples used
    Fig. 1   per-position perplexity by Eq. 5 on a subset of windows, the last position also
             exactly, by scoring every vocabulary token

LM samples (beyond the negatives stage's) and energies are computed on the Ray actor pool.
Finished parts are kept in results/<dataset>/.evaluation.tmp-checkpoint, so an interrupted
run resumes; outputs go to results/<dataset>/evaluation/.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import EvaluateConfig, NegativesConfig, TokenizeConfig, load_device, load_section, load_seed
from pipeline.ebm_data import load_nce_data
from pipeline.errors import RebmError
from pipeline.evaluation import (
    DISPLAY_NAMES,
    completed_windows,
    count_saved_parameters,
    evenly_spaced,
    exact_last_logprob,
    format_parameters,
    joint_perplexity,
    last_position_candidates,
    per_position_logprob_bounds,
    perplexity_vs_samples,
    position_perplexity,
    position_seed,
    table1_markdown,
)
from pipeline.io import ArrayCheckpoint, fingerprint, require_model, write_json, write_text, write_tsv
from pipeline.negatives import model_digest
from pipeline.paths import DatasetPaths
from pipeline.precision import resolve_precision
from pipeline.training import resolve_device

LM_STAGES = {"base": "train_lm_base", "balm": "train_lm_balm", "ralm": "train_lm_ralm"}




def _check_full_distribution(paths: DatasetPaths) -> None:
    """log Z needs samples of P_LM itself: refuse test negatives drawn with top-k."""
    manifest_path = paths.negatives / "manifest.json"
    if manifest_path.exists():
        top_k = json.loads(manifest_path.read_text()).get("top_k", 0)
        if top_k:
            raise RebmError(
                f"{manifest_path}: the test negatives were drawn with top_k={top_k}; the partition-function "
                "bounds need samples from the full LM distribution (set negatives.top_k: 0)"
            )


def run(
    dataset: str, params: Path, root: Path = Path("."), ray_address: str | None = None, progress: bool = True
) -> dict:
    from pipeline.lm import load_lm
    from pipeline.perplexity import continuation_logprobs

    started = time.perf_counter()
    cfg = load_section(EvaluateConfig, "evaluate", params)
    tok = load_section(TokenizeConfig, "tokenize", params)
    neg = load_section(NegativesConfig, "negatives", params)
    seed, device = load_seed(params), resolve_device(load_device(params))
    cfg = cfg.model_copy(update={"precision": resolve_precision(cfg.precision, device)})  # auto -> fp32 | bf16
    paths = DatasetPaths(dataset, root)
    p, T = tok.prefix_len, tok.seq_len
    L = T - p

    _check_full_distribution(paths)
    data = load_nce_data(paths.windows_split("test"), paths.negatives_split("test"), p)
    all_windows = len(data)
    if cfg.windows is not None:
        data = data.subset(evenly_spaced(cfg.windows, all_windows))
    N, stored = len(data), data.samples_per_prefix
    n_eval = cfg.n_eval or stored
    if n_eval > stored:
        raise RebmError(
            f"{params}: evaluate.n_eval={n_eval} but the negatives stage stored {stored} samples per test "
            f"prefix for '{dataset}' (raise negatives.samples.{dataset}.test)"
        )
    counts = sorted({k for k in cfg.sample_counts if k <= n_eval} | {n_eval})
    tokens = N * L
    lm_dirs = {v: require_model(paths.lm(v), f"{LM_STAGES[v]}@{dataset}") for v in cfg.lms}
    energy_dirs = {v: require_model(paths.energy(v), f"train_ebm_{v}@{dataset}") for v in cfg.energies}
    position_variants = [v for v in cfg.positions.energies if v in energy_dirs]
    if set(cfg.positions.energies) - set(position_variants):
        missing = sorted(set(cfg.positions.energies) - set(position_variants))
        raise RebmError(f"{params}: evaluate.positions.energies names {missing}, not in evaluate.energies")
    pos_rows = evenly_spaced(cfg.positions.windows, N) if position_variants else np.zeros(0, np.int64)
    exact_rows = pos_rows[: cfg.positions.exact_last_windows]

    checkpoint = ArrayCheckpoint(paths.evaluation_checkpoint)
    data_key = fingerprint(seed, p, T, data.window_ids, data.windows, data.negatives[:, :n_eval])
    model_keys = {v: model_digest(d) for v, d in {**lm_dirs, **energy_dirs}.items()}
    base_key = model_keys["base"]
    wall: dict[str, float] = {}

    # -- exact LM log-probs of every continuation token (Table 1's LM rows) -------------------
    t0 = time.perf_counter()
    lm_logprobs: dict[str, np.ndarray] = {}
    for variant, model_dir in lm_dirs.items():
        key = fingerprint(data_key, model_keys[variant], cfg.batch_size)
        cached = checkpoint.load(f"lm_{variant}", key)
        if cached is None:
            model = load_lm(model_dir, device)
            cached = {"logprobs": continuation_logprobs(model, data.windows, p, cfg.batch_size, device)}
            checkpoint.save(f"lm_{variant}", key, **cached)
            del model
        lm_logprobs[variant] = cached["logprobs"]
    last_lm = None
    if len(exact_rows):
        key = fingerprint(data_key, base_key, exact_rows)
        cached = checkpoint.load("last_position_lm", key)
        if cached is None:
            cached = {"logprobs": _last_position_lm_logprobs(load_lm(lm_dirs["base"], device), data.windows[exact_rows], device)}
            checkpoint.save("last_position_lm", key, **cached)
        last_lm = cached["logprobs"]
    wall["lm_logprobs"] = time.perf_counter() - t0

    ray_needed = cfg.num_workers > 0
    with _ray(ray_needed, ray_address, cfg.num_workers * cfg.cpus_per_worker):
        # -- LM completions from every position of the Figure 1 windows (Eq. 5's x') ---------
        t0 = time.perf_counter()
        position_tokens = None
        if len(pos_rows):
            key = fingerprint(data_key, base_key, pos_rows, cfg.positions.samples, neg.batch_samples, neg.dtype)
            cached = checkpoint.load("position_samples", key)
            if cached is None:
                cached = {"tokens": _sample_positions(
                    lm_dirs["base"], data.window_ids[pos_rows], data.windows[pos_rows], p, cfg, neg, seed, progress
                )}
                checkpoint.save("position_samples", key, **cached)
            position_tokens = cached["tokens"]  # [W, L, n, T]
        wall["position_sampling"] = time.perf_counter() - t0

        # -- energies --------------------------------------------------------------------------
        energies: dict[str, dict[str, np.ndarray]] = {}
        for variant, energy_dir in energy_dirs.items():
            t0 = time.perf_counter()
            with_positions = variant in position_variants
            key = fingerprint(data_key, model_keys[variant], n_eval, cfg.precision, cfg.batch_size,
                              cfg.shard_sequences, position_tokens if with_positions else None, exact_rows)
            cached = checkpoint.load(f"energies_{variant}", key)
            if cached is None:
                cached = _score_variant(
                    energy_dir, paths.tokenizer, data, n_eval, position_tokens if with_positions else None,
                    data.windows[exact_rows] if with_positions else None, last_lm, cfg, progress, f"{dataset}/{variant}",
                )
                checkpoint.save(f"energies_{variant}", key, **cached)
            energies[variant] = cached
            wall[f"energies_{variant}"] = time.perf_counter() - t0

    result = _summarise(dataset, cfg, data, all_windows, n_eval, counts, tokens, lm_dirs, energy_dirs, lm_logprobs,
                        energies, pos_rows, exact_rows, position_variants, last_lm)
    result["wall_seconds"] = {k: round(v, 1) for k, v in wall.items()}
    result["wall_seconds"]["stage"] = round(time.perf_counter() - started, 1)
    _write_outputs(paths, result)
    checkpoint.discard()
    return {**result["metrics"], "wall_seconds": result["wall_seconds"]}


def _ray(needed: bool, address: str | None, num_cpus: int):
    if not needed:
        return contextlib.nullcontext()
    from pipeline.actor_pool import ray_session

    return ray_session(address, num_cpus=num_cpus)


@torch.no_grad()
def _last_position_lm_logprobs(model, windows: np.ndarray, device: torch.device) -> np.ndarray:
    """log P_LM(v | x_<T) for every token v: [E, V] float64."""
    ids = torch.from_numpy(np.ascontiguousarray(windows[:, :-1], dtype=np.int64)).to(device)
    logits = model(input_ids=ids).logits[:, -1].float()
    return torch.log_softmax(logits, dim=-1).double().cpu().numpy()


def _sample_positions(model_dir: Path, window_ids, windows, p: int, cfg: EvaluateConfig, neg: NegativesConfig,
                      seed: int, progress: bool) -> np.ndarray:
    """For each start index p..T−1: n LM completions of x_<start, as full windows [W, L, n, T]."""
    from pipeline.negatives import SampleJob, run_sample_jobs

    W, T = windows.shape
    n = cfg.positions.samples
    out = np.empty((W, T - p, n, T), dtype=np.int64)
    jobs = [
        SampleJob(start, window_ids, np.ascontiguousarray(windows[:, :start]), n, T - start, position_seed(seed, start))
        for start in range(p, T)
    ]

    def done(job: SampleJob, result: dict) -> None:
        out[:, job.key - p] = completed_windows(windows, job.key, result["tokens"].astype(np.int64))

    run_sample_jobs(model_dir, jobs, done, top_k=0, batch_samples=neg.batch_samples, dtype=neg.dtype,
                    num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
                    desc="per-position LM samples", progress=progress)
    return out


def _score_variant(energy_dir: Path, tokenizer_dir: Path, data, n_eval: int, position_tokens, exact_windows,
                   last_lm, cfg: EvaluateConfig, progress: bool, desc: str) -> dict[str, np.ndarray]:
    """Energies of the real windows, their n_eval LM samples, and (optionally) the Figure 1 inputs."""
    from pipeline.scoring import score_energies

    N, T = data.windows.shape
    rows = np.repeat(np.arange(N), n_eval)
    blocks = {
        "real": data.windows,
        "samples": data.negative_windows(rows, np.tile(np.arange(n_eval), N)),
    }
    if position_tokens is not None:
        blocks["positions"] = position_tokens.reshape(-1, T)
        if len(exact_windows):
            vocab = last_lm.shape[-1]
            blocks["last_candidates"] = np.concatenate([last_position_candidates(w, vocab) for w in exact_windows])
    sizes = {k: len(v) for k, v in blocks.items()}
    everything = np.concatenate(list(blocks.values()))
    with tqdm(total=len(everything), unit="seq", desc=f"energies {desc}", disable=not progress) as bar:
        energies = score_energies(
            energy_dir, tokenizer_dir, everything, shard_sequences=cfg.shard_sequences, batch_size=cfg.batch_size,
            precision=cfg.precision, num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
            on_progress=bar.update,
        )
    out, offset = {}, 0
    for name, size in sizes.items():
        out[name] = energies[offset : offset + size]
        offset += size
    out["samples"] = out["samples"].reshape(N, n_eval)
    if "positions" in out:
        out["positions"] = out["positions"].reshape(position_tokens.shape[:3])
    if "last_candidates" in out:
        out["last_candidates"] = out["last_candidates"].reshape(len(exact_windows), -1)
    return out


def _summarise(dataset, cfg, data, available_windows, n_eval, counts, tokens, lm_dirs, energy_dirs, lm_logprobs,
               energies, pos_rows, exact_rows, position_variants, last_lm) -> dict:
    N = len(data)
    base_seq = lm_logprobs["base"].sum(axis=1)
    base_ppl = float(np.exp(-base_seq.sum() / tokens))
    params = {v: count_saved_parameters(d) for v, d in {**lm_dirs, **energy_dirs}.items()}

    def vs_base(ppl: float) -> float:
        return round(100 * (ppl / base_ppl - 1), 3)

    rows, metrics_lm, metrics_joint, curve = [], {}, {}, {}
    for variant in lm_dirs:
        ppl = float(np.exp(-lm_logprobs[variant].sum() / tokens))
        metrics_lm[variant] = {"ppl": round(ppl, 3), "parameters": params[variant]}
        rows.append({"name": DISPLAY_NAMES[variant], "parameters": format_parameters(params[variant]), "ppl": ppl,
                     "vs_base_pct": None if variant == "base" else vs_base(ppl)})
    for variant in energy_dirs:
        e = energies[variant]
        joint = joint_perplexity(base_seq, e["real"], e["samples"], tokens)
        metrics_joint[variant] = {
            "ppl_low": round(joint.low, 3),
            "ppl_high": round(joint.high, 3),
            "vs_base_pct_low": vs_base(joint.low),
            "vs_base_pct_high": vs_base(joint.high),
            "high_below_base": joint.high < base_ppl,
            "parameters": params["base"] + params[variant],
            "energy_parameters": params[variant],
            "mean_energy_real": round(float(e["real"].mean()), 4),
            "mean_energy_lm_samples": round(float(e["samples"].mean()), 4),
        }
        rows.append({
            "name": DISPLAY_NAMES[variant],
            "parameters": f"{format_parameters(params['base'])}+{format_parameters(params[variant])}",
            "ppl_low": joint.low, "ppl_high": joint.high, "vs_base_pct": [vs_base(joint.low), vs_base(joint.high)],
        })
        curve[variant] = perplexity_vs_samples(base_seq, e["real"], e["samples"], counts, tokens)

    positions_table, last_rows, metrics_positions = [], [], {}
    if len(pos_rows):
        base_tok = lm_logprobs["base"][pos_rows]  # [W, L]
        base_pos = position_perplexity(base_tok)
        columns = {}
        for variant in position_variants:
            e = energies[variant]
            lower, upper = per_position_logprob_bounds(base_tok, e["real"][pos_rows], e["positions"])
            columns[variant] = (position_perplexity(upper), position_perplexity(lower))  # (ppl low, ppl high)
            entry = {
                "windows": len(pos_rows),
                "samples": cfg.positions.samples,
                "last_position": {
                    "base_ppl": round(float(base_pos[-1]), 3),
                    "estimated_ppl_low": round(float(columns[variant][0][-1]), 3),
                    "estimated_ppl_high": round(float(columns[variant][1][-1]), 3),
                },
                # Medians and counts: with few samples per position the U_n end is heavy-tailed.
                "median_gain_low": round(float(np.median(base_pos - columns[variant][1])), 3),
                "median_gain_high": round(float(np.median(base_pos - columns[variant][0])), 3),
                "positions_gain_in_both_bounds": int((columns[variant][1] < base_pos).sum()),
                "positions": len(base_pos),
            }
            if len(exact_rows):
                target = data.windows[exact_rows, -1]
                exact = exact_last_logprob(last_lm, e["last_candidates"], target)
                k = len(exact_rows)
                entry["last_position"].update({
                    "exact_windows": k,
                    "exact_ppl": round(float(np.exp(-exact.mean())), 3),
                    "base_ppl_on_exact_windows": round(float(np.exp(-base_tok[:k, -1].mean())), 3),
                    "estimated_ppl_low_on_exact_windows": round(float(np.exp(-upper[:k, -1].mean())), 3),
                    "estimated_ppl_high_on_exact_windows": round(float(np.exp(-lower[:k, -1].mean())), 3),
                })
                for i, row in enumerate(exact_rows):
                    last_rows.append({
                        "window_id": int(data.window_ids[row]), "energy": variant,
                        "base_logprob": float(base_tok[i, -1]), "exact_logprob": float(exact[i]),
                        "estimated_logprob_lower": float(lower[i, -1]), "estimated_logprob_upper": float(upper[i, -1]),
                    })
            metrics_positions[variant] = entry
        for j in range(base_tok.shape[1]):
            row = {"position": int(data.prefix_len + j + 1), "base_ppl": float(base_pos[j])}
            for variant, (low, high) in columns.items():
                row[f"{variant}_ppl_low"], row[f"{variant}_ppl_high"] = float(low[j]), float(high[j])
                row[f"{variant}_gain_low"], row[f"{variant}_gain_high"] = float(base_pos[j] - high[j]), float(base_pos[j] - low[j])
            positions_table.append(row)

    metrics = {
        "dataset": dataset,
        "test_windows": N,
        "test_windows_available": available_windows,  # N is evaluate.windows of them, evenly spaced
        "continuation_tokens": tokens,
        "n_eval": n_eval,
        "perplexity": metrics_lm,
        "joint": metrics_joint,
        "positions": metrics_positions,
    }
    samples_table = []
    for i, k in enumerate(counts):
        row = {"samples": k}
        for variant, points in curve.items():
            row[f"{variant}_ppl_low"], row[f"{variant}_ppl_high"] = points[i][1].low, points[i][1].high
        samples_table.append(row)
    return {
        "metrics": metrics,
        "table1": table1_markdown(dataset, rows, tokens, N, n_eval),
        "ppl_vs_samples": samples_table,
        "positions": positions_table,
        "last_position": last_rows,
    }




def _write_outputs(paths: DatasetPaths, result: dict) -> None:
    out = paths.evaluation
    out.mkdir(parents=True, exist_ok=True)
    write_tsv(out / "ppl_vs_samples.tsv", result["ppl_vs_samples"])
    write_tsv(out / "position_ppl.tsv", result["positions"])
    write_tsv(out / "last_position.tsv", result["last_position"])
    write_text(out / "table1.md", result["table1"])
    write_json(out / "metrics.json", {**result["metrics"], "wall_seconds": result["wall_seconds"]})
