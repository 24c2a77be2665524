"""Data-parallel training on Ray Train (pipeline.training.distributed): same curve as one process, recovery, outputs.

Tolerance. Two replicas each compute the mean loss of half the global batch and average their
gradients; one process computes the mean over the whole batch. The two differ only in the
order of float32 additions, which AdamW carries forward. Measured on these runs (dropout 0,
12 steps): logged losses agree to 6e-8 relative, weights to 5e-6 absolute (the same for
gradient accumulation over 4 micro-batches in one process). We assert every logged train and
validation loss to 1e-5 relative and every weight to 1e-4 absolute: over 20x headroom above
the float noise, yet far below the ~0.05 the loss moves between logged steps, so a wrong
shard, a missed or doubled gradient, or a skipped or repeated step fails.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModel, AutoModelForCausalLM, GPT2Config, GPT2Model
from typer.testing import CliRunner

from pipeline.core.config import CausalLMArch, OptimConfig, load_subsection
from pipeline.core.errors import RebmError
from pipeline.data.tokenization import train_bpe_tokenizer, write_windows
from pipeline.estimation.perplexity import continuation_nll
from pipeline.models.energy import EnergyModel, EnergyScorer
from pipeline.models.lm import build_gpt2
from pipeline.training.ebm_data import NCEData, nce_data_from_arrays
from pipeline.training.loop import ShuffledBatches, rank_micro_batches, slice_batch
from pipeline.training.nce import train_energy
from pipeline.training.trainer import train
from stages.cli import app

V, T, P = 64, 16, 12  # vocabulary, window length, prefix length
ARCH = CausalLMArch(n_layer=2, n_head=2, d_model=32, d_ff=64, n_positions=T, dropout=0.0)
CPU = torch.device("cpu")
RTOL = 1e-5  # logged losses, relative; see the module docstring
WEIGHT_ATOL = 1e-4  # weights, absolute
HEALTH_CHECK = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def optim(**overrides) -> OptimConfig:
    # fp32: the curves must agree to float rounding; `auto` is bf16 on a CPU with AMX / AVX512-BF16,
    # whose rounding differs between one batch and its accumulated micro-batches.
    cfg = dict(batch_size=8, max_steps=12, warmup_steps=2, max_lr=3e-3, max_grad_norm=1.0,
               eval_every=3, eval_batch_size=32, checkpoint_every=4, precision="fp32")
    return OptimConfig(**(cfg | overrides))


def pattern_windows(n: int, seed: int) -> torch.Tensor:
    """Learnable sequences: arithmetic progressions mod V with a random start and step in {1, 2, 3}."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, V, size=(n, 1))
    step = rng.integers(1, 4, size=(n, 1))
    return torch.from_numpy((start + step * np.arange(T)) % V).long()


TRAIN, VALID = pattern_windows(40, 0), pattern_windows(16, 1)  # 5 batches per epoch: epochs roll over


def tiny_lm(seed: int = 0):
    torch.manual_seed(seed)
    return build_gpt2(ARCH, V, 0)


def fit_lm(cfg: OptimConfig, checkpoint_dir: Path, on_step=None, model_seed: int = 0):
    """train_lm's loop on the tiny model. The closures are built here so Ray ships them by value."""
    model = tiny_lm(model_seed)
    train_ids, valid_ids = TRAIN, VALID

    def loss_fn(m, batch):
        return m(input_ids=batch, labels=batch).loss, batch.shape[0] * (batch.shape[1] - 1)

    def evaluate(m):
        total, count = continuation_nll(m, valid_ids, P)
        return total / count

    result = train(model, loss_fn, lambda epoch: ShuffledBatches(train_ids, cfg.batch_size, 7, epoch), evaluate,
                   cfg, checkpoint_dir=checkpoint_dir, seed=7, device=CPU, fingerprint="tiny", desc="tiny",
                   on_step=on_step)
    return model, result


