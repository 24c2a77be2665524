"""Pools on GPUs and without Ray: what changes with `gpus_per_worker` and `num_workers: 0`.

This machine has no GPU, so a local Ray is started with fake GPU resources: each actor gets
its own GPU id (Ray sets CUDA_VISIBLE_DEVICES), finds no CUDA and computes on the CPU, so its
output must equal the CPU actors' bit for bit. On a real GPU the same code puts the model on
the GPU Ray assigned (`pipeline.core.precision.actor_device`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from pipeline.core.precision import actor_device, pool_device, resolve_dtype
from pipeline.estimation.scoring import score_energies
from pipeline.sampling.negatives import generate_negatives
from tests.conftest import REPO, build_toy_run
from tests.test_negatives import assert_same, save_tiny_lm, settings, split_inputs


@pytest.fixture(scope="module")
def fake_gpu_ray():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_the_device_of_a_pool() -> None:
    import torch

    cpu = torch.device("cpu")
    assert pool_device(0, 1, cpu) == cpu                          # in process: the stage's device
    assert pool_device(2, 0.5, cpu) == torch.device("cuda")        # actors asking for GPUs
    assert pool_device(2, 0, torch.device("cuda")) == cpu          # CPU actors, whatever the driver has
    assert actor_device("cuda") == (torch.device("cuda") if torch.cuda.is_available() else cpu)
    assert resolve_dtype("float32", torch.device("cuda")) == "float32"
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        resolve_dtype("fp16", cpu)


def test_each_gpu_actor_gets_its_own_gpu_and_the_cpu_actors_output(fake_gpu_ray, tmp_path: Path) -> None:
    model_dir = save_tiny_lm(tmp_path / "lm")
    ref = tmp_path / "cpu"
    generate_negatives(model_dir, split_inputs(), ref, settings(num_workers=1, cpus_per_worker=1), progress=False)
    out = tmp_path / "gpu"
    stats = generate_negatives(
        model_dir, split_inputs(), out,
        settings(num_workers=2, cpus_per_worker=1, gpus_per_worker=1, device="cuda"), progress=False,
    )
    assert sorted(w["cuda_visible_devices"] for w in stats["workers"]) == ["0", "1"]
    assert {w["device"] for w in stats["workers"]} == {"cpu"}  # no CUDA here: the model stays on the CPU
    assert_same(out, ref)


def test_energies_on_gpu_actors_equal_the_cpu_actors(fake_gpu_ray, tmp_path: Path) -> None:
    from pipeline.sampling.actor_pool import PoolStats

    root = build_toy_run(tmp_path / "toy")
    windows = np.asarray(np.random.default_rng(0).integers(0, 30, size=(40, 16)), dtype=np.int64)
    energy, tokenizer = root / "models/toy/energy/bit", root / "models/toy/lm/base"
    common = dict(shard_sequences=16, batch_size=8, precision="fp32", cpus_per_worker=1)
    cpu = score_energies(energy, tokenizer, windows, num_workers=1, **common)
    stats = PoolStats()
    gpu = score_energies(energy, tokenizer, windows, num_workers=2, gpus_per_worker=0.5, device="cuda", stats=stats,
                         **common)
    assert len({w["pid"] for w in stats.workers}) == 2 and all(w["cuda_visible_devices"] == "0" for w in stats.workers)
    np.testing.assert_array_equal(gpu, cpu)  # two half-GPU actors share GPU 0


NO_RAY = """
import json, sys
sys.modules["ray"] = None   # `import ray` now raises ImportError
sys.modules["dvc"] = None
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import build_toy_run
from stages import evaluate, generate
from pipeline.sampling.negatives import NegativesSettings, SplitInput, generate_negatives
import numpy as np
root = build_toy_run(Path({root!r}))
ev = evaluate.run("toy", root / "params.yaml", root=root, progress=False)
gen = generate.run("toy", root / "params.yaml", root=root, progress=False)
inputs = {{"train": SplitInput(np.arange(3), np.ones((3, 4), np.int64), 2)}}
neg = generate_negatives(root / "models/toy/lm/base", inputs, root / "negatives",
                         NegativesSettings(new_tokens=3, top_k=0, seed=1, shard_windows=2, batch_samples=8,
                                           num_workers=0), progress=False)
print(json.dumps({{"table1": sorted(ev["perplexity"]), "generated": gen["n_gen"], "rows": neg["rows"],
                  "ray": "ray" in sys.modules and sys.modules["ray"] is not None}}))
"""


def test_stages_with_num_workers_0_never_import_ray(tmp_path: Path) -> None:
    script = NO_RAY.format(tests=str(REPO / "tests"), root=str(tmp_path / "toy"))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"table1": ["balm", "base"], "generated": 6, "rows": 6, "ray": False}
