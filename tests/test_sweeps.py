"""docs/experiments.md, run: a sweep queued with `dvc exp run --queue -S`, run by `dvc queue start`.

A tiny DVC project (one cheap stage that reads the energy's learning rate and writes a
metric) queues two experiments, runs the queue with one worker, and finds both in
`dvc exp show --json` with their param and metric; then `dvc exp apply` and `dvc exp push`
as the page shows them. The queue's Celery worker is a detached process: it is stopped and
waited for whatever happens, so nothing outlives the test.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_command as run

pytestmark = pytest.mark.slow

KEY = "train_ebm.bit_star.optim.max_lr"  # the example of docs/experiments.md
SWEEP = {"lr-1e-4": 0.0001, "lr-5e-4": 0.0005}

TRAIN = textwrap.dedent("""\
    import json
    import yaml
    lr = yaml.safe_load(open("params.yaml"))["train_ebm"]["bit_star"]["optim"]["max_lr"]
    json.dump({"nce_loss": round(1 / (1 + 1000 * lr), 6)}, open("metrics.json", "w"))
""")

DVC_YAML = {"stages": {"train": {"cmd": "python train.py", "deps": ["train.py"], "params": [KEY],
                                 "metrics": [{"metrics.json": {"cache": False}}]}}}


def loss(lr: float) -> float:
    return round(1 / (1 + 1000 * lr), 6)


def experiments(project: Path, env: dict[str, str]) -> dict[str, dict]:
    """name -> {state, lr, metrics} of every experiment of HEAD in `dvc exp show --json`."""
    rows = json.loads(run(["dvc", "exp", "show", "--json", "--no-pager"], project, env))
    found = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            data = exp["revs"][0]["data"]
            params = data["params"]["params.yaml"]["data"]
            found[exp["name"]] = {
                "state": (exp.get("executor") or {}).get("state"),
                "lr": params["train_ebm"]["bit_star"]["optim"]["max_lr"],
                "metrics": (data["metrics"].get("metrics.json") or {}).get("data"),
            }
    return found


def queue_workers(project: Path) -> list[int]:
    """Pids of the queue's Celery workers (dvc-task writes one info file per worker it spawns)."""
    celery = project / ".dvc/tmp/exps/celery"
    return [json.loads(p.read_text())["pid"] for p in celery.glob("dvc-exp-worker-*.json")]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_queue(project: Path, env: dict[str, str], timeout: float = 30) -> list[int]:
    """`dvc queue stop`, then wait for the workers to exit; kill (by pid) any still there after
    `timeout`. Returns the pids that had to be killed."""
    run(["dvc", "queue", "stop"], project, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for pid in queue_workers(project)):
        time.sleep(0.5)
    stuck = [pid for pid in queue_workers(project) if alive(pid)]
    for pid in stuck:
        os.kill(pid, signal.SIGKILL)
    return stuck


def test_queued_sweep_runs_and_shows_every_experiment(tmp_path: Path) -> None:
    venv_bin = str(Path(sys.executable).parent)  # dvc and python of this environment
    env = {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "rebm tests", "GIT_AUTHOR_EMAIL": "tests@example.invalid",
        "GIT_COMMITTER_NAME": "rebm tests", "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    }
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(TRAIN)
    (project / "params.yaml").write_text(yaml.safe_dump({"train_ebm": {"bit_star": {"optim": {"max_lr": 0.0002}}}}))
    (project / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    run(["git", "init", "-q"], project, env)
    run(["dvc", "init", "-q"], project, env)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-q", "-m", "baseline"], project, env)

    for name, lr in SWEEP.items():
        out = run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"{KEY}={lr}"], project, env)
        assert f"Queued experiment '{name}'" in out, out
    assert {n: e["state"] for n, e in experiments(project, env).items()} == dict.fromkeys(SWEEP, "queued")

    try:
        run(["dvc", "queue", "start", "-j", "1"], project, env)
        deadline = time.monotonic() + 120
        while True:
            found = experiments(project, env)
            states = {n: e["state"] for n, e in found.items()}
            if set(states.values()) <= {"success", "failed"} and set(states) == set(SWEEP):
                break
            assert time.monotonic() < deadline, f"the queue did not finish: {states}"
            time.sleep(1)
    finally:
        stuck = stop_queue(project, env)
    assert not stuck, f"queue workers {stuck} did not exit after `dvc queue stop` (killed)"

    if states != dict.fromkeys(SWEEP, "success"):
        pytest.fail(f"{states}\n" + "\n".join(run(["dvc", "queue", "logs", n], project, env) for n in SWEEP))
    for name, lr in SWEEP.items():
        assert found[name]["lr"] == lr
        assert found[name]["metrics"] == {"nce_loss": loss(lr)}
    # The queue ran in temporary copies: the workspace still holds the baseline.
    assert yaml.safe_load((project / "params.yaml").read_text())["train_ebm"]["bit_star"]["optim"]["max_lr"] == 0.0002
    assert not (project / "metrics.json").exists()

    # The best one into the workspace, as the page shows (then `git commit` would keep it).
    run(["dvc", "exp", "apply", "lr-5e-4"], project, env)
    assert yaml.safe_load((project / "params.yaml").read_text())["train_ebm"]["bit_star"]["optim"]["max_lr"] == 0.0005
    assert json.loads((project / "metrics.json").read_text()) == {"nce_loss": loss(0.0005)}

    # Shared through a Git remote (a bare repository here; outputs would go to the DVC remote).
    remote = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(remote)], tmp_path, env)
    run(["git", "remote", "add", "origin", str(remote)], project, env)
    run(["dvc", "exp", "push", "origin", "lr-5e-4"], project, env)
    assert "lr-5e-4" in run(["dvc", "exp", "list", "--name-only", "origin"], project, env)
