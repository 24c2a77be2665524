"""Stage `negatives` on Ray: determinism across workers, faults, resume, a two-node cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.data.tokenization import SPLIT_ID_BASE, WINDOWS_SCHEMA
from pipeline.sampling.actor_pool import ray_session
from pipeline.sampling.negatives import (
    NEGATIVES_SCHEMA,
    NegativesSettings,
    SplitInput,
    generate_negatives,
    read_negatives,
)
from pipeline.sampling.sampler import full_forward_logprobs
from tests.conftest import REPO

VOCAB, P, L = 96, 10, 6
N = {"train": 5, "test": 9}
WINDOWS = {"train": 18, "test": 7}
SETTINGS = dict(new_tokens=L, top_k=0, seed=2020, shard_windows=4, batch_samples=12)


def settings(**run) -> NegativesSettings:
    """SETTINGS plus where the sampling runs (num_workers, cpus_per_worker, …)."""
    return NegativesSettings(**SETTINGS, **run)


def save_tiny_lm(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def windows(split: str) -> np.ndarray:
    rng = np.random.default_rng(len(split))
    return rng.integers(0, VOCAB, size=(WINDOWS[split], P + L))


def split_inputs() -> dict[str, SplitInput]:
    return {
        s: SplitInput(SPLIT_ID_BASE[s] + np.arange(WINDOWS[s], dtype=np.int64), windows(s)[:, :P], N[s])
        for s in WINDOWS
    }


def shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("*/shard-*.parquet"))


def contents(out: Path) -> dict[str, pa.Table]:
    return {s: read_negatives(out / s) for s in WINDOWS}


def assert_same(out: Path, ref: Path) -> None:
    assert [p.relative_to(out) for p in shard_files(out)] == [p.relative_to(ref) for p in shard_files(ref)]
    for s, table in contents(out).items():
        assert table.equals(contents(ref)[s]), f"split {s} differs"


@pytest.fixture(scope="module")
def local_ray():
    with ray_session(num_cpus=2) as session:
        yield session


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "base")


@pytest.fixture(scope="module")
def reference(local_ray, model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The output of ONE worker: what every other run must reproduce bit for bit.

    Workers have a fixed CPU quantum (cpus_per_worker = torch threads): GEMM results can
    differ in the last bit between 1 and 2 threads, so scaling is by adding workers.
    """
    out = tmp_path_factory.mktemp("ref") / "negatives"
    stats = generate_negatives(model_dir, split_inputs(), out, settings(num_workers=1, cpus_per_worker=1),
                               progress=False)
    return out, stats


