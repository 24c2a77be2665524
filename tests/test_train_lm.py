"""Stage train_lm: the training loop, RALM, continuation perplexity, save/load, resume, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.core.config import CausalLMArch, OptimConfig
from pipeline.data.tokenization import train_bpe_tokenizer, write_windows
from pipeline.estimation.perplexity import continuation_logprobs, continuation_nll, continuation_perplexity
from pipeline.models.lm import (
    ResidualLM,
    build_gpt2,
    count_parameters,
    gpt2_config,
    load_lm,
    load_tokenizer,
    zero_init_output,
)
from pipeline.training.loop import ShuffledBatches, epoch_permutation
from pipeline.training.trainer import CURVE_COLUMNS, train
from stages.cli import app

V, T, P = 48, 16, 12  # vocabulary, window length, prefix length of the tiny setting
ARCH = CausalLMArch(n_layer=2, n_head=2, d_model=32, d_ff=64, n_positions=T, dropout=0.1)
CPU = torch.device("cpu")


def optim(**overrides) -> OptimConfig:
    cfg = dict(batch_size=8, max_steps=10, warmup_steps=2, max_lr=3e-3, max_grad_norm=1.0,
               eval_every=5, eval_batch_size=32, checkpoint_every=5)
    return OptimConfig(**(cfg | overrides))


def pattern_windows(n: int, seed: int) -> torch.Tensor:
    """Learnable sequences: arithmetic progressions mod V with a random start and step in {1, 2, 3}."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, V, size=(n, 1))
    step = rng.integers(1, 4, size=(n, 1))
    return torch.from_numpy((start + step * np.arange(T)) % V).long()


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss, batch.numel()


def tiny_lm(seed: int = 0, arch: CausalLMArch = ARCH):
    torch.manual_seed(seed)
    return build_gpt2(arch, V, 0)


def fit(model, train_ids, valid_ids, cfg, tmp: Path, **kwargs):
    return train(
        model, lm_loss, lambda epoch: ShuffledBatches(train_ids, cfg.batch_size, 7, epoch),
        lambda m: continuation_nll(m, valid_ids, P)[0] / (len(valid_ids) * (T - P)),
        cfg, checkpoint_dir=tmp, seed=7, device=CPU, **kwargs,
    )


# --------------------------------------------------------------------------- training loop
def test_loss_goes_down_on_a_tiny_corpus(tmp_path: Path) -> None:
    train_ids, valid_ids = pattern_windows(64, 0), pattern_windows(32, 1)
    model = tiny_lm()
    before = continuation_perplexity(model, valid_ids, P)
    cfg = optim(max_steps=80, max_lr=1e-2, eval_every=20, checkpoint_every=40)
    result = fit(model, train_ids, valid_ids, cfg, tmp_path)
    after = continuation_perplexity(model, valid_ids, P)
    assert before > 30  # about uniform over 48 tokens
    assert after < 8, (before, after)
    assert [row["step"] for row in result.curve] == [20, 40, 60, 80]
    assert result.curve[-1]["train_loss"] < result.curve[0]["train_loss"]
    assert math.isclose(math.log(after), result.best_valid, rel_tol=1e-6)  # the best weights are loaded


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    assert np.array_equal(epoch_permutation(50, 3, 1), epoch_permutation(50, 3, 1))
    assert not np.array_equal(epoch_permutation(50, 3, 1), epoch_permutation(50, 3, 2))
    data = torch.arange(50)[:, None]
    batches = ShuffledBatches(data, 8, 3, 0)
    assert len(batches) == 6  # the partial batch is dropped
    seen = torch.cat([batches[i] for i in range(len(batches))]).flatten()
    assert len(set(seen.tolist())) == 48