def assert_same_curve(a, b, train_rows=None) -> None:
    assert [r["step"] for r in a.curve] == [r["step"] for r in b.curve]
    for ra, rb in zip(a.curve, b.curve, strict=True):
        assert rb["valid_loss"] == pytest.approx(ra["valid_loss"], rel=RTOL), ra["step"]
        assert rb["tokens"] == ra["tokens"], ra["step"]
        if train_rows is None or ra["step"] in train_rows:
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=RTOL), ra["step"]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(y, x, atol=WEIGHT_ATOL, rtol=0, msg=name)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local two-CPU Ray for the module; ray_session shuts it down afterwards.

    Ray Train's controller registers reported checkpoints when it polls the workers (every 2 s
    by default) and the loop waits for that at each checkpoint; polling every 0.5 s keeps
    these tiny runs short without changing what is tested.
    """
    from pipeline.sampling.actor_pool import ray_session

    saved = {key: os.environ.pop(key, None) for key in ("RAY_ADDRESS", HEALTH_CHECK)}
    os.environ[HEALTH_CHECK] = "0.5"
    try:
        with ray_session(num_cpus=2) as session:
            yield session
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory):
    """The reference: one plain process (workers = 1)."""
    return fit_lm(optim(), tmp_path_factory.mktemp("single"))


# --------------------------------------------------------------------------- no Ray needed
def test_replicas_together_read_exactly_the_single_process_batch() -> None:
    batches = ShuffledBatches(TRAIN, 8, 7, 3)
    for i in range(len(batches)):
        for world, accum in [(1, 2), (2, 1), (2, 2), (4, 2)]:
            parts = [mb for rank in range(world) for mb in rank_micro_batches(batches, i, rank, world, accum)]
            assert len(parts) == world * accum and {len(p) for p in parts} == {8 // (world * accum)}
            assert torch.equal(torch.cat(parts), batches[i])
            # A batch without micro_batch() (an NCE dict) is built whole and sliced the same way.
            sliced = [slice_batch({"real": batches[i], "lm": -batches[i]}, k, world * accum)
                      for k in range(world * accum)]
            assert all(torch.equal(s["real"], p) and torch.equal(s["lm"], -p)
                       for s, p in zip(sliced, parts, strict=True))


def test_gradient_accumulation_in_one_process_keeps_the_curve(single, tmp_path: Path) -> None:
    model, result = fit_lm(optim(grad_accum=4), tmp_path)
    assert result.steps == 12 and result.tokens == single[1].tokens
    assert_same_curve(single[1], result)
    assert_same_weights(single[0], model)


def test_a_batch_that_does_not_split_evenly_is_refused_naming_the_key(tmp_path: Path) -> None:
    params = {"pretrain_mlm": {"optim": {**optim().model_dump(mode="json"), "batch_size": 10, "workers": 4}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    from pipeline.core.config import PretrainMLMConfig

    with pytest.raises(RebmError, match=r"pretrain_mlm\.optim: .*batch_size \(10\) must be divisible by "
                                        r"workers x grad_accum \(4 x 1\)"):
        load_subsection(PretrainMLMConfig, "pretrain_mlm", tmp_path / "params.yaml")


def test_more_workers_without_a_ray_session_is_a_clear_error(tmp_path: Path) -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is open")
    with pytest.raises(RebmError, match="need a Ray session"):
        fit_lm(optim(workers=2), tmp_path)


# --------------------------------------------------------------------------- on Ray Train
@pytest.mark.slow  # a Ray Train run: ~15-40 s on two cores
def test_two_workers_reach_the_single_process_loss_curve(ray_cluster, single, tmp_path: Path) -> None:
    model, result = fit_lm(optim(workers=2), tmp_path)
    assert result.steps == 12 and result.resumed_from == 0
    assert [r["step"] for r in result.curve] == [3, 6, 9, 12]
    assert_same_curve(single[1], result)
    assert result.best_step == single[1].best_step
    assert_same_weights(single[0], model)  # the driver's model holds the best weights, like train()'s
    assert (tmp_path / "ray").is_dir()  # Ray Train's checkpoints live in the stage's checkpoint directory


def kill_rank_once(rank: int, at_step: int, marker: Path):
    """on_step hook: replica `rank` dies (os._exit) after step `at_step`, on the first attempt only."""

    def hook(step: int) -> None:
        import ray.train

        if step == at_step and ray.train.get_context().get_world_rank() == rank and not marker.exists():
            marker.write_text(str(step))
            sys.stderr.write(f"test hook: rank {rank} exits abruptly after step {step}\n")
            sys.stderr.flush()
            os._exit(1)

    return hook


@pytest.mark.slow  # a Ray Train run: ~15-40 s on two cores
def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, single, tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    model, result = fit_lm(optim(workers=2), tmp_path / "ckpt", on_step=kill_rank_once(1, 6, marker))
    assert marker.read_text() == "6"  # the worker did die, after step 6
    # Checkpoints every 4 steps: the restarted group resumed at step 4, not 0, and finished all 12.
    assert result.resumed_from == 4 and result.steps == 12
    assert [r["step"] for r in result.curve] == [3, 6, 9, 12]
    # Same run as the uninterrupted one: the 6-step row's train loss averages only steps 5-6 after
    # the restore (the in-memory interval restarts), every other number matches.
    assert_same_curve(single[1], result, train_rows={3, 9, 12})
    assert_same_weights(single[0], model)

    # A rerun of the same configuration (a stage killed after training, before writing its
    # output) finds the run's checkpoints in the same storage and trains no further.
    again, rerun = fit_lm(optim(workers=2), tmp_path / "ckpt", model_seed=123)
    assert rerun.resumed_from == 12 and rerun.steps == 12 and rerun.step_seconds == []
    assert_same_weights(model, again)


@pytest.mark.slow  # a Ray Train run: ~15-40 s on two cores
def test_nce_energy_on_two_workers_matches_one(ray_cluster, tmp_path: Path) -> None:
    """train_ebm's loop: dict batches (sliced per replica) and a loss that reaches the model via a scorer."""
    rng = np.random.default_rng(0)

    def data(n: int) -> NCEData:
        windows = np.concatenate([rng.integers(0, 20, (n, P)), rng.integers(20, 40, (n, T - P))], 1)
        return nce_data_from_arrays(np.arange(n), windows, rng.integers(40, V, (n, 3, T - P)), P, tmp_path / f"d{n}")

    train_data, valid_data = data(32), data(8)
    tokenizer = train_bpe_tokenizer((t for _, t in _texts(0, 40)), vocab_size=300, min_frequency=2)
    results, reads = {}, {}
    for workers in (1, 2):
        train_data.read_log = reads[workers] = tmp_path / f"reads-{workers}.jsonl"
        torch.manual_seed(0)
        body = GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_positions=T, n_embd=32, n_layer=2, n_head=2,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        scorer = EnergyScorer(EnergyModel.from_body(body, "unit"), tokenizer, tokenizer)
        cfg = optim(workers=workers, max_steps=8, eval_every=4, max_lr=1e-3)
        result = train_energy(scorer, train_data, valid_data, cfg, seed=3, checkpoint_dir=tmp_path / str(workers),
                              device=CPU, fingerprint="nce", desc=f"nce-{workers}")
        results[workers] = (scorer.model, result)
    assert_same_curve(results[1][1], results[2][1])
    assert_same_weights(results[1][0], results[2][0])
    # Each replica read only its half of every global batch from the store: per epoch, the two
    # workers' rows are disjoint and together the rows one process read (8 steps x 8 of 32 windows).
    logs = {w: [json.loads(line) for line in reads[w].read_text().splitlines()] for w in (1, 2)}
    assert len({r["pid"] for r in logs[2]}) == 2 and all(len(r["rows"]) == 4 for r in logs[2])
    for epoch in (0, 1):
        single = sorted(row for r in logs[1] if r["epoch"] == epoch for row in r["rows"])
        by_worker = [{row for r in logs[2] if r["epoch"] == epoch and r["pid"] == pid for row in r["rows"]}
                     for pid in {r["pid"] for r in logs[2]}]
        assert not by_worker[0] & by_worker[1] and sorted(by_worker[0] | by_worker[1]) == single == list(range(32))


