"""A fault-tolerant pool of Ray actors for the embarrassingly parallel stages.

The negatives stage samples, the evaluate and generate stages sample and score: each is a
list of independent tasks (a shard of windows) run on `num_workers` actors that hold a model.
An actor that dies is restarted by Ray (`max_restarts`) and the tasks it held are resubmitted
by the driver, so every task's result reaches `on_done` exactly once whatever fails.

Models travel as the bytes of their saved directory through the object store, so a cluster
needs no shared filesystem. Pools never call `ray.init`: the entry point opens a
`ray_session` (below), the one place a stage or training run attaches to Ray.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import RebmError


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[dict]:
    """Attach to the cluster at `address` (or $RAY_ADDRESS), else start a local Ray with num_cpus.

    Only entry points call this. Worker processes import `pipeline` from the package shipped
    with the job (runtime_env py_modules), so a remote node needs no copy of the repository.
    """
    import ray

    import pipeline

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        yield {"address": "existing", "cpus": ray.cluster_resources().get("CPU", 0)}
        return
    # The package's directory, not the module object: inside a `ray job submit` job, ray.init
    # deep-copies this to merge it with the job's runtime_env, and a module cannot be copied.
    # Ray also refuses keys set on both sides, so a job must not set py_modules or this env var.
    runtime_env = {"py_modules": [pipeline.__path__[0]], "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    kwargs: dict[str, Any] = dict(runtime_env=runtime_env, logging_level="ERROR", log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    try:
        yield {"address": address or "local", "cpus": ray.cluster_resources().get("CPU", 0)}
    finally:
        ray.shutdown()


def ray_session_if(needed: bool, address: str | None, num_cpus: int):
    """`ray_session` when work goes to actors (num_workers > 0), else nothing: Ray is not imported."""
    return ray_session(address, num_cpus=num_cpus) if needed else contextlib.nullcontext()


@dataclass(frozen=True)
class Task:
    """One unit of work: `actor.<method>(*args)`; `key` names it in errors and resubmissions."""

    key: Hashable
    method: str
    args: tuple | Callable[[], tuple]  # a callable is called at each submission (inputs read late)
    payload: Any = None  # whatever the driver needs back in on_done (a Shard, row indices …)

    def arguments(self) -> tuple:
        return self.args() if callable(self.args) else self.args


@dataclass
class PoolStats:
    shards_computed: int = 0
    shards_reused: int = 0
    rows_computed: int = 0
    new_tokens: int = 0
    actor_failures: int = 0
    resubmissions: int = 0
    sample_seconds: float = 0.0
    workers: list[dict] = field(default_factory=list)


def ship(directory: Path, local: bool, require_config: bool = True) -> str | list:
    """How a worker gets a saved directory: its path when in this process, else its bytes.

    The ref is returned nested in a list so Ray does not resolve it at actor creation: the
    caller keeps the list alive, and a restarted actor fetches the bytes again.
    """
    if local:
        return str(directory)
    import ray

    return [ray.put(read_model_files(directory, require_config))]


@contextlib.contextmanager
def model_directory(source: str | list) -> Iterator[str]:
    """A directory holding a shipped model for the duration of the block (see `ship`)."""
    if isinstance(source, str):
        yield source
        return
    import ray

    files: dict[str, bytes] = ray.get(source[0])
    with tempfile.TemporaryDirectory(prefix="rebm-model-") as tmp:
        for name, data in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        yield tmp


def read_model_files(model_dir: Path, require_config: bool = True) -> dict[str, bytes]:
    """Every file of a saved HF model (or tokenizer) directory, by relative path (shipped to actors)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RebmError(f"{model_dir}: model directory not found (has the stage that trains it run?)")
    files = {
        str(p.relative_to(model_dir)): p.read_bytes()
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)
    }
    if require_config and "config.json" not in files:
        raise RebmError(f"{model_dir}: no config.json, not a saved Hugging Face model")
    return files


