from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.core.config import HFSource, IngestConfig, TokenizeConfig, load_dataset_source, load_section
from pipeline.core.errors import RebmError
from tests.conftest import REPO, write_params


def test_repository_params_validate() -> None:
    params = REPO / "params.yaml"
    tok = load_section(TokenizeConfig, "tokenize", params)
    assert (tok.prefix_len, tok.seq_len, tok.continuation_len) == (120, 160, 40)
    load_section(IngestConfig, "ingest", params)
    assert load_dataset_source("news", params).source == "brown"
    assert load_dataset_source("fiction", params).source == "brown"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("tokenize: {vocab_size: 1000, prefix_len: 160, seq_len: 160, stride: 80}",
         r"prefix_len \(160\) must be below seq_len"),
        ("tokenize: {vocab_size: 1000, prefix_len: 10, seq_len: 16, stride: 80}", r"stride \(80\) must not exceed"),
        ("tokenize: {vocab_size: lots, prefix_len: 10, seq_len: 16, stride: 8}",
         r"tokenize\.vocab_size: Input should be a valid integer"),
        ("tokenize: {vocab_sise: 1000, prefix_len: 10, seq_len: 16, stride: 8}",
         r"tokenize\.vocab_sise: Extra inputs are not permitted"),
        ("other: {}", r"missing section 'tokenize'"),
    ],
)
def test_bad_tokenize_params_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    params = write_params(tmp_path / "params.yaml", body)
    with pytest.raises(RebmError, match=message) as info:
        load_section(TokenizeConfig, "tokenize", params)
    assert str(params) in str(info.value)


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", "datasets: {news: {source: brown, categories: [news]}}")
    with pytest.raises(RebmError, match=r"unknown dataset 'books' \(datasets defined: news\)"):
        load_dataset_source("books", params)


