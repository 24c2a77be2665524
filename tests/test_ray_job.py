"""docs/cluster.md, run on loopback: `ray job submit` to a running Ray head, code shipped with the job.

A Ray head with its dashboard (the job server) is started in its own process group. A job
is submitted with a working_dir holding a script and a copy of `pipeline/`, as
`--working-dir .` ships a checkout's code. The script opens `ray_session()`, which must attach to the
cluster through the $RAY_ADDRESS the job supervisor sets (not start a local Ray), and scores
a toy energy model with `score_energies` on two actors, so the model's bytes go through the
object store and `pipeline` reaches the actors via ray_session's py_modules. The energies
must equal the in-process ones.

Cleanup stops only this head: its process group, then any process whose command line names
this test's Ray temp dir. Not `ray stop`, which stops every Ray process of the user on the
machine, other sessions' included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, energy_model

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SEQ, N_WINDOWS, SHARD = 16, 12, 4  # 3 shards over 2 actors

JOB = textwrap.dedent('''\
    """A Ray job: attach with ray_session ($RAY_ADDRESS from the job supervisor), score on 2 actors."""
    import json
    import os
    import sys

    import numpy as np

    import pipeline
    from pipeline.estimation.scoring import score_energies
    from pipeline.sampling.actor_pool import PoolStats, ray_session

    energy_dir, tokenizer_dir, windows_file, out, shard = sys.argv[1:6]
    ray_address = os.environ.get("RAY_ADDRESS")
    with ray_session(num_cpus=1) as session:  # num_cpus only matters for a local Ray
        stats, shards = PoolStats(), []
        energies = score_energies(energy_dir, tokenizer_dir, np.load(windows_file), shard_sequences=int(shard),
                                  batch_size=4, precision="fp32", num_workers=2, stats=stats,
                                  on_progress=shards.append)
        info = {"session": session, "ray_address": ray_address, "pipeline": pipeline.__file__,
                "workers": stats.workers, "shards": shards}
    np.save(os.path.join(out, "energies.npy"), energies)
    with open(os.path.join(out, "job.json"), "w") as f:
        json.dump(info, f)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_energy(root: Path) -> tuple[Path, Path, np.ndarray]:
    """A random BIT-style energy with its tokenizer, the LM tokenizer, and windows to score."""
    import torch
    from transformers import BertConfig, BertModel

    from pipeline.data.tokenization import train_bpe_tokenizer

    tok = train_bpe_tokenizer([f"word{i} and more words {i % 7}" for i in range(200)], vocab_size=300,
                              min_frequency=1)
    torch.manual_seed(0)
    body = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32))
    energy_dir, tokenizer_dir = root / "energy", root / "tokenizer"
    energy_model(body, "bit", 60.0).save_pretrained(energy_dir)
    tok.save_pretrained(energy_dir)
    tok.save_pretrained(tokenizer_dir)
    windows = np.random.default_rng(0).integers(1, len(tok), (N_WINDOWS, SEQ))
    return energy_dir, tokenizer_dir, windows


def wait_for_job_server(head: subprocess.Popen, log: Path, url: str, token: str, agent_port: int,
                        timeout: float = 90) -> None:
    """Until the dashboard answers /api/version and the node's dashboard agent (which runs the
    jobs) listens: 'Ray runtime started' comes well before either."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited:\n{log.read_text(errors='replace')[-3000:]}"
        try:
            with urllib.request.urlopen(request, timeout=2) as reply, \
                    socket.create_connection(("127.0.0.1", agent_port), timeout=2):
                if reply.status == 200:
                    return
        except OSError:  # refused, or 401/5xx while the dashboard starts
            pass
        time.sleep(0.5)
    raise AssertionError(f"the Ray job server at {url} did not come up:\n{log.read_text(errors='replace')[-3000:]}")


