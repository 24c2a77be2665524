"""What a device can do and what a model costs: the measurements every benchmark shares.

Only torch and transformers: the GPU check (`pipeline.tools.bench_gpu`) imports this on a
machine without the pipeline's other dependencies.
"""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls of a resolved precision ("fp32" | "bf16") run in."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def peak_fraction(achieved_gflops: float, peak_gflops: float) -> dict:
    """achieved / peak, with `measurement_error` set when it is not in (0, 1]: a rate above the
    measured peak means the peak was measured in a way the work did not run (an emulated dtype,
    a clock that changed between the two), never that the hardware beat its own peak."""
    fraction = achieved_gflops / peak_gflops if peak_gflops > 0 else float("inf")
    out = {"fraction_of_peak": round(fraction, 4), "measurement_error": None}
    if not 0 < fraction <= 1:
        out["measurement_error"] = (f"achieved {achieved_gflops:,.1f} GFLOP/s against a measured peak of "
                                    f"{peak_gflops:,.1f}: the peak measurement does not describe this work")
    return out


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Best observed GFLOP/s of an n x n matrix multiply (2 n^3 flops) in `dtype` on `device`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best, spent = 0.0, 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        a @ b
        sync(device)
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
