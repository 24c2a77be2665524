from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.core import precision as prec

CPU = torch.device("cpu")


def cpuinfo(tmp_path: Path, flags: str, key: str = "flags") -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\n{key}\t\t: {flags}\n\nprocessor\t: 1\n")
    return path


@pytest.mark.parametrize(
    ("key", "flags", "native"),
    [
        ("flags", "fpu sse2 avx avx2 fma", False),  # AVX2-only EPYC: bf16 is emulated
        ("flags", "avx2 avx512f avx512_bf16", True),
        ("flags", "avx2 amx_tile amx_bf16 amx_int8", True),
        ("Features", "fp asimd sve bf16 i8mm", True),  # Arm
        ("flags", "avx512bf16x", False),  # whole flags only, not substrings
    ],
)
def test_cpu_bf16_units_are_read_from_cpuinfo(tmp_path: Path, key: str, flags: str, native: bool) -> None:
    assert prec.cpuinfo_lists_bf16(cpuinfo(tmp_path, flags, key)) is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path: Path) -> None:
    assert prec.cpuinfo_lists_bf16(tmp_path / "missing") is False


def test_auto_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    assert prec.resolve_precision("auto", CPU) == "fp32"
    with prec.autocast(CPU, "auto"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    assert prec.resolve_precision("auto", CPU) == "bf16"
    with prec.autocast(CPU, "auto"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16


def test_explicit_choices_are_kept_and_emulated_bf16_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    assert prec.resolve_precision("fp32", CPU) == "fp32"
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert prec.resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        prec.resolve_precision("fp16", CPU)


def test_params_reject_an_unknown_precision(tmp_path: Path) -> None:
    from pipeline.core.config import EvaluateConfig, load_section
    from pipeline.core.errors import RebmError

    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  precision: fp16\n")
    with pytest.raises(RebmError, match=r"evaluate\.precision"):
        load_section(EvaluateConfig, "evaluate", params)
    params.write_text("evaluate:\n  precision: auto\n")
    assert load_section(EvaluateConfig, "evaluate", params).precision == "auto"


AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # an AVX2 EPYC's view of this CPU


@pytest.mark.parametrize("env", [{}, AVX2_ONLY], ids=["this-cpu", "avx2-only"])
def test_native_bf16_needs_the_flags_and_onednn(env: dict) -> None:
    """The rule per CPU kind: bf16 is native only where /proc/cpuinfo lists bf16 units and oneDNN
    uses them. With oneDNN capped at AVX2 (what an AVX2-only EPYC is), `auto` is fp32 whatever the
    flags say; uncapped, `auto` is bf16 exactly where the flags list bf16 units."""
    import os
    import subprocess
    import sys

    code = ("from pipeline.core import precision as p; import torch; "
            "print(p.cpuinfo_lists_bf16(), p.onednn_runs_bf16(), p.resolve_precision('auto', torch.device('cpu')))")
    done = subprocess.run([sys.executable, "-c", code], env=os.environ | env, capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    flags, onednn, auto = done.stdout.split()
    if env:
        assert (onednn, auto) == ("False", "fp32")
    else:
        assert auto == ("bf16" if flags == onednn == "True" else "fp32")
