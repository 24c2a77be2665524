"""Where and in which float format the matrix multiplies run in: `auto`, `fp32` or `bf16` (params `precision`).

bf16 autocast is the paper's mixed precision on GPUs, and on CPUs with bf16 matrix units
(AVX512-BF16, AMX, Arm BF16) it roughly halves step time (`rebm bench train`: 2.08x on an
AVX512-BF16 machine). On a CPU without them PyTorch emulates bf16: measured on a 2-core AVX2
EPYC, a 1024² matmul ran at 0.8 GFLOP/s against 119 in fp32, and a base-LM training step
took 31 s instead of 2 s. So the default, `auto`, asks the hardware, and an explicit `bf16`
on such a CPU warns.

"The hardware" is two answers that must agree: the CPU's flags (/proc/cpuinfo) and oneDNN, the
library that runs PyTorch's CPU matmuls. oneDNN honours ONEDNN_MAX_CPU_ISA, so
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` on a bf16 Xeon behaves like an AVX2-only
EPYC (measured: bf16 matmul 1.0 GFLOP/s, fp32 283) and this module says fp32 there too; the
test suite uses that to check both CPU kinds on one machine.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]

# /proc/cpuinfo flags of CPUs that run bf16 matmuls natively (x86: AVX512-BF16, AMX; Arm: BF16).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpuinfo_lists_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True if the CPU advertises bf16 matrix instructions (False where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in {"flags", "features"} and NATIVE_BF16_CPU_FLAGS & set(value.split()):
            return True
    return False


def onednn_runs_bf16() -> bool:
    """oneDNN's own answer: False under ONEDNN_MAX_CPU_ISA below AVX-512 (or on a CPU without it).
    True where this torch build does not expose the check, leaving the answer to /proc/cpuinfo."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


@functools.cache
def cpu_has_native_bf16() -> bool:
    """bf16 matmuls run natively on this CPU: its flags list bf16 units and oneDNN will use them."""
    return cpuinfo_lists_bf16() and onednn_runs_bf16()


def device_has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """`auto` -> bf16 where `device` computes it natively, else fp32; `fp32` / `bf16` as given."""
    if precision == "auto":
        return "bf16" if device_has_native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "precision: bf16 on a CPU without bf16 matrix units is emulated and far slower than fp32; "
            "use precision: auto (or fp32)",
            RuntimeWarning,
            stacklevel=2,
        )
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `precision` resolves to bf16, else a no-op context."""
    enabled = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def pool_device(num_workers: int, gpus_per_worker: float, stage_device: torch.device) -> torch.device:
    """Where a pool's work runs: the stage's device in this process (num_workers 0), the GPU Ray
    assigns each actor when the pool asks for GPUs, else the actors' CPUs. Precision and dtype
    `auto` are resolved for this device on the driver, so they are part of what keys the work."""
    if num_workers == 0:
        return stage_device
    return torch.device("cuda") if gpus_per_worker > 0 else torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> Literal["float32", "bfloat16"]:
    """A model's weights dtype: `auto` -> bfloat16 where `device` computes it natively, else float32."""
    if dtype == "auto":
        return "bfloat16" if device_has_native_bf16(device) else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return dtype


def actor_device(name: str) -> torch.device:
    """Inside a pool worker: `name` ("cuda" for a GPU actor) if CUDA is there, else the CPU.

    Ray makes the GPU it assigned visible as the only one, so "cuda" is that GPU. On a machine
    without CUDA (or a test with fake GPU resources) the work runs on the CPU.
    """
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """What a run's numbers depend on besides its seed: the CPU model, its cores, and the precision
    `auto` resolves to there (bf16 on AMX / AVX512-BF16, fp32 on AVX2-only CPUs)."""
    import os

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "model name":
                model = value.strip()
                break
    device = resolve_device("auto")
    return {"cpu": model, "cores": os.cpu_count(), "device": str(device),
            "precision_auto": resolve_precision("auto", device)}
