"""`rebm bench gpu`: one short check of the pipeline's heavy parts on one CUDA device.

From data it is given (a windows file, the base LM and an energy model that travel with the
working tree), it prints:

    train      LM training tokens/s and the fraction of the matmul peak measured in the same
               run, both in the precision the pipeline uses on the device
               (`resolve_precision("auto", device)`: bf16 on GPUs and bf16 CPUs, fp32 on an
               AVX2-only CPU, where bf16 is emulated and its "peak" is 1 GFLOP/s)
    sample     new tokens/s of the shared-prefix sampler against `generate` at n = 16 and 128
    score      energy scoring sequences/s of a BERT body of all-MiniLM-L6-v2's shape (random
               weights: MiniLM's 90 MB do not travel), in that precision
    agreement  the device against the CPU on the same input: sampler log-probs (the device's
               own, against a CPU fp32 forward of the same tokens) and energies
    table 1    a joint perplexity range from `samples` full-distribution LM samples on a few
               test windows, with the convergence verdict of `pipeline.estimation.convergence`

It imports only torch, transformers, numpy and pyarrow (no pydantic, Ray or DVC), so it runs on
a bare GPU machine: `python -m stages.cli bench gpu ...` from a copy of the working tree.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.precision import autocast, resolve_precision
from pipeline.tools.throughput import lm_flops_per_token, matmul_dtype, matmul_peak_gflops, peak_fraction, sync

MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512)


def _timed(device: torch.device, fn, repeats: int = 1) -> float:
    """Best wall seconds of `repeats` calls of fn() (after one warm-up call)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def train_throughput(lm_dir: Path, device: torch.device, precision: str, batch: int, seq_len: int,
                     steps: int) -> dict:
    """Tokens/s of AdamW steps on a random init of the base LM's architecture in `precision`, and
    the fraction of the matmul peak of that precision's dtype on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(lm_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)

    def step() -> None:
        for _ in range(steps):
            with autocast(device, precision):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    seconds = _timed(device, step)
    tokens_per_s = steps * batch * (seq_len - 1) / seconds
    peak = matmul_peak_gflops(device, matmul_dtype(precision))
    achieved = tokens_per_s * lm_flops_per_token(config, seq_len) / 1e9
    return {"tokens_per_s": round(tokens_per_s), "achieved_gflops": round(achieved, 1),
            "matmul_peak_gflops": round(peak, 1), **peak_fraction(achieved, peak),
            "batch": batch, "seq_len": seq_len, "parameters": sum(p.numel() for p in model.parameters())}


def sample_throughput(model, prefixes: np.ndarray, ids: np.ndarray, n: int, new_tokens: int,
                      batch_samples: int) -> dict:
    """New tokens/s of the pipeline's sampler against `generate` (full distribution, same n)."""
    from pipeline.sampling.sampler import Sampler

    device = next(model.parameters()).device
    sampler = Sampler(model, top_k=0, batch_samples=batch_samples)
    ours = _timed(device, lambda: sampler.sample(prefixes, ids, n, new_tokens, seed=1))
    inputs = torch.from_numpy(np.repeat(prefixes, n, axis=0)).to(device)

    def generate() -> None:
        with torch.inference_mode():
            for start in range(0, len(inputs), batch_samples):
                model.generate(input_ids=inputs[start : start + batch_samples], do_sample=True, top_k=0,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    theirs = _timed(device, generate)
    tokens = len(prefixes) * n * new_tokens
    return {"n": n, "path": sampler.path, "sampler_tokens_per_s": round(tokens / ours),
            "generate_tokens_per_s": round(tokens / theirs), "ratio": round(theirs / ours, 2)}


def score_throughput(device: torch.device, precision: str, batch: int, seq_len: int, batches: int) -> dict:
    """Sequences/s of an energy on a random BERT body of MiniLM's shape in `precision`."""
    from transformers import BertConfig, BertModel

    from pipeline.models.energy import EnergyModel

    torch.manual_seed(0)
    energy = EnergyModel.from_body(BertModel(BertConfig(**MINILM_SHAPE)), "bit").to(device).eval()
    ids = torch.randint(0, MINILM_SHAPE["vocab_size"], (batch, seq_len), device=device)
    mask = torch.ones_like(ids)

    def score() -> None:
        with torch.inference_mode(), autocast(device, precision):
            for _ in range(batches):
                energy(input_ids=ids, attention_mask=mask)

    seconds = _timed(device, score)
    return {"sequences_per_s": round(batch * batches / seconds), "batch": batch, "seq_len": seq_len,
            "parameters": sum(p.numel() for p in energy.parameters())}


def agreement(lm_cpu, lm_dev, energy_cpu, energy_dev, prefixes: np.ndarray, ids: np.ndarray, windows: np.ndarray,
              new_tokens: int, precision: str) -> dict:
    """Max |device − CPU| of sampler log-probs and of energies on the same input."""
    from pipeline.sampling.sampler import Sampler, full_forward_logprobs

    drawn = Sampler(lm_dev, top_k=0, batch_samples=256).sample(prefixes, ids, 16, new_tokens, seed=3)
    cpu_lp = full_forward_logprobs(lm_cpu, prefixes, drawn.tokens.astype(np.int64))
    rows = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    with torch.inference_mode():
        e_cpu = energy_cpu(input_ids=rows).double().numpy()
        with autocast(next(energy_dev.parameters()).device, precision):
            e_dev = energy_dev(input_ids=rows.to(next(energy_dev.parameters()).device)).double().cpu().numpy()
    return {"sampler_logprob_max_abs_diff": float(np.abs(drawn.token_logprobs - cpu_lp).max()),
            "sequence_logprob_max_abs_diff": float(np.abs(drawn.logprob - cpu_lp.astype(np.float64).sum(-1)).max()),
            "energy_max_abs_diff": float(np.abs(e_dev - e_cpu).max()), "energy_scale": float(np.abs(e_cpu).mean())}


def table1_range(lm, energy, windows: np.ndarray, ids: np.ndarray, prefix_len: int, samples: int,
                 batch_samples: int, score_batch: int, precision: str) -> dict:
    """A joint perplexity range (Eq. 4 / Theorem 2) from `samples` LM samples per test prefix."""
    from pipeline.estimation.bounds import log_partition_bounds
    from pipeline.estimation.convergence import convergence_verdict
    from pipeline.estimation.joint import joint_nll_given_log_z, perplexity_range
    from pipeline.sampling.sampler import Sampler, full_forward_logprobs

    device = next(energy.parameters()).device
    W, T = windows.shape
    L = T - prefix_len
    sampler = Sampler(lm, top_k=0, batch_samples=batch_samples)
    log_weights = np.empty((W, samples))
    t0 = time.perf_counter()
    for w in range(W):
        drawn = sampler.sample(windows[w : w + 1, :prefix_len], ids[w : w + 1], samples, L, seed=11)
        full = np.concatenate([np.repeat(windows[w : w + 1, :prefix_len], samples, 0),
                               drawn.tokens[0].astype(np.int64)], axis=1)
        for start in range(0, samples, score_batch):
            batch = torch.from_numpy(full[start : start + score_batch]).to(device)
            with torch.inference_mode(), autocast(device, precision):
                log_weights[w, start : start + len(batch)] = -energy(input_ids=batch).double().cpu().numpy()
    sync(device)
    seconds = time.perf_counter() - t0
    lm_lp = full_forward_logprobs(lm, windows[:, :prefix_len], windows[:, None, prefix_len:])[:, 0].astype(np.float64)
    with torch.inference_mode(), autocast(device, precision):
        real_e = energy(input_ids=torch.from_numpy(np.ascontiguousarray(windows)).to(device)).double().cpu()
    low_z, high_z = log_partition_bounds(torch.from_numpy(log_weights))
    low, high = joint_nll_given_log_z(torch.from_numpy(lm_lp.sum(-1)), real_e, low_z, high_z)
    ppl_low, ppl_high = perplexity_range(low, high, W * L)
    verdict = convergence_verdict(log_weights, epsilon=0.2, min_samples=64)
    return {"windows": W, "samples_per_prefix": samples, "base_ppl": round(math.exp(-lm_lp.sum() / (W * L)), 3),
            "joint_ppl_low": round(ppl_low, 3), "joint_ppl_high": round(ppl_high, 3), "verdict": verdict.label,
            "reason": verdict.reason, "seconds": round(seconds, 1),
            "sequences_per_s": round(W * samples / seconds)}


def gpu_check(windows_file: Path, lm_dir: Path, energy_dir: Path, device: str = "auto", samples: int = 20000,
              windows: int = 4, prefix_len: int = 120, scale: float = 1.0) -> dict:
    """Every part of the module docstring; `scale` < 1 shrinks batches and counts (a CPU dry run)."""
    from transformers import AutoModelForCausalLM

    from pipeline.core.precision import resolve_device
    from pipeline.data.tokenization import read_windows
    from pipeline.models.energy import load_energy

    started = time.perf_counter()
    dev = resolve_device(device)
    ids, all_windows = read_windows(Path(windows_file))
    rows = np.linspace(0, len(ids) - 1, min(windows, len(ids))).round().astype(int)
    test_ids, test_windows = ids[rows], np.ascontiguousarray(all_windows[rows], dtype=np.int64)
    T = test_windows.shape[1]

    def big(k: int) -> int:
        return max(1, int(k * scale))

    lm_cpu = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    lm_dev = AutoModelForCausalLM.from_pretrained(lm_dir).to(dev).eval()
    energy_cpu = load_energy(energy_dir)[0].eval()
    energy_dev = load_energy(energy_dir)[0].to(dev).eval()
    precision = resolve_precision("auto", dev)
    report = {"device": str(dev), "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "precision": precision}
    report["train"] = train_throughput(lm_dir, dev, precision, batch=big(256), seq_len=T, steps=big(10))
    prefixes = test_windows[:, :prefix_len]
    report["sample"] = [sample_throughput(lm_dev, prefixes, test_ids, big(n), T - prefix_len, big(8192))
                        for n in (16, 128)]
    report["score"] = score_throughput(dev, precision, batch=big(1024), seq_len=T, batches=big(20))
    report["agreement"] = agreement(lm_cpu, lm_dev, energy_cpu, energy_dev, prefixes, test_ids, test_windows,
                                    T - prefix_len, precision)
    report["table1"] = table1_range(lm_dev, energy_dev, test_windows, test_ids, prefix_len, big(samples),
                                    big(8192), big(16384), precision)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report


def format_report(r: dict) -> str:
    t, a, tab, s = r["train"], r["agreement"], r["table1"], r["score"]
    lines = [f"GPU check on {r['device']} ({r['name']}), torch {r['torch']}, precision {r['precision']} "
             "(what `precision: auto` runs on this device)",
             f"  train     {t['tokens_per_s']:,} tokens/s, {t['achieved_gflops']:,.0f} GFLOP/s = "
             f"{100 * t['fraction_of_peak']:.1f} % of the {r['precision']} matmul peak measured here "
             f"({t['matmul_peak_gflops']:,.0f} GFLOP/s); batch {t['batch']} x {t['seq_len']}"]
    if t["measurement_error"]:
        lines.append(f"  MEASUREMENT ERROR (train): {t['measurement_error']}")
    for row in r["sample"]:
        lines.append(f"  sample    n = {row['n']}: sampler {row['sampler_tokens_per_s']:,} new tokens/s "
                     f"({row['path']}), generate {row['generate_tokens_per_s']:,}: ratio {row['ratio']}x")
    lines += [f"  score     {s['sequences_per_s']:,} sequences/s "
              f"(BERT of MiniLM's shape, {s['parameters'] / 1e6:.1f}M, "
              f"{r['precision']}, batch {s['batch']} x {s['seq_len']})",
              f"  agreement sampler token log-probs max |device - cpu| {a['sampler_logprob_max_abs_diff']:.2e}, "
              f"sequence {a['sequence_logprob_max_abs_diff']:.2e}; energies {a['energy_max_abs_diff']:.2e} "
              f"(mean |E| {a['energy_scale']:.3f})",
              f"  table 1   {tab['windows']} windows x {tab['samples_per_prefix']:,} samples: base LM "
              f"{tab['base_ppl']:.2f}, joint {tab['joint_ppl_low']:.2f}-{tab['joint_ppl_high']:.2f}, "
              f"{tab['verdict']} ({tab['reason']}); {tab['sequences_per_s']:,} sampled+scored sequences/s",
              f"  wall      {r['wall_seconds']} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.tools.bench_gpu`: the same check without the CLI's dependencies (typer's
    adapters import pydantic), for a bare GPU machine."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.bench_gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=Path, default=Path("data/news/windows/test.parquet"))
    parser.add_argument("--lm", type=Path, default=Path("models/news/lm/base"))
    parser.add_argument("--energy", type=Path, default=Path("models/news/energy/bit"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--n-windows", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=120)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = gpu_check(args.windows, args.lm, args.energy, args.device, args.samples, args.n_windows,
                       args.prefix_len, args.scale)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_report(report))


if __name__ == "__main__":
    main()