def processes_naming(text: str) -> list[int]:
    """Pids whose command line contains `text` (this test's Ray temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def stop_head(head: subprocess.Popen, temp_dir: str) -> list[int]:
    """Stop the head's process group, then kill whatever else still names its temp dir.
    Returns the stragglers that had to be killed."""
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)  # nothing to save: don't wait out Ray's graceful shutdown
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
    deadline = time.monotonic() + 15
    while processes_naming(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    stragglers = processes_naming(temp_dir)
    for pid in stragglers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stragglers


def test_ray_job_submit_attaches_through_ray_session(tmp_path: Path) -> None:
    from pipeline.estimation.scoring import score_energies

    energy_dir, tokenizer_dir, windows = toy_energy(tmp_path)
    np.save(tmp_path / "windows.npy", windows)
    expected = score_energies(energy_dir, tokenizer_dir, windows, shard_sequences=SHARD, batch_size=4,
                              precision="fp32", num_workers=0)

    # The job's working_dir: the script and the library, as `--working-dir .` ships a checkout.
    job_dir, out = tmp_path / "job", tmp_path / "out"
    job_dir.mkdir()
    out.mkdir()
    (job_dir / "score_job.py").write_text(JOB)
    shutil.copytree(REPO / "pipeline", job_dir / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))

    venv_bin = str(Path(sys.executable).parent)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "RAY_AUTH_TOKEN_PATH")}
    env |= {
        "PATH": venv_bin + os.pathsep + env.get("PATH", ""),  # `python` in the entrypoint is this environment's
        "RAY_USAGE_STATS_ENABLED": "0",  # no reporting attempt (no network)
        # Ray 2.60's head turns token auth on when ~/.ray/auth_token exists, a file this user's
        # other Ray sessions share: explicit mode and a token of its own keep this cluster apart.
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
    }
    port, dashboard, agent_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{dashboard}"
    temp_dir = tempfile.mkdtemp(prefix="rebm-rayjob-", dir="/tmp")  # AF_UNIX socket paths must stay short
    # Every port named: the defaults (6379, 8265, 52365 …) may belong to another Ray on this machine.
    ports = [f"--{name}={free_port()}" for name in (
        "node-manager-port", "object-manager-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")] + [f"--dashboard-agent-listen-port={agent_port}"]
    log = tmp_path / "head.log"
    head = subprocess.Popen(
        [str(Path(venv_bin) / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=2", "--object-store-memory=100000000", f"--temp-dir={temp_dir}", *ports],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_job_server(head, log, url, token, agent_port)
        job = subprocess.run(
            [str(Path(venv_bin) / "ray"), "job", "submit", "--address", url, "--working-dir", str(job_dir),
             "--", "python", "score_job.py", str(energy_dir), str(tokenizer_dir), str(tmp_path / "windows.npy"),
             str(out), str(SHARD)],
            env=env, capture_output=True, text=True, timeout=240,
        )
    finally:
        stragglers = stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert job.returncode == 0, f"ray job submit failed:\n{job.stdout[-6000:]}\n{job.stderr[-3000:]}"
    assert "succeeded" in job.stdout, job.stdout[-3000:]
    assert not stragglers, f"processes of the test's Ray outlived its head: {stragglers}"

    info = json.loads((out / "job.json").read_text())
    # ray_session attached to this head via the job's $RAY_ADDRESS rather than starting a Ray of its own.
    assert info["ray_address"] and info["ray_address"].endswith(f":{port}"), info
    assert info["session"] == {"address": info["ray_address"], "cpus": 2.0}, info
    # The job imported the copy shipped in its working_dir (unpacked under the head's temp dir).
    assert info["pipeline"].startswith(temp_dir), info["pipeline"]
    assert info["shards"] == [SHARD] * (N_WINDOWS // SHARD)
    assert len({w["pid"] for w in info["workers"]}) == 2
    # Same shards, same numerics: a 1-thread actor and this process agree to float rounding.
    np.testing.assert_allclose(np.load(out / "energies.npy"), expected, rtol=1e-6, atol=1e-6)