def test_resume_after_a_kill_reaches_the_uninterrupted_state(tmp_path: Path) -> None:
    train_ids, valid_ids = pattern_windows(40, 0), pattern_windows(16, 1)  # 5 batches/epoch: epochs roll over
    cfg = optim(max_steps=12, eval_every=4, checkpoint_every=3)

    reference = tiny_lm()
    ref = fit(reference, train_ids, valid_ids, cfg, tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_at_8(step: int) -> None:
        if step == 8:
            raise Killed

    interrupted = tiny_lm()
    with pytest.raises(Killed):
        fit(interrupted, train_ids, valid_ids, cfg, tmp_path / "b", on_step=kill_at_8)
    assert json.loads((tmp_path / "b/last/state.json").read_text())["step"] == 6

    resumed_model = tiny_lm(seed=123)  # different init: everything must come from the checkpoint
    resumed = fit(resumed_model, train_ids, valid_ids, cfg, tmp_path / "b")
    assert resumed.resumed_from == 6 and resumed.steps == 12
    assert ref.best_step == resumed.best_step
    assert [r["valid_loss"] for r in ref.curve] == pytest.approx([r["valid_loss"] for r in resumed.curve], abs=1e-6)
    for (name, a), b in zip(reference.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)

    # A checkpoint of another configuration is not resumed.
    other = fit(tiny_lm(), train_ids, valid_ids, cfg, tmp_path / "b", fingerprint="other")
    assert other.resumed_from == 0


# --------------------------------------------------------------------------- RALM
def test_ralm_is_one_softmax_over_summed_logits_and_its_base_stays_frozen(tmp_path: Path) -> None:
    base, phi = tiny_lm(0).eval(), tiny_lm(1).eval()
    ralm = ResidualLM.from_parts(base, phi).eval()
    ids = pattern_windows(4, 2)
    with torch.no_grad():
        logp = torch.log_softmax(ralm(input_ids=ids).logits, -1)
        summed = torch.log_softmax(base(input_ids=ids).logits, -1) + torch.log_softmax(phi(input_ids=ids).logits, -1)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(4, T))
    # Eq. 6: log P_RALM = log P_base + log P_phi + const, the constant normalising each position.
    torch.testing.assert_close(logp, summed - torch.logsumexp(summed, -1, keepdim=True), atol=1e-5, rtol=0)

    assert count_parameters(ralm, trainable_only=True) == count_parameters(phi)
    assert count_parameters(ralm) == count_parameters(base) + count_parameters(phi)
    frozen = {k: v.clone() for k, v in ralm.base.state_dict().items()}
    phi_before = {k: v.clone() for k, v in ralm.residual.state_dict().items()}
    fit(ralm, pattern_windows(32, 0), pattern_windows(8, 1), optim(max_steps=6, max_lr=1e-2), tmp_path)
    ralm.train()
    assert not ralm.base.training and ralm.residual.training  # the frozen base never applies dropout
    for name, value in ralm.base.state_dict().items():
        assert torch.equal(value, frozen[name]), name
    assert any(not torch.equal(v, phi_before[k]) for k, v in ralm.residual.state_dict().items())