def test_exact_counts_and_log_probs_of_the_output(reference, model_dir) -> None:
    out, stats = reference
    assert stats["shards_total"] == 5 + 2 and stats["shards_computed"] == 7
    assert stats["workers"][0]["threads"] == 1 and stats["workers"][0]["path"] == "gpt2-shared-prefix"
    assert [p.name for p in sorted((out / "train").iterdir())] == [f"shard-0000{i}.parquet" for i in range(5)]
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    for split, inp in split_inputs().items():
        table = read_negatives(out / split)
        assert table.schema.equals(NEGATIVES_SCHEMA)
        pairs = list(zip(table.column("window_id").to_pylist(), table.column("sample_idx").to_pylist(), strict=True))
        assert len(pairs) == len(set(pairs)) == WINDOWS[split] * N[split]
        assert sorted(pairs) == [(w, i) for w in inp.window_ids.tolist() for i in range(N[split])]
        tokens = np.array(table.column("token_ids").to_pylist()).reshape(WINDOWS[split], N[split], L)
        token_lp = np.array(table.column("lm_token_logprobs").to_pylist()).reshape(tokens.shape)
        np.testing.assert_allclose(token_lp, full_forward_logprobs(model, inp.prefixes, tokens), atol=2e-5)
        np.testing.assert_allclose(table.column("lm_logprob").to_numpy(), token_lp.sum(-1).ravel(), atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["test"]["rows"] == 7 * 9


def test_two_workers_write_the_same_bytes_as_one(reference, model_dir, tmp_path) -> None:
    ref, _ = reference
    out = tmp_path / "negatives"
    stats = generate_negatives(model_dir, split_inputs(), out, settings(num_workers=2, cpus_per_worker=1),
                               progress=False)
    assert len({w["pid"] for w in stats["workers"]}) == 2 and {w["threads"] for w in stats["workers"]} == {1}
    assert_same(out, ref)


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_worker_killed_mid_run_is_replaced_and_its_shards_redone(reference, model_dir, tmp_path, how) -> None:
    ref, _ = reference
    out = tmp_path / "negatives"
    killed = []

    def kill_first_worker(shard, pool) -> None:
        if not killed:  # the first worker still holds a shard in flight when the first one lands
            if how == "ray.kill":
                ray.kill(pool.actors[0], no_restart=False)
            else:
                os.kill(pool.info[0]["pid"], signal.SIGKILL)
            killed.append(shard.index)

    stats = generate_negatives(
        model_dir, split_inputs(), out, settings(num_workers=2, cpus_per_worker=1), progress=False,
        on_shard_done=kill_first_worker,
    )
    assert killed and stats["actor_failures"] >= 1 and stats["resubmissions"] >= 1
    assert stats["shards_computed"] == 7
    assert_same(out, ref)  # complete, no duplicates, identical to an undisturbed run


class Interrupted(Exception):
    pass


def test_resume_keeps_finished_shards_and_computes_only_the_missing(reference, model_dir, tmp_path) -> None:
    ref, _ = reference
    out = tmp_path / "negatives"
    done = []

    def interrupt_after_three(shard, pool) -> None:
        done.append(shard.path)
        if len(done) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        generate_negatives(
            model_dir, split_inputs(), out, settings(num_workers=2, cpus_per_worker=1), progress=False,
            on_shard_done=interrupt_after_three,
        )
    assert sorted(shard_files(out)) == sorted(done)
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    time.sleep(0.01)
    stats = generate_negatives(model_dir, split_inputs(), out, settings(num_workers=2, cpus_per_worker=1),
                               progress=False)
    assert (stats["shards_reused"], stats["shards_computed"]) == (3, 4)
    assert stats["rows_computed"] == stats["rows"] - sum(pq.read_metadata(p).num_rows for p in done)
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes  # not rewritten
    assert_same(out, ref)


def test_damaged_stale_or_foreign_shards_are_recomputed(reference, model_dir, tmp_path) -> None:
    ref, _ = reference
    out = tmp_path / "negatives"
    shutil.copytree(ref, out)
    (out / "train" / "shard-00001.parquet").unlink()
    damaged = out / "train" / "shard-00002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    # a complete, valid-looking shard whose rows belong to another window set (wrong ids)
    pq.write_table(pq.read_table(out / "train" / "shard-00000.parquet"), out / "test" / "shard-00001.parquet")
    (out / "train" / "shard-00099.parquet").write_bytes(b"left by an older run")
    (out / "train" / ".shard-00003.parquet.tmp-abcd1234").write_bytes(b"killed mid-write")
    (out / "valid").mkdir()  # a split no longer configured
    stats = generate_negatives(model_dir, split_inputs(), out, settings(num_workers=2, cpus_per_worker=1),
                               progress=False)
    assert (stats["shards_reused"], stats["shards_computed"]) == (4, 3)
    assert not (out / "valid").exists() and not (out / "train" / "shard-00099.parquet").exists()
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"shard-0000{i}.parquet" for i in range(5)]
    assert_same(out, ref)

    # Other params or another model: no shard may be reused (checked on the plan, no sampling).
    from pipeline.sampling.negatives import (
        SamplingSpec,
        model_fingerprint,
        plan_shards,
        read_model_files,
        shard_is_valid,
    )

    def plan(model: Path, **change) -> list:
        spec = SamplingSpec(**{"n": N["train"], "new_tokens": L, "top_k": 0, "seed": 2020, "batch_samples": 12,
                               **change})
        inp = split_inputs()["train"]
        fp = model_fingerprint(read_model_files(model))
        return plan_shards("train", inp, spec, SETTINGS["shard_windows"], fp, out)

    assert all(shard_is_valid(s) for s in plan(model_dir))
    other_lm = save_tiny_lm(tmp_path / "lm2", seed=1)
    for change in ({"seed": 7}, {"top_k": 4}, {"n": 4}, {"batch_samples": 24}, {"dtype": "bfloat16"}):
        assert not any(shard_is_valid(s) for s in plan(model_dir, **change)), change
    assert not any(shard_is_valid(s) for s in plan(other_lm))
    inp = split_inputs()["train"]
    shifted = SplitInput(inp.window_ids, inp.prefixes + 1 - VOCAB * (inp.prefixes == VOCAB - 1), inp.n)
    moved = plan_shards("train", shifted, plan(model_dir)[0].spec, 4, model_fingerprint(read_model_files(model_dir)),
                        out)
    assert not any(shard_is_valid(s) for s in moved)  # same window ids, other prefixes (re-tokenised)


