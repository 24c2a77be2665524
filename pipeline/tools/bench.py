"""Throughput benchmarks (`rebm bench ...`): what this machine achieves against what it could.

Each benchmark is a separate function with its own section below; they share only the
matrix-multiply peak measurement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.config import (
    LMVariantConfig,
    OptimConfig,
    RalmConfig,
    TokenizeConfig,
    load_device,
    load_section,
    load_subsection,
)
from pipeline.core.errors import RebmError
from pipeline.tools.throughput import lm_flops_per_token, matmul_dtype, matmul_peak_gflops, peak_fraction, sync


def _bench_model(params: Path, variant: str, vocab_size: int, seq_len: int):
    """(model, flops per token, optimisation config) for a `train_lm` variant, randomly initialised."""
    from pipeline.models.lm import ResidualLM, build_gpt2, gpt2_config

    if variant == "ralm":
        base_cfg = load_subsection(LMVariantConfig, "train_lm.base", params)
        cfg = load_subsection(RalmConfig, "train_lm.ralm", params)
        if base_cfg.arch is None:
            raise RebmError("bench train --variant ralm: needs train_lm.base.arch (a from-scratch base)")
        model = ResidualLM.from_parts(build_gpt2(base_cfg.arch, vocab_size, 0), build_gpt2(cfg.arch, vocab_size, 0))
        flops = lm_flops_per_token(gpt2_config(base_cfg.arch, vocab_size, 0), seq_len, backward=False)
        flops += lm_flops_per_token(gpt2_config(cfg.arch, vocab_size, 0), seq_len)
        return model, flops, cfg.optim
    if variant not in ("base", "balm"):
        raise RebmError(f"bench train: unknown variant '{variant}' (base, balm or ralm)")
    cfg = load_subsection(LMVariantConfig, f"train_lm.{variant}", params)
    if cfg.arch is None:
        raise RebmError(f"bench train: train_lm.{variant} loads `init`; benchmark a from-scratch arch instead")
    model = build_gpt2(cfg.arch, vocab_size, 0)
    return model, lm_flops_per_token(gpt2_config(cfg.arch, vocab_size, 0), seq_len), cfg.optim


def benchmarked_precisions(requested: str, device: torch.device) -> tuple[str, ...]:
    """`auto`: fp32 and bf16 where the device computes bf16 natively (the bf16 speed-up is the
    number), fp32 alone where bf16 is emulated (its steps take ~15x longer and its matmul "peak"
    is ~1 GFLOP/s, no peak at all); `fp32`, `bf16` or `fp32,bf16` as asked."""
    from pipeline.core.precision import resolve_precision

    if requested == "auto":
        return ("fp32", "bf16") if resolve_precision("auto", device) == "bf16" else ("fp32",)
    chosen = tuple(part.strip() for part in requested.split(","))
    if not chosen or any(part not in ("fp32", "bf16") for part in chosen):
        raise RebmError(f"bench train: --precision must be auto, fp32, bf16 or fp32,bf16, got {requested!r}")
    return chosen


def train_benchmark(params: Path, variant: str = "base", steps: int = 5, warmup: int = 2,
                    precision: str = "auto") -> dict:
    """Training tokens/s and achieved GFLOP/s of a `train_lm` variant in each precision of
    `benchmarked_precisions`, against the matrix-multiply peak of that precision's dtype measured
    in the same run. `pipeline_precision` is what `precision: auto` trains in on this device."""
    from pipeline.core.precision import resolve_device, resolve_precision
    from pipeline.training.loop import optimizer_for

    if steps < 1:
        raise RebmError("bench train: --steps must be at least 1")
    device = resolve_device(load_device(params))
    precisions = benchmarked_precisions(precision, device)
    tok = load_section(TokenizeConfig, "tokenize", params)
    vocab_size, seq_len = tok.vocab_size, tok.seq_len
    torch.manual_seed(0)
    model, flops_per_token, optim = _bench_model(params, variant, vocab_size, seq_len)
    model.to(device).train()
    batch = torch.randint(0, vocab_size, (optim.batch_size, seq_len), device=device)
    tokens_per_step = optim.batch_size * (seq_len - 1)

    report: dict = {
        "variant": variant,
        "device": str(device),
        "pipeline_precision": resolve_precision("auto", device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": optim.batch_size,
        "seq_len": seq_len,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_gflop_per_token": flops_per_token / 1e9,
        "timed_steps": steps,
        "matmul_peak_gflops": {},
        "train": {},
    }
    for name in dict.fromkeys(("fp32", *precisions)):  # fp32's peak is every fraction's common yardstick
        report["matmul_peak_gflops"][name] = round(matmul_peak_gflops(device, matmul_dtype(name)), 1)
    for name in precisions:
        optimizer = optimizer_for(model, optim)
        times = []
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]  # median
        gflops = flops_per_token * tokens_per_step / step_s / 1e9
        own = peak_fraction(gflops, report["matmul_peak_gflops"][name])
        report["train"][name] = {
            "step_seconds": round(step_s, 4),
            "tokens_per_s": round(tokens_per_step / step_s, 1),
            "achieved_gflops": round(gflops, 1),
            "fraction_of_own_peak": own["fraction_of_peak"],
            "fraction_of_fp32_peak": round(gflops / report["matmul_peak_gflops"]["fp32"], 3),
            "measurement_error": own["measurement_error"],
        }
    if "bf16" in report["train"]:
        fp32_seconds, bf16_seconds = (report["train"][p]["step_seconds"] for p in ("fp32", "bf16"))
        report["bf16_speedup"] = round(fp32_seconds / bf16_seconds, 3)
    elif precision == "auto":
        report["bf16_skipped"] = ("bf16 is emulated on this device (pipeline_precision fp32); "
                                  "--precision fp32,bf16 times it")
    return report


# --------------------------------------------------------------------------- data-parallel training benchmark
def _bench_lm_loss(device: torch.device, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    batch = batch.to(device, non_blocking=True)
    return model(input_ids=batch, labels=batch).loss, batch.shape[0] * (batch.shape[1] - 1)


def _no_validation(model: torch.nn.Module) -> float:
    return 0.0


def data_parallel_benchmark(params: Path, variant: str = "base", workers: int = 2, steps: int = 5,
                            warmup: int = 2) -> dict:
    """Training tokens/s of a `train_lm` variant on 1 worker (the plain single process: the
    baseline) and on `workers` Ray Train workers: same model, same initial weights, same global
    batch (`optim.batch_size`), through the pipeline's own loop (`pipeline.training.trainer.train`).

    The baseline gets the N-worker run's CPU budget as torch threads (workers x cpus_per_worker);
    a reference single process with one worker's threads (cpus_per_worker) is timed too, which
    separates the data-parallel split from how well one process uses several threads. Each run
    takes `warmup + steps` steps on random windows; the step time is the median of the last
    `steps` as the loop measures it (forward, backward, gradient all-reduce, clip, AdamW; no
    validation or checkpointing); `wall_seconds` adds start-up (for Ray: the worker group).
    `train_loss_mean` (over all steps) is the same across rows up to float rounding when the
    model has no dropout (dropout masks are drawn per worker) and runs in fp32 (bf16 rounds
    each worker's partial gradient sums).
    Opens its own Ray session for the N-worker run (RAY_ADDRESS, else a local Ray).
    """
    from pipeline.core.precision import resolve_device, resolve_precision

    if workers < 2:
        raise RebmError("bench train: --workers must be at least 2 to compare with the 1-worker baseline")
    if steps < 1:
        raise RebmError("bench train: --steps must be at least 1")
    device = resolve_device(load_device(params))
    tok = load_section(TokenizeConfig, "tokenize", params)
    vocab_size, seq_len = tok.vocab_size, tok.seq_len
    torch.manual_seed(0)
    model, _, optim = _bench_model(params, variant, vocab_size, seq_len)
    data = torch.randint(0, vocab_size, (optim.batch_size * 4, seq_len), generator=torch.Generator().manual_seed(0))
    bench = _DataParallelBench(model, data, optim, device, seq_len, steps, warmup + steps)

    per_worker = optim.cpus_per_worker
    budget = workers * per_worker
    report: dict = {
        "variant": variant,
        "batch_size": optim.batch_size,
        "seq_len": seq_len,
        "precision": resolve_precision(optim.precision, device),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "timed_steps": steps,
        "baseline": "workers_1",
        "runs": {"workers_1": _timed_run(bench, 1, budget),
                 f"workers_{workers}": _timed_run(bench, workers, per_worker)},
    }
    if per_worker != budget:
        report["runs"][f"reference_workers_1_threads_{per_worker}"] = _timed_run(bench, 1, per_worker)
    base, scaled = report["runs"]["workers_1"], report["runs"][f"workers_{workers}"]
    report["speedup_vs_baseline"] = round(scaled["tokens_per_s"] / base["tokens_per_s"], 3)
    return report


@dataclass(frozen=True)
class _DataParallelBench:
    """What every run of `data_parallel_benchmark` shares: the model, its data and settings."""

    model: torch.nn.Module  # the initial weights, copied for each run
    data: torch.Tensor  # [rows, seq_len] random token ids
    optim: OptimConfig  # the variant's optim section
    device: torch.device
    seq_len: int
    steps: int  # timed steps
    total_steps: int  # warmup + timed steps

    def config(self, n: int) -> OptimConfig:
        """The variant's optim section for `n` workers, `total_steps` steps, no validation or checkpoint."""
        total = self.total_steps
        try:
            return OptimConfig.model_validate({
                **self.optim.model_dump(), "workers": n, "grad_accum": 1, "max_steps": total,
                "warmup_steps": min(self.optim.warmup_steps, total - 1), "eval_every": total + 1,
                "checkpoint_every": total + 1,
            })
        except ValueError as exc:
            raise RebmError(f"bench train --workers {n}: {exc}") from None


def _timed_run(bench: _DataParallelBench, n: int, threads: int) -> dict:
    """One training run on `n` workers of `threads` torch threads each, timed."""
    import copy
    import functools
    import tempfile

    from pipeline.training.distributed import cluster_for, training_device
    from pipeline.training.loop import ShuffledBatches
    from pipeline.training.trainer import train

    cfg = bench.config(n)
    run_device = training_device(cfg, bench.device)
    replica = copy.deepcopy(bench.model).to(bench.device)  # the same initial weights for every run
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="rebm-bench-dp-") as tmp, cluster_for(cfg):
            result = train(
                replica, functools.partial(_bench_lm_loss, run_device),
                functools.partial(ShuffledBatches, bench.data, cfg.batch_size, 0), _no_validation, cfg,
                checkpoint_dir=Path(tmp), seed=0, device=run_device, desc=f"bench {n} worker(s)",
            )
    finally:
        torch.set_num_threads(saved_threads)
    wall = time.perf_counter() - started
    steps = bench.steps
    step_s = sorted(result.step_seconds[-steps:])[steps // 2]
    return {
        "workers": n,
        "device": str(run_device),
        "torch_threads_per_worker": threads,
        "rows_per_worker_per_step": cfg.batch_size // n,
        "step_seconds": round(step_s, 4),
        "tokens_per_s": round(bench.optim.batch_size * (bench.seq_len - 1) / step_s, 1),
        "train_loss_mean": round(result.curve[-1]["train_loss"], 6),
        "wall_seconds": round(wall, 1),
    }