def test_zero_initialised_residual_starts_exactly_at_the_base_lm() -> None:
    base, phi = tiny_lm(0), tiny_lm(1)
    zero_init_output(phi)
    ralm = ResidualLM.from_parts(base, phi).eval()
    ids = pattern_windows(3, 0)
    with torch.no_grad():
        torch.testing.assert_close(ralm(input_ids=ids).logits, base.eval()(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["base", "ralm"])
def test_save_then_load_gives_the_same_logits(tmp_path: Path, variant: str) -> None:
    model = tiny_lm(0) if variant == "base" else ResidualLM.from_parts(tiny_lm(0), tiny_lm(1))
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.suffix not in (".json",)) == ["model.safetensors"]
    loaded = load_lm(tmp_path / "m")
    assert type(loaded) is type(model)
    ids = pattern_windows(3, 0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    if variant == "ralm":
        assert not any(p.requires_grad for p in loaded.base.parameters())
        # Causal: a token changes no logit before it.
        changed = ids.clone()
        changed[:, 9] = (changed[:, 9] + 1) % V
        with torch.no_grad():
            a, b = loaded(input_ids=ids).logits, loaded(input_ids=changed).logits
        assert torch.equal(a[:, :9], b[:, :9]) and not torch.equal(a[:, 9:], b[:, 9:])


def test_a_saved_ralm_holds_phi_only_and_refuses_a_changed_base(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from pipeline.core.errors import RebmError
    from pipeline.core.io import file_digest

    base_dir = tmp_path / "lm" / "base"
    tiny_lm(0).save_pretrained(base_dir)
    base = load_lm(base_dir)
    sha = file_digest(base_dir / "model.safetensors")
    ralm = ResidualLM.from_parts(base, tiny_lm(1), base_dir=base_dir, base_sha256=sha).eval()
    ralm.save_pretrained(tmp_path / "lm" / "ralm")
    weights = sorted(p.relative_to(tmp_path / "lm" / "ralm").as_posix()
                     for p in (tmp_path / "lm" / "ralm").rglob("*.safetensors"))
    assert weights == ["residual/model.safetensors"]  # no second copy of the base
    assert not any(k.startswith("base") for k in load_file(tmp_path / "lm" / "ralm" / "residual" / "model.safetensors"))
    saved = json.loads((tmp_path / "lm" / "ralm" / "config.json").read_text())
    assert (saved["base_path"], saved["base_sha256"]) == ("../base", sha)

    # The pair moves together (a DVC checkout elsewhere) and loads to the same logits, bf16 too.
    moved = tmp_path / "elsewhere"
    (tmp_path / "lm").rename(moved)
    loaded = load_lm(moved / "ralm")
    ids = pattern_windows(3, 0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ralm(input_ids=ids).logits, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.base.parameters())
    assert load_lm(moved / "ralm", dtype="bfloat16").residual.dtype == torch.bfloat16
    # Saving a loaded RALM again keeps pointing at the same base.
    loaded.save_pretrained(moved / "ralm_again")
    assert json.loads((moved / "ralm_again" / "config.json").read_text())["base_path"] == "../base"

    tiny_lm(2).save_pretrained(moved / "base")  # a retrained base: RALM's residual no longer fits it
    with pytest.raises(RebmError, match=r"not the one RALM was trained on"):
        load_lm(moved / "ralm")
    for path in (moved / "base").iterdir():
        path.unlink()
    with pytest.raises(RebmError, match=r"base LM .*base.* is missing"):
        load_lm(moved / "ralm")


# --------------------------------------------------------------------------- perplexity
class TableLM(torch.nn.Module):
    """Logits depend only on the position, never on the input: a token's value then matters only
    where it is a target, which isolates which positions the metric scores."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[: input_ids.shape[1]].expand(len(input_ids), -1, -1))


class TableLMWithKeep(TableLM):
    """The same, supporting `logits_to_keep` like HF causal LMs."""

    def forward(self, input_ids, logits_to_keep=0):
        logits = super().forward(input_ids).logits
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


@pytest.mark.parametrize("keep", [False, True])
def test_perplexity_scores_exactly_the_continuation_tokens(keep: bool) -> None:
    torch.manual_seed(0)
    table = torch.randn(T, V) * 3
    model = TableLMWithKeep(table) if keep else TableLM(table)
    ids = pattern_windows(5, 0)

    logp = continuation_logprobs(model, ids, P, batch_size=2)
    assert logp.shape == (5, T - P) and logp.dtype == np.float64
    hand = np.array([[torch.log_softmax(table[t - 1], -1)[ids[i, t]].item() for t in range(P, T)] for i in range(5)])
    np.testing.assert_allclose(logp, hand, rtol=1e-6)
    ppl = continuation_perplexity(model, ids, P)
    assert ppl == pytest.approx(math.exp(-hand.mean()), rel=1e-6)

    for position, counted in [(0, False), (P - 1, False), (P, True), (T - 1, True)]:
        changed = ids.clone()
        changed[:, position] = (changed[:, position] + 1) % V
        assert (continuation_perplexity(model, changed, P) != pytest.approx(ppl, rel=1e-9)) is counted, position


def test_perplexity_of_a_real_lm_matches_a_full_forward() -> None:
    model = tiny_lm().eval()
    ids = pattern_windows(6, 3)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids).logits, -1)
    hand = full[:, P - 1 : -1].gather(-1, ids[:, P:, None]).squeeze(-1).double().numpy()
    np.testing.assert_allclose(continuation_logprobs(model, ids, P, batch_size=4), hand, atol=1e-5)
    total, count = continuation_nll(model, ids, P)
    assert count == 6 * (T - P) and total == pytest.approx(-hand.sum(), rel=1e-5)


def test_training_flop_count_matches_a_hand_count() -> None:
    from pipeline.tools.bench import lm_flops_per_token

    d, ff, L = ARCH.d_model, ARCH.d_ff, ARCH.n_layer
    per_layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
    forward = 2 * (L * per_layer + V * d) + 4 * L * d * T
    assert lm_flops_per_token(gpt2_config(ARCH, V, 0), T) == 3 * forward
    assert lm_flops_per_token(gpt2_config(ARCH, V, 0), T, backward=False) == forward


# --------------------------------------------------------------------------- the stage through the CLI
def _tiny_arch(d_model: int = 32, n_layer: int = 2) -> dict:
    return {"n_layer": n_layer, "n_head": 2, "d_model": d_model, "d_ff": 2 * d_model, "n_positions": T, "dropout": 0.0}


def _tiny_optim() -> dict:
    return {"batch_size": 8, "max_steps": 6, "warmup_steps": 1, "max_lr": 0.003, "max_grad_norm": 1.0,
            "precision": "fp32", "eval_every": 3, "eval_batch_size": 16, "checkpoint_every": 3}


def _texts(seed: int, n: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    words = "the a cat dog sat ran on under mat log and then quickly slowly red blue".split()
    return [(f"d{seed}-{i}", " ".join(rng.choice(words, size=60))) for i in range(n)]


@pytest.fixture
def project(in_tmp: Path) -> Path:
    tokenizer = train_bpe_tokenizer((t for _, t in _texts(0, 40)), vocab_size=300, min_frequency=2)
    tokenizer.save_pretrained(in_tmp / "data/tiny/tokenizer")
    (in_tmp / "data/tiny/windows").mkdir(parents=True)
    for split, (seed, n) in {"train": (0, 40), "valid": (1, 6), "test": (2, 6)}.items():
        write_windows(in_tmp / f"data/tiny/windows/{split}.parquet", split, tokenizer, _texts(seed, n), T, 8)
    params = {
        "seed": 3,
        "tokenize": {"pretrained": None, "vocab_size": 300, "min_frequency": 2, "prefix_len": P, "seq_len": T,
                     "stride": 8},
        "device": "cpu",
        "energy": {"bit": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "dropout": 0.1}},
        "train_lm": {
            "base": {"init": None, "arch": _tiny_arch(), "optim": _tiny_optim()},
            "balm": {"init": None, "arch": _tiny_arch(48), "optim": _tiny_optim()},
            "ralm": {"arch": _tiny_arch(), "zero_init": True, "optim": _tiny_optim()},
        },
    }
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return in_tmp


def test_window_rows_read_the_train_split_by_rows_like_the_array(tmp_path: Path) -> None:
    """The LM stages' train split: an on-disk store whose batches equal the in-memory array's, bit
    for bit, that pickles as a path (a Ray Train worker reads its own rows) and goes with its data."""
    import gc
    import pickle

    from pipeline.data.tokenization import read_window_ids
    from pipeline.training.ebm_data import load_window_rows

    words = "the a cat dog sat ran on under mat log and then".split()
    texts = [" ".join(np.random.default_rng(i).choice(words, 40)) for i in range(12)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1)
    path = tmp_path / "train.parquet"
    write_windows(path, "train", tokenizer, [(f"d{i}", t) for i, t in enumerate(texts)], T, T)
    array = read_window_ids(path)
    rows = load_window_rows(path, tmp_path, "w")
    assert rows.shape == array.shape and rows.max() == int(array.max())
    for epoch in (0, 1):
        a, b = ShuffledBatches(torch.from_numpy(array), 4, 7, epoch), ShuffledBatches(rows, 4, 7, epoch)
        assert len(a) == len(b) and all(torch.equal(a[i], b[i]) and b[i].dtype == torch.int64 for i in range(len(a)))
    copy = pickle.loads(pickle.dumps(rows))
    assert len(pickle.dumps(rows)) < 1000 and torch.equal(copy[torch.arange(3)], torch.from_numpy(array[:3]))
    store = rows.store
    del rows, copy, a, b
    gc.collect()
    assert not store.exists()


def test_rebm_train_lm_writes_models_metrics_and_curves(project: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train-lm", "tiny", "ralm"])
    assert result.exit_code == 2 and "base LM not found" in result.output

    for variant in ("base", "balm", "ralm"):
        result = runner.invoke(app, ["train-lm", "tiny", variant])
        assert result.exit_code == 0, result.output
        out = project / "models/tiny/lm" / variant
        weights = "residual/model.safetensors" if variant == "ralm" else "model.safetensors"  # RALM: phi only
        assert {p.relative_to(out).as_posix() for p in out.rglob("*")} >= {"config.json", weights, "tokenizer.json"}
        assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
        assert not (project / f"models/tiny/lm/.{variant}.tmp-checkpoint").exists()
        live = project / f"models/tiny/lm/{variant}_live"  # the curve through dvclive, one row per validation
        curve = (live / "plots/metrics/valid_loss.tsv").read_text().splitlines()
        assert curve[0].split("\t") == ["step", "valid_loss"] and len(curve) == 3
        assert sorted(p.stem for p in (live / "plots/metrics").iterdir()) == sorted(CURVE_COLUMNS)
        summary = json.loads((live / "metrics.json").read_text())
        assert summary["step"] == int(curve[-1].split("\t")[0])
        assert summary["valid_loss"] == pytest.approx(float(curve[-1].split("\t")[1]))

    metrics = {v: json.loads((project / f"models/tiny/lm/{v}_metrics.json").read_text())
               for v in ("base", "balm", "ralm")}
    base, balm, ralm = metrics["base"], metrics["balm"], metrics["ralm"]
    assert base["steps"] == 6 and base["valid_continuation_tokens"] % (T - P) == 0
    # The recorded perplexity is the saved model's continuation perplexity on test.
    from pipeline.data.tokenization import read_window_ids

    test_ids = read_window_ids(project / "data/tiny/windows/test.parquet")
    for variant in ("base", "ralm"):
        model = load_lm(project / "models/tiny/lm" / variant)
        assert continuation_perplexity(model, test_ids, P) == pytest.approx(metrics[variant]["test_ppl"], rel=1e-5)
    assert balm["parameters_base"] == base["parameters"] and balm["parameters_bit_energy"] > 0
    assert ralm["parameters_trainable"] == base["parameters"]  # phi has the base's architecture here
    assert ralm["parameters_total"] == ralm["parameters_trainable"] + ralm["parameters_base"]
    assert ralm["valid_ppl"] <= base["valid_ppl"] * 1.001  # starts at the base LM, keeps the best checkpoint


def test_init_with_another_tokenizer_is_refused(project: Path) -> None:
    other = train_bpe_tokenizer((t.upper() for _, t in _texts(5, 40)), vocab_size=290, min_frequency=2)
    lm = build_gpt2(CausalLMArch(**_tiny_arch()), len(other), 0)
    lm.save_pretrained(project / "pretrained")
    other.save_pretrained(project / "pretrained")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_lm"]["base"] |= {"init": "pretrained", "arch": None}
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    result = CliRunner().invoke(app, ["train-lm", "tiny", "base"])
    assert result.exit_code == 2
    assert "train_lm.base.init" in result.output and "tokenize.pretrained" in result.output


def test_a_pretrained_base_used_as_is_and_a_null_balm(project: Path) -> None:
    # train_lm.base.init with optim.max_steps 0: the saved base LM is the pretrained one,
    # weight for weight, scored but not trained; BALM null writes a not-applicable record.
    import safetensors.torch

    from pipeline.data.tokenization import read_window_ids

    tokenizer = load_tokenizer(project / "data/tiny/tokenizer", "test")
    torch.manual_seed(11)
    pretrained = build_gpt2(CausalLMArch(**_tiny_arch()), len(tokenizer), tokenizer.eos_token_id)
    pretrained.save_pretrained(project / "pretrained")
    tokenizer.save_pretrained(project / "pretrained")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_lm"]["base"] = {"init": "pretrained", "arch": None, "optim": {**_tiny_optim(), "max_steps": 0,
                                                                                 "warmup_steps": 0}}
    params["train_lm"]["balm"] = None
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")

    runner = CliRunner()
    for variant in ("base", "balm"):
        result = runner.invoke(app, ["train-lm", "tiny", variant])
        assert result.exit_code == 0, result.output
    base = json.loads((project / "models/tiny/lm/base_metrics.json").read_text())
    assert base["steps"] == 0 and base["train_tokens"] == 0
    saved = safetensors.torch.load_file(project / "models/tiny/lm/base/model.safetensors")
    for name, tensor in pretrained.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name
    test_ids = read_window_ids(project / "data/tiny/windows/test.parquet")
    assert continuation_perplexity(pretrained, test_ids, P) == pytest.approx(base["test_ppl"], rel=1e-5)
    balm = json.loads((project / "models/tiny/lm/balm_metrics.json").read_text())
    assert balm["applicable"] is False and "train_lm.balm is null" in balm["reason"]
    assert not (project / "models/tiny/lm/balm/config.json").exists()

    params["train_lm"]["base"] = {"init": None, "arch": _tiny_arch(), "optim": {**_tiny_optim(), "max_steps": 0,
                                                                                "warmup_steps": 0}}
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    result = runner.invoke(app, ["train-lm", "tiny", "base"])
    assert result.exit_code == 2 and "train_lm.base" in result.output and "needs a pretrained `init`" in result.output