def make_project(root: Path, model_dir: Path) -> Path:
    """A project directory with params.yaml, windows and a base LM, as the stage expects."""
    wdir = root / "data" / "tiny" / "windows"
    wdir.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        w = windows(split) if split in WINDOWS else np.zeros((2, P + L), dtype=np.int64)
        ids = SPLIT_ID_BASE[split] + np.arange(len(w))
        table = pa.table({"window_id": ids, "doc_id": [f"d{i}" for i in ids], "input_ids": w.tolist()})
        pq.write_table(table.cast(WINDOWS_SCHEMA), wdir / f"{split}.parquet")
    shutil.copytree(model_dir, root / "models" / "tiny" / "lm" / "base")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seed"] = SETTINGS["seed"]
    params["tokenize"].update(prefix_len=P, seq_len=P + L, stride=8)
    params["negatives"].update(
        samples={"tiny": N}, top_k=0, shard_windows=SETTINGS["shard_windows"],
        batch_samples=SETTINGS["batch_samples"], num_workers=2, cpus_per_worker=1,
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


def test_stage_reads_params_windows_and_model(reference, model_dir, tmp_path) -> None:
    from stages import negatives as stage

    ref, _ = reference
    params = make_project(tmp_path, model_dir)
    summary = stage.run("tiny", params, root=tmp_path, progress=False)
    assert summary["rows"] == 18 * 5 + 7 * 9 and summary["splits"]["test"]["n"] == 9
    assert json.loads((tmp_path / "data/tiny/negatives_stats.json").read_text())["rows"] == summary["rows"]
    assert summary["new_tokens_per_second"] > 0
    assert_same(tmp_path / "data/tiny/negatives", ref)


def test_stage_streams_the_windows_a_row_group_at_a_time_and_caps_them(reference, model_dir, tmp_path,
                                                                       monkeypatch) -> None:
    """The stage never holds a split: it decodes one row group of the windows file at a time (here
    3 of the 18 train windows), never calls the whole-split reader, and `negatives.windows` keeps
    the first N windows of each split; those shards are the in-memory run's, bit for bit, and the
    NCE data built from them holds exactly those windows."""
    import pipeline.data.tokenization as tokenization
    from pipeline.training.ebm_data import load_nce_data
    from stages import negatives as stage

    ref, _ = reference
    params = make_project(tmp_path, model_dir)
    train = tmp_path / "data/tiny/windows/train.parquet"
    for split in ("train", "test"):
        path = tmp_path / f"data/tiny/windows/{split}.parquet"
        pq.write_table(pq.read_table(path), path, row_group_size=3)  # shards of 4 span two
    raw = yaml.safe_load(params.read_text())
    raw["negatives"].update(num_workers=0, windows=10)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))

    decoded = []
    read_row_group = pq.ParquetFile.read_row_group

    def counting(self, *args, **kwargs):
        table = read_row_group(self, *args, **kwargs)
        decoded.append(table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    monkeypatch.setattr(tokenization, "read_windows", lambda *a: pytest.fail("the whole split was read"))
    summary = stage.run("tiny", params, root=tmp_path, progress=False)
    assert summary["splits"]["train"] == {"windows": 10, "n": 5, "rows": 50}
    assert summary["splits"]["test"]["windows"] == 7  # fewer than the cap: all of them
    assert max(decoded) == 3  # a row group at a time, of 18 + 7 windows
    out = tmp_path / "data/tiny/negatives"
    for name in ("shard-00000.parquet", "shard-00001.parquet"):  # windows 0-7: the same shards as uncapped
        assert pq.read_table(out / "train" / name).equals(pq.read_table(ref / "train" / name))
    assert read_negatives(out / "train").column("window_id").to_numpy().max() == SPLIT_ID_BASE["train"] + 9

    data = load_nce_data(train, out / "train", P, scratch=tmp_path)
    assert len(data) == 10 and data.samples_per_prefix == 5
    assert data.ids(np.arange(10)).tolist() == (SPLIT_ID_BASE["train"] + np.arange(10)).tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    ports = [
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
    ]
    return subprocess.Popen(
        [ray_bin, "start", "--block", "--num-cpus=1", "--object-store-memory=100000000", *ports, *args],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop_node(proc: subprocess.Popen) -> None:
    """Stop one node we started (its own process group), never every Ray process on the machine."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"ray start exited:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"ray start did not report {text!r}:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.mark.ray
@pytest.mark.slow
def test_two_node_cluster_on_loopback_matches_local_run(reference, model_dir, tmp_path) -> None:
    import tempfile

    ref, _ = reference
    params = make_project(tmp_path / "project", model_dir)
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rebm-ray-", dir="/tmp")  # AF_UNIX socket paths must stay short
    nodes = []
    try:
        head_log, worker_log = tmp_path / "head.log", tmp_path / "worker.log"
        nodes.append(start_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                                 "--include-dashboard=false", "--ray-client-server-port", str(free_port()),
                                 "--temp-dir", temp_dir], head_log))
        wait_for_log(nodes[0], head_log, "Ray runtime started")
        nodes.append(start_node([f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1"], worker_log))
        wait_for_log(nodes[1], worker_log, "Ray runtime started")
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-m", "stages.cli", "negatives", "tiny", "--params", str(params)],
            cwd=tmp_path / "project", env=env, capture_output=True, text=True, timeout=180,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
    summary = json.loads((tmp_path / "project/data/tiny/negatives_stats.json").read_text())
    assert summary["ray"] == "cluster"
    # Each node offers one CPU and each actor needs one: the two workers ran on two nodes.
    assert len({w["pid"] for w in summary["workers"]}) == 2
    assert_same(tmp_path / "project/data/tiny/negatives", ref)