class ActorPool:
    """`num_workers` actors of `actor_cls(*init_args)`, `inflight` tasks queued on each.

    Unlike `ray.util.ActorPool`, a task whose actor died is resubmitted (to a restarted or
    another actor) up to `max_attempts` times, and results are handed over as they land.
    """

    def __init__(
        self,
        actor_cls: type,
        init_args: tuple,
        num_workers: int,
        cpus_per_worker: float,
        max_restarts: int = 3,
        inflight: int = 2,
        name: str = "pool",
        gpus_per_worker: float = 0,
    ):
        import ray

        if num_workers < 1:
            raise RebmError(f"{name}: num_workers must be at least 1, got {num_workers}")
        self.name = name
        self.inflight = inflight
        remote = ray.remote(actor_cls).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                               max_restarts=max_restarts, max_task_retries=0)
        self.actors = [remote.remote(*init_args) for _ in range(num_workers)]
        self.info = ray.get([a.ready.remote() for a in self.actors])

    def run(
        self,
        tasks: list[Task],
        on_done: Callable[[Task, Any], None],
        stats: PoolStats,
        max_attempts: int = 4,
    ) -> None:
        """Run every task, calling on_done(task, result) on the driver once per task."""
        import ray
        from ray.exceptions import RayActorError

        pending = deque(tasks)
        attempts = dict.fromkeys((t.key for t in tasks), 0)
        alive = set(range(len(self.actors)))
        recovering: set[int] = set()
        load = dict.fromkeys(alive, 0)
        refs: dict[Any, tuple[int, Task | None]] = {}
        while pending or refs:
            for i in sorted(alive - recovering):
                while load[i] < self.inflight and pending:
                    task = pending.popleft()
                    attempts[task.key] += 1
                    refs[getattr(self.actors[i], task.method).remote(*task.arguments())] = (i, task)
                    load[i] += 1
            if not refs:
                raise RebmError(f"{self.name}: every Ray worker died and could not be restarted")
            (ref,), _ = ray.wait(list(refs), num_returns=1)
            i, task = refs.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError:
                if task is None:  # the readiness probe failed: the actor is gone for good
                    alive.discard(i)
                    recovering.discard(i)
                    continue
                load[i] -= 1
                stats.actor_failures += 1
                if attempts[task.key] >= max_attempts:
                    raise RebmError(
                        f"{self.name}: task {task.key} failed {attempts[task.key]} times (its worker died each time)"
                    ) from None
                stats.resubmissions += 1
                pending.appendleft(task)
                if i not in recovering:  # wait for Ray to restart it before giving it work
                    recovering.add(i)
                    refs[self.actors[i].ready.remote()] = (i, None)
                continue
            if task is None:
                recovering.discard(i)
                continue
            load[i] -= 1
            on_done(task, result)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)


def worker_info(device) -> dict:
    """What a worker's `ready` reports: process, threads, device and the GPUs Ray made visible."""
    import torch

    return {"pid": os.getpid(), "threads": torch.get_num_threads(), "device": str(device),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def worker_setup(threads: int) -> None:
    """What every actor does first: its torch thread budget, no HF progress bars."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(max(1, int(threads)))
    hf_logging.disable_progress_bar()


class LocalPool:
    """The same tasks run by one instance of the actor class in this process (no Ray).

    For `num_workers: 0` — debugging, tests, a machine where Ray is unwanted. Results are
    identical to the pool's: the tasks are the same fixed shards.
    """

    def __init__(self, actor_cls: type, init_args: tuple):
        self.actor = actor_cls(*init_args)
        self.info = [self.actor.ready()]

    def run(self, tasks: list[Task], on_done: Callable[[Task, Any], None], stats: PoolStats) -> None:
        for task in tasks:
            on_done(task, getattr(self.actor, task.method)(*task.arguments()))

    def shutdown(self) -> None:
        pass


def make_pool(actor_cls: type, init_args: tuple, num_workers: int, cpus_per_worker: float, name: str,
              gpus_per_worker: float = 0, max_restarts: int = 3) -> ActorPool | LocalPool:
    """`num_workers` Ray actors (each with `gpus_per_worker` GPUs), or the actor class in this
    process when num_workers is 0 (Ray is then not imported)."""
    if num_workers == 0:
        return LocalPool(actor_cls, init_args)
    return ActorPool(actor_cls, init_args, num_workers, cpus_per_worker, max_restarts=max_restarts, name=name,
                     gpus_per_worker=gpus_per_worker)
