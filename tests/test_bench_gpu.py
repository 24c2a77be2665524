"""`rebm bench gpu` (pipeline/tools/bench_gpu.py) as a CPU dry run, on a bare interpreter.

The GPU machine has torch and transformers but neither pydantic, Ray, DVC, datasets nor typer,
so the check must import none of them: the test blocks them and runs the module's own entry
point on the toy project, shrunk with --scale.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import PREFIX, REPO, build_toy_run

BARE = """
import sys
for name in ("pydantic", "ray", "dvc", "datasets", "typer"):
    sys.modules[name] = None   # `import name` raises ImportError, as on the GPU machine
from pipeline.tools.bench_gpu import main
main(sys.argv[1:])
"""


def test_gpu_check_runs_without_the_pipelines_other_dependencies(tmp_path: Path) -> None:
    root = build_toy_run(tmp_path / "toy")
    out = tmp_path / "gpu.json"
    args = ["--windows", str(root / "data/toy/windows/test.parquet"), "--lm", str(root / "models/toy/lm/base"),
            "--energy", str(root / "models/toy/energy/bit"), "--device", "cpu", "--samples", "3200",
            "--n-windows", "2", "--prefix-len", str(PREFIX), "--scale", "0.02", "--json", str(out)]
    done = subprocess.run([sys.executable, "-c", BARE, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["train"]["tokens_per_s"] > 0
    assert 0 < report["train"]["fraction_of_peak"] < 1
    assert [row["n"] for row in report["sample"]] == [1, 2] and all(r["ratio"] > 0 for r in report["sample"])
    assert report["agreement"]["sampler_logprob_max_abs_diff"] < 1e-4   # CPU against CPU: the same forward
    table = report["table1"]
    assert table["samples_per_prefix"] == 64 and table["joint_ppl_low"] <= table["joint_ppl_high"]
    assert table["verdict"] in ("converged at n = 64", "not converged at n = 64")
    assert "table 1" in done.stdout and "agreement" in done.stdout
