"""`rebm bench train` reports fractions of a peak measured in the same precision as the work,
and flags a fraction above 1 instead of printing it as a result (issue 24)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.tools.throughput import peak_fraction
from tests.conftest import REPO
from tests.test_precision import AVX2_ONLY


def test_a_rate_above_the_measured_peak_is_flagged() -> None:
    assert peak_fraction(50.0, 100.0) == {"fraction_of_peak": 0.5, "measurement_error": None}
    # The AVX2 EPYC's case: bf16 autocast Linear at 18 GFLOP/s against an emulated bf16 matmul at 4.
    over = peak_fraction(18.0, 4.0)
    assert over["fraction_of_peak"] == 4.5 and "does not describe this work" in over["measurement_error"]
    assert peak_fraction(1.0, 0.0)["measurement_error"] is not None


BENCH = """
import json, sys
from pathlib import Path
from pipeline.tools.bench import train_benchmark
print(json.dumps(train_benchmark(Path(sys.argv[1]), steps=1, warmup=1)))
"""


@pytest.mark.parametrize("cpu_env", [{}, AVX2_ONLY], ids=["this-cpu", "avx2-only"])
def test_train_benchmark_times_the_precision_the_pipeline_uses(cpu_env: dict) -> None:
    """Rule per CPU kind: on a CPU with bf16 units both precisions are timed and bf16 is what the
    pipeline uses; on an AVX2-only CPU (oneDNN capped at AVX2) only fp32 is, and bf16 is said to be
    skipped. Either way the pipeline's own precision gets a fraction of its own peak in (0, 1]."""
    done = subprocess.run([sys.executable, "-c", BENCH, str(REPO / "params.yaml")], cwd=REPO, capture_output=True,
                          text=True, env=os.environ | cpu_env | {"OMP_NUM_THREADS": "2"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    own = report["pipeline_precision"]
    if cpu_env:
        assert own == "fp32" and list(report["train"]) == ["fp32"] and "bf16_skipped" in report
    else:
        assert list(report["train"]) == (["fp32", "bf16"] if own == "bf16" else ["fp32"])
    timed = report["train"][own]
    assert 0 < timed["fraction_of_own_peak"] <= 1 and timed["measurement_error"] is None
    assert set(report["matmul_peak_gflops"]) == set(report["train"])