# --------------------------------------------------------------------------- the stage, end to end
def _texts(seed: int, n: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    words = "the a cat dog sat ran on under mat log and then quickly slowly red blue".split()
    return [(f"d{seed}-{i}", " ".join(rng.choice(words, size=60))) for i in range(n)]


def _project(root: Path, workers: int) -> Path:
    root.mkdir(parents=True)
    tokenizer = train_bpe_tokenizer((t for _, t in _texts(0, 40)), vocab_size=300, min_frequency=2)
    tokenizer.save_pretrained(root / "data/tiny/tokenizer")
    (root / "data/tiny/windows").mkdir(parents=True)
    for split, (seed, n) in {"train": (0, 40), "valid": (1, 6), "test": (2, 6)}.items():
        write_windows(root / f"data/tiny/windows/{split}.parquet", split, tokenizer, _texts(seed, n), T, 8)
    arch = {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "n_positions": T, "dropout": 0.0}
    opt = {"batch_size": 8, "max_steps": 6, "warmup_steps": 1, "max_lr": 0.003, "max_grad_norm": 1.0,
           "precision": "fp32", "eval_every": 3, "eval_batch_size": 16, "checkpoint_every": 3, "workers": workers}
    params = {"seed": 3, "device": "cpu",
              "tokenize": {"vocab_size": 300, "prefix_len": P, "seq_len": T, "stride": 8},
              "energy": {"bit": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "dropout": 0.0}},
              "train_lm": {"base": {"init": None, "arch": arch, "optim": opt}},
              "pretrain_mlm": {"optim": opt}}
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root


