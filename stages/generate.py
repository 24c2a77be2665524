"""Stage `generate`: Algorithm 1 on the test prefixes, and the sample analyses of §4.3.

For each test prefix the base LM draws n_gen top-k samples (Ray actors), the energy scores
them and the real continuation, and one sample is resampled with probability softmax(−E).
Writes data/<dataset>/generations/generations.parquet (gold, base, joint and worst
continuations with energies and LM log-probs) and results/<dataset>/generation/: metrics.json
(unique n-grams, repetition, log-likelihood density gaps, ESS), unique_ngrams.tsv (Figure 2
right), density_base_lm.tsv and density_joint.tsv (Figure 3), examples.md.

`run_prompt` is the interactive path (`rebm generate <dataset> --prompt …`): the same
models and Algorithm 1 on a user's own text, in this process.
"""

from __future__ import annotations

import hashlib
import textwrap
import time
from pathlib import Path

import numpy as np

from pipeline.config import GenerateConfig, NegativesConfig, TokenizeConfig, load_device, load_section, load_seed
from pipeline.errors import RebmError
from pipeline.io import ArrayCheckpoint, fingerprint, require_model, write_json, write_text, write_tsv
from pipeline.negatives import model_digest
from pipeline.paths import DatasetPaths

ENERGY_STAGES = {"unit": "train_ebm_unit", "bit": "train_ebm_bit", "bit_star": "train_ebm_bit_star"}


def generation_seed(seed: int) -> int:
    """The top-k samples' seed: its own stream, apart from the negatives stage's samples."""
    return int.from_bytes(hashlib.sha256(f"rebm/generate/{seed}".encode()).digest()[:8], "little") >> 1



