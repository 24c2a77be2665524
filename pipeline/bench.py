"""Throughput benchmarks (`rebm bench ...`): what this machine achieves against what it could.

Each benchmark is a separate function with its own section below; they share only the
matrix-multiply peak measurement.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.config import (
    LMVariantConfig,
    RalmConfig,
    TokenizeConfig,
    load_device,
    load_section,
    load_subsection,
)
from pipeline.errors import RebmError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- shared: matmul peak
def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Best observed GFLOP/s of an n x n matrix multiply (2 n^3 flops) in `dtype` on `device`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best, spent = 0.0, 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2 * n**3 / dt / 1e9)
    return best


# --------------------------------------------------------------------------- training benchmark
def lm_flops_per_token(config, seq_len: int, backward: bool = True) -> float:
    """Matmul flops per token of a GPT-2-style LM: 2 flops per weight (blocks + output head) and
    4·L·d·T for attention scores and values, forward; training (forward + backward) is 3x that."""
    d, n_layer, vocab = config.n_embd, config.n_layer, config.vocab_size
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    block_params = sum(p.numel() for p in model.transformer.h.parameters())
    forward = 2 * (block_params + vocab * d) + 4 * n_layer * d * seq_len
    return forward * (3 if backward else 1)


def _bench_model(params: Path, variant: str, vocab_size: int, seq_len: int):
    """(model, flops per token, optimisation config) for a `train_lm` variant, randomly initialised."""
    from pipeline.lm import ResidualLM, build_gpt2, gpt2_config

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
    return build_gpt2(cfg.arch, vocab_size, 0), lm_flops_per_token(gpt2_config(cfg.arch, vocab_size, 0), seq_len), cfg.optim


def train_benchmark(params: Path, variant: str = "base", steps: int = 5, warmup: int = 2) -> dict:
    """Training tokens/s and achieved GFLOP/s of a `train_lm` variant, in fp32 and bf16 autocast,
    against the matrix-multiply peak of each dtype measured in the same run."""
    from pipeline.training import optimizer_for, resolve_device

    if steps < 1:
        raise RebmError("bench train: --steps must be at least 1")
    device = resolve_device(load_device(params))
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
        "torch_threads": torch.get_num_threads(),
        "batch_size": optim.batch_size,
        "seq_len": seq_len,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_gflop_per_token": flops_per_token / 1e9,
        "timed_steps": steps,
        "matmul_peak_gflops": {},
        "train": {},
    }
    for name, dtype in PRECISIONS.items():
        report["matmul_peak_gflops"][name] = round(matmul_peak_gflops(device, dtype), 1)
    for name, dtype in PRECISIONS.items():
        optimizer = optimizer_for(model, optim)
        times = []
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]  # median
        gflops = flops_per_token * tokens_per_step / step_s / 1e9
        report["train"][name] = {
            "step_seconds": round(step_s, 4),
            "tokens_per_s": round(tokens_per_step / step_s, 1),
            "achieved_gflops": round(gflops, 1),
            "fraction_of_own_peak": round(gflops / report["matmul_peak_gflops"][name], 3),
            "fraction_of_fp32_peak": round(gflops / report["matmul_peak_gflops"]["fp32"], 3),
        }
    report["bf16_speedup"] = round(report["train"]["fp32"]["step_seconds"] / report["train"]["bf16"]["step_seconds"], 3)
    return report