@pytest.mark.slow  # a Ray Train run: ~15-40 s on two cores
def test_stage_outputs_on_two_workers_load_like_the_single_process_ones(
    ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = {}
    for workers in (1, 2):
        root = _project(tmp_path / f"w{workers}", workers)
        monkeypatch.chdir(root)
        for command in (["train-lm", "tiny", "base"], ["pretrain-mlm", "tiny"]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 0, result.output
        metrics[workers] = {name: json.loads((root / f"models/tiny/{name}_metrics.json").read_text())
                            for name in ("lm/base", "mlm")}
        # Ray Train's checkpoints lived in the stages' checkpoint directories, dropped with them.
        assert not (root / "models/tiny/lm/.base.tmp-checkpoint").exists()
        assert not (root / "models/tiny/.mlm.tmp-checkpoint").exists()
    for name in ("lm/base", "mlm"):
        one, two = tmp_path / "w1/models/tiny" / name, tmp_path / "w2/models/tiny" / name
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
        assert json.loads((one / "config.json").read_text()) == json.loads((two / "config.json").read_text())
        assert metrics[2][name]["steps"] == metrics[1][name]["steps"] == 6
        assert metrics[2][name]["workers"] == 2 and metrics[1][name]["workers"] == 1

    one, two = tmp_path / "w1/models/tiny/lm/base", tmp_path / "w2/models/tiny/lm/base"
    a, b = AutoModelForCausalLM.from_pretrained(one).eval(), AutoModelForCausalLM.from_pretrained(two).eval()
    assert type(a) is type(b)
    ids = pattern_windows(3, 5) % 300
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, atol=1e-3, rtol=0)
    assert metrics[2]["lm/base"]["valid_ppl"] == pytest.approx(metrics[1]["lm/base"]["valid_ppl"], rel=RTOL)

    # The MLM draws its masks per replica, so it matches one process in distribution only.
    a, b = AutoModel.from_pretrained(one.parent.parent / "mlm"), AutoModel.from_pretrained(two.parent.parent / "mlm")
    assert type(a) is type(b) and type(a).__name__ == "BertModel"
    loss_1, loss_2 = metrics[1]["mlm"]["valid_mlm_loss"], metrics[2]["mlm"]["valid_mlm_loss"]
    assert loss_2 == pytest.approx(loss_1, rel=0.01)  # measured: 0.2% apart after 6 steps
