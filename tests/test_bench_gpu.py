"""`rebm bench gpu` (pipeline/tools/bench_gpu.py) as a CPU dry run, on a bare interpreter.

The GPU machine has torch and transformers but neither pydantic, Ray, DVC, datasets nor typer,
so the check must import none of them: the test blocks them and runs the module's own entry
point on the toy project, shrunk with --scale.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PREFIX, REPO, build_toy_run
from tests.test_precision import AVX2_ONLY

BARE = """
import sys
for name in ("pydantic", "ray", "dvc", "datasets", "typer"):
    sys.modules[name] = None   # `import name` raises ImportError, as on the GPU machine
from pipeline.tools.bench_gpu import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("cpu_env", [{}, AVX2_ONLY], ids=["this-cpu", "avx2-only"])
def test_gpu_check_runs_without_the_pipelines_other_dependencies(tmp_path: Path, cpu_env: dict) -> None:
    """On both CPU kinds the check times training in the precision `auto` picks there (bf16 on a CPU
    with bf16 units, fp32 on an AVX2-only one, simulated by capping oneDNN) against the matmul peak
    of that precision, so the fraction of peak is a fraction."""
    root = build_toy_run(tmp_path / "toy")
    out = tmp_path / "gpu.json"
    args = ["--windows", str(root / "data/toy/windows/test.parquet"), "--lm", str(root / "models/toy/lm/base"),
            "--energy", str(root / "models/toy/energy/bit"), "--device", "cpu", "--samples", "3200",
            "--n-windows", "2", "--prefix-len", str(PREFIX), "--scale", "0.02", "--json", str(out)]
    done = subprocess.run([sys.executable, "-c", BARE, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=os.environ | cpu_env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["train"]["tokens_per_s"] > 0
    if cpu_env:
        assert report["precision"] == "fp32"
    assert 0 < report["train"]["fraction_of_peak"] < 1
    assert report["train"]["measurement_error"] is None
    assert [row["n"] for row in report["sample"]] == [1, 2] and all(r["ratio"] > 0 for r in report["sample"])
    assert report["agreement"]["sampler_logprob_max_abs_diff"] < 1e-4   # CPU against CPU: the same forward
    table = report["table1"]
    assert table["samples_per_prefix"] == 64 and table["joint_ppl_low"] <= table["joint_ppl_high"]
    assert table["verdict"] in ("converged at n = 64", "not converged at n = 64")
    assert "table 1" in done.stdout and "agreement" in done.stdout
    assert f"of the {report['precision']} matmul peak" in done.stdout and "MEASUREMENT ERROR" not in done.stdout