def test_dataset_source_errors_are_prefixed_with_the_dataset_key(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", "datasets: {web: {source: hf, path: cc_news, max_docs: -1}}")
    with pytest.raises(RebmError, match=r"datasets\.web\.hf\.max_docs: Input should be greater than 0"):
        load_dataset_source("web", params)
    params = write_params(tmp_path / "params.yaml", "datasets: {web: {source: ftp}}")
    with pytest.raises(RebmError, match=r"datasets\.web: Input tag 'ftp' found using 'source'"):
        load_dataset_source("web", params)


def test_missing_or_broken_params_file(tmp_path: Path) -> None:
    with pytest.raises(RebmError, match="params file not found"):
        load_section(IngestConfig, "ingest", tmp_path / "nope.yaml")
    broken = write_params(tmp_path / "params.yaml", "ingest: [unclosed")
    with pytest.raises(RebmError, match="not valid YAML"):
        load_section(IngestConfig, "ingest", broken)


def test_hf_source_defaults() -> None:
    spec = HFSource(source="hf", path="cc_news")
    assert (spec.split, spec.text_column, spec.streaming, spec.rows_per_doc) == ("train", "text", True, 1)


# --------------------------------------------------------------------------- the whole file
def test_every_params_file_validates_whole() -> None:
    from pipeline.core.config import load_params
    from pipeline.tools.seeds import load_preset

    presets = {REPO / "params/seeds.yaml"}  # not a params file: the seeds of `rebm seeds run`
    assert all(len(load_preset(p).seeds) >= 3 for p in presets)
    for path in [REPO / "params.yaml", *sorted(set((REPO / "params").glob("*.yaml")) - presets)]:
        params = load_params(path)
        base = params.train_lm.base
        # every file trains its base LM, except one that uses a pretrained init as is (smollm2)
        assert set(params.datasets) and (base.optim.max_steps > 0 or base.init is not None), path


def test_the_root_model_holds_the_cross_section_rules(tmp_path: Path) -> None:
    import yaml

    from pipeline.core.config import load_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train_lm"]["ralm"]["arch"]["n_positions"] = raw["tokenize"]["seq_len"] - 1
    raw["negatives"]["top_k"] = 10
    del raw["negatives"]["samples"]["news"]["valid"]
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(RebmError) as info:
        load_params(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: ")
    for key in ("train_lm.ralm.arch.n_positions", "negatives.top_k", "negatives.samples.news.valid"):
        assert key in message, (key, message)


def _fields(model, node, where):
    """(key, code default or MISSING, value in params or MISSING) for every leaf field of `model`."""
    import typing

    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    for name, field in model.model_fields.items():
        key, value = f"{where}.{name}", node.get(name, MISSING) if isinstance(node, dict) else MISSING
        sub = next((t for t in (field.annotation, *typing.get_args(field.annotation))
                    if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if sub is not None and isinstance(value, dict):
            yield from _fields(sub, value, key)
            continue
        default = MISSING
        if field.default is not PydanticUndefined or field.default_factory is not None:
            default = field.get_default(call_default_factory=True)
            default = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
            default = list(default) if isinstance(default, tuple) else default
        yield key, default, value


MISSING = object()


def test_no_code_default_contradicts_params_yaml() -> None:
    # A default of None means "not set" (e.g. train_ebm.unit.init: the pipeline initialises unit);
    # every other default must be what params.yaml says, so deleting a key changes nothing.
    import yaml

    from pipeline.core.config import KeyedSections, Params, Section, unwrap_optional

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    text = (REPO / "params.yaml").read_text()
    contradictions, unnamed = [], []
    def section_model(annotation):  # `X | None` (a section that may be null) -> X; None if not a Section
        model = unwrap_optional(annotation)
        return model if isinstance(model, type) and issubclass(model, Section) else None

    for name, field in Params.model_fields.items():
        model = section_model(field.annotation)
        if model is None:
            continue
        parts = ({k: section_model(f.annotation) for k, f in model.model_fields.items()}
                 if issubclass(model, KeyedSections) else {"": model})
        for key, sub in parts.items():
            node = raw[name][key] if key else raw[name]
            if node is None:
                continue  # null in params.yaml: not applicable to the default run, no defaults to compare
            for where, default, value in _fields(sub, node, f"{name}.{key}" if key else name):
                if value is MISSING:
                    if not re.search(rf"\b{where.rsplit('.', 1)[1]}\b", text):
                        unnamed.append(where)
                elif default is not MISSING and default is not None and default != value:
                    contradictions.append(f"{where}: code {default!r}, params.yaml {value!r}")
    assert not contradictions, contradictions
    assert not unnamed, f"keys only the code knows (name them in params.yaml, at least in a comment): {unnamed}"


def test_the_defaults_check_sees_a_contradiction() -> None:
    from pipeline.core.config import GenerateConfig

    found = {k: (d, v) for k, d, v in _fields(GenerateConfig, {"shard_sequences": 999}, "generate")}
    assert found["generate.shard_sequences"] == (256, 999)


def test_a_section_is_read_with_the_model_params_declares(tmp_path: Path) -> None:
    from pipeline.core.config import EncoderArch, GenerateConfig, load_subsection

    params = write_params(tmp_path / "params.yaml",
                          "tokenize: {vocab_size: 1000, prefix_len: 8, seq_len: 16, stride: 8}")
    with pytest.raises(TypeError, match="tokenize is a TokenizeConfig in Params, not a GenerateConfig"):
        load_section(GenerateConfig, "tokenize", params)
    with pytest.raises(TypeError, match="train_lm.base is a LMVariantConfig"):
        load_subsection(EncoderArch, "train_lm.base", params)


def test_a_null_variant_cannot_be_evaluated_or_generated_with(tmp_path: Path) -> None:
    # null = not applicable to the run; asking evaluate or generate for it is caught before any
    # stage runs, with the key named (and train_ebm.bit without its pretrain_mlm encoder).
    import yaml

    from pipeline.core.config import load_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train_lm"]["balm"] = None
    raw["train_ebm"]["bit_star"] = None
    raw["pretrain_mlm"] = None
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(RebmError) as err:
        load_params(bad)
    message = str(err.value)
    for key in ("evaluate.lms: 'balm' is null in train_lm", "evaluate.energies: 'bit_star' is null in train_ebm",
                "generate.energy: 'bit_star' is null", "stepwise.energy: 'bit_star' is null",
                "pretrain_mlm: null, but train_ebm.bit"):
        assert key in message, (key, message)
    raw["evaluate"]["lms"], raw["evaluate"]["energies"] = ["base", "ralm"], ["unit"]
    raw["evaluate"]["positions"]["energies"], raw["generate"]["energy"] = [], "unit"
    raw["stepwise"]["energy"] = "unit"
    raw["train_ebm"]["bit"] = None
    bad.write_text(yaml.safe_dump(raw))
    params = load_params(bad)
    assert params.train_lm.balm is None and params.pretrain_mlm is None and params.train_ebm.bit is None