def run(
    dataset: str, params: Path, root: Path = Path("."), ray_address: str | None = None, progress: bool = True
) -> dict:
    from transformers import AutoTokenizer

    from pipeline.energy import input_markers
    from pipeline.evaluation import evenly_spaced
    from pipeline.generation import generations_table, select_generations, write_generations
    from pipeline.lm import load_lm
    from pipeline.negatives import SampleJob, run_sample_jobs
    from pipeline.perplexity import continuation_logprobs
    from pipeline.scoring import score_energies
    from pipeline.tokenization import read_windows
    from pipeline.precision import resolve_precision
    from pipeline.training import resolve_device

    started = time.perf_counter()
    cfg = load_section(GenerateConfig, "generate", params)
    tok = load_section(TokenizeConfig, "tokenize", params)
    neg = load_section(NegativesConfig, "negatives", params)
    seed, device = load_seed(params), resolve_device(load_device(params))
    cfg = cfg.model_copy(update={"precision": resolve_precision(cfg.precision, device)})  # auto -> fp32 | bf16
    paths = DatasetPaths(dataset, root)
    p, T = tok.prefix_len, tok.seq_len
    lm_dir = require_model(paths.lm("base"), f"train_lm_base@{dataset}")
    energy_dir = require_model(paths.energy(cfg.energy), f"{ENERGY_STAGES[cfg.energy]}@{dataset}")

    all_ids, all_windows = read_windows(paths.windows_split("test"))
    rows = evenly_spaced(cfg.windows, len(all_ids)) if cfg.windows else np.arange(len(all_ids))
    window_ids, windows = all_ids[rows], np.ascontiguousarray(all_windows[rows], dtype=np.int64)
    W, n = len(window_ids), cfg.n_gen
    checkpoint = ArrayCheckpoint(paths.generation_checkpoint)
    data_key = fingerprint(seed, p, T, window_ids, windows, cfg.n_gen, cfg.top_k, cfg.shard_windows,
                           neg.batch_samples, neg.dtype, model_digest(lm_dir))
    wall: dict[str, float] = {}

    t0 = time.perf_counter()
    gold_lp = continuation_logprobs(load_lm(lm_dir, device), windows, p, cfg.batch_size, device).sum(axis=1)
    wall["gold_logprobs"] = time.perf_counter() - t0

    from pipeline.actor_pool import ray_session_if

    with ray_session_if(cfg.num_workers > 0, ray_address, cfg.num_workers * cfg.cpus_per_worker):
        t0 = time.perf_counter()
        samples = checkpoint.load("samples", data_key)
        if samples is None:
            samples = {"tokens": np.empty((W, n, T - p), np.int64), "logprob": np.empty((W, n))}
            jobs = [
                SampleJob(start, window_ids[start : start + cfg.shard_windows],
                          np.ascontiguousarray(windows[start : start + cfg.shard_windows, :p]), n, T - p,
                          generation_seed(seed))
                for start in range(0, W, cfg.shard_windows)
            ]

            def done(job: SampleJob, result: dict) -> None:
                samples["tokens"][job.key : job.key + len(job.window_ids)] = result["tokens"]
                samples["logprob"][job.key : job.key + len(job.window_ids)] = result["logprob"]

            run_sample_jobs(lm_dir, jobs, done, top_k=cfg.top_k, batch_samples=neg.batch_samples, dtype=neg.dtype,
                            num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
                            desc=f"{dataset}: top-{cfg.top_k} LM samples", progress=progress)
            checkpoint.save("samples", data_key, **samples)
        wall["sampling"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        energy_key = fingerprint(data_key, model_digest(energy_dir), cfg.precision, cfg.batch_size, cfg.shard_sequences)
        energies = checkpoint.load("energies", energy_key)
        if energies is None:
            sample_windows = np.concatenate(
                [np.broadcast_to(windows[:, None, :p], (W, n, p)), samples["tokens"]], axis=-1
            ).reshape(W * n, T)
            from tqdm import tqdm

            with tqdm(total=W * (n + 1), unit="seq", desc=f"{dataset}: energies ({cfg.energy})",
                      disable=not progress) as bar:
                e = score_energies(
                    energy_dir, paths.tokenizer, np.concatenate([windows, sample_windows]),
                    shard_sequences=cfg.shard_sequences, batch_size=cfg.batch_size, precision=cfg.precision,
                    num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, on_progress=bar.update,
                )
            energies = {"gold": e[:W], "samples": e[W:].reshape(W, n)}
            checkpoint.save("energies", energy_key, **energies)
        wall["energies"] = time.perf_counter() - t0

    lm_tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    selection = select_generations(energies["samples"], window_ids, seed)
    table = generations_table(
        window_ids, windows[:, :p], windows[:, p:], energies["gold"], gold_lp,
        samples["tokens"], energies["samples"], samples["logprob"], selection,
        decode=lambda ids: lm_tokenizer.decode(list(ids)),
    )
    write_generations(paths.generations_file, table)
    metrics = _write_analyses(paths, table, cfg, dataset)
    metrics["energy_input_markers"] = input_markers(energy_dir, paths.tokenizer)
    wall["stage"] = time.perf_counter() - started
    metrics["wall_seconds"] = {k: round(v, 1) for k, v in wall.items()}
    write_json(paths.generation_results / "metrics.json", metrics)
    checkpoint.discard()
    return metrics



def _write_analyses(paths: DatasetPaths, table, cfg: GenerateConfig, dataset: str) -> dict:
    from pipeline.sample_analysis import density_summary, loglik_by_source, sample_metrics, unique_ngram_rows

    out = paths.generation_results
    out.mkdir(parents=True, exist_ok=True)
    ids = {s: table.column(f"{c}_ids").to_pylist() for s, c in (("real", "gold"), ("base", "base"), ("joint", "joint"))}
    write_tsv(out / "unique_ngrams.tsv", unique_ngram_rows(ids))
    for scorer in ("base_lm", "joint"):
        write_tsv(out / f"density_{scorer}.tsv", density_summary(loglik_by_source(table, scorer), cfg.density_bins).rows)
    write_text(out / "examples.md", examples_markdown(dataset, table, cfg))
    return {
        "dataset": dataset,
        "energy": cfg.energy,
        "n_gen": cfg.n_gen,
        "top_k": cfg.top_k,
        **sample_metrics(table),
    }



def examples_markdown(dataset: str, table, cfg: GenerateConfig, count: int = 3) -> str:
    """A few prefixes with their gold, base-LM, joint and worst continuations (paper Tables 5–6)."""
    from pipeline.evaluation import DISPLAY_NAMES, evenly_spaced

    joint_name = DISPLAY_NAMES[cfg.energy]
    lines = [f"### Example generations — {dataset} ({joint_name}, {cfg.n_gen} top-{cfg.top_k} samples per prefix)", ""]
    data = table.to_pydict()
    for i in evenly_spaced(count, table.num_rows):
        lines += [f"**Prefix** (window {data['window_id'][i]}): …{data['prefix_text'][i][-400:]}", "",
                  "| model | continuation | energy | LM log-prob |", "|---|---|---|---|"]
        for key, name in (("gold", "Gold"), ("base", "BASE LM"), ("joint", joint_name), ("worst", "worst LM sample")):
            text = data[f"{key}_text"][i].replace("|", "\\|").replace("\n", " ⏎ ")
            lines.append(f"| {name} | {text} | {data[f'{key}_energy'][i]:.3f} | {data[f'{key}_lm_logprob'][i]:.2f} |")
        lines.append("")
    return "\n".join(lines)


def run_prompt(dataset: str, params: Path, prompt: str, root: Path = Path("."), n_gen: int | None = None,
               seed: int | None = None) -> dict:
    """Algorithm 1 for a user's text: the base-LM sample and the joint sample, in this process."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.energy import EnergyScorer, load_energy
    from pipeline.generation import select_generations
    from pipeline.lm import load_lm
    from pipeline.sampling import Sampler
    from pipeline.scoring import score_windows
    from pipeline.training import resolve_device

    cfg = load_section(GenerateConfig, "generate", params)
    tok = load_section(TokenizeConfig, "tokenize", params)
    seed = load_seed(params) if seed is None else seed
    device = resolve_device(load_device(params))
    paths = DatasetPaths(dataset, root)
    lm_dir = require_model(paths.lm("base"), f"train_lm_base@{dataset}")
    energy_dir = require_model(paths.energy(cfg.energy), f"{ENERGY_STAGES[cfg.energy]}@{dataset}")
    if not prompt.strip():
        raise RebmError("--prompt: the prompt is empty")
    n = n_gen or cfg.n_gen
    lm_tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    prefix = lm_tokenizer(prompt)["input_ids"][-tok.prefix_len:]  # the models were trained on p-token prefixes
    new_tokens = tok.seq_len - tok.prefix_len
    window_id = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:7], "little")  # seeds this prompt's draws
    lm = load_lm(lm_dir, device)
    out = Sampler(lm, top_k=cfg.top_k).sample(np.array([prefix]), np.array([window_id]), n, new_tokens, generation_seed(seed))
    model, body_tokenizer = load_energy(energy_dir)
    scorer = EnergyScorer(model.to(device).eval(), body_tokenizer, lm_tokenizer)
    full = np.concatenate([np.repeat(np.array([prefix]), n, 0), out.tokens[0].astype(np.int64)], axis=1)
    with torch.no_grad():
        energies = score_windows(scorer, full, cfg.batch_size, cfg.precision)
    selection = select_generations(energies[None], np.array([window_id]), seed)
    pick = {"base": int(selection.base_index[0]), "joint": int(selection.joint_index[0])}
    return {
        "prompt_tokens_used": len(prefix),
        "samples": n,
        "energy": cfg.energy,
        "ess": float(selection.ess[0]),
        **{f"{k}_text": lm_tokenizer.decode(out.tokens[0, i].tolist()) for k, i in pick.items()},
        **{f"{k}_energy": float(energies[i]) for k, i in pick.items()},
        **{f"{k}_lm_logprob": float(out.logprob[0, i]) for k, i in pick.items()},
    }


def side_by_side(result: dict, width: int = 48) -> str:
    """The base-LM and joint continuations in two columns, for the terminal."""
    left = textwrap.wrap(result["base_text"], width) or [""]
    right = textwrap.wrap(result["joint_text"], width) or [""]
    rows = max(len(left), len(right))
    left += [""] * (rows - len(left))
    right += [""] * (rows - len(right))
    header = [
        f"{'BASE LM (top-k sample)':<{width}} | JOINT ({result['energy']}, resampled from {result['samples']}, "
        f"ESS {result['ess']:.1f})",
        f"{'E = %.3f, log P_LM = %.2f' % (result['base_energy'], result['base_lm_logprob']):<{width}} | "
        f"E = {result['joint_energy']:.3f}, log P_LM = {result['joint_lm_logprob']:.2f}",
        "-" * width + "-+-" + "-" * width,
    ]
    return "\n".join(header + [f"{a:<{width}} | {b}" for a, b in zip(left, right)])
