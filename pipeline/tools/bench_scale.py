"""`rebm bench scale`: peak memory of tokenize, train_ebm and evaluate as the corpus grows.

For each size S (GB of int32 tokens in the train split) the benchmark writes a synthetic
corpus in this project's layout under a scratch directory: documents whose text decodes random
token ids of a tokenizer (the default's `data/news/tokenizer` when it exists, else a small BPE
trained here), valid and test splits of a few documents, then measures three stages, each in a
fresh Python process whose peak RSS is read from the kernel (`os.wait4`):

tokenize   `stages.tokenize.run` on those documents (the tokenizer loaded as `pretrained`).
train_ebm  the NCE data of the whole train split (`load_nce_data`: windows and one synthetic LM
           sample per window streamed into the on-disk store) and a few steps of a small energy.
evaluate   the evaluate stage's read of its test windows (`evaluate.windows` of them, spread
           over the split, and their documents) from a test split the size of train, and their
           LM log-probs under a small LM.
The synthetic LM samples are random ids (no sampling: it would dominate the time and its memory
is the negatives actor's, which does not depend on the corpus). The goal is flat: the largest
size's peak within 1.3x of the smallest's for every stage (`flat` in the result).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from pipeline.core.errors import RebmError
from pipeline.core.io import StreamingTableWriter, write_json
from pipeline.core.paths import DatasetPaths

SIZES_GB = (0.25, 1.0, 4.0)
QUICK_SIZES_GB = (0.005, 0.02)
STAGES = ("tokenize", "train_ebm", "evaluate")
FLAT = 1.3
DATASET = "bench"
DOC_TOKENS = 2048
DOCS_ROW_GROUP = 512  # documents per row group of the synthetic docs (4 MB of text): every size has several
SMALL_SPLIT_DOCS = 16


# --------------------------------------------------------------------------- the corpus
def paths_of(project: Path) -> DatasetPaths:
    return DatasetPaths(DATASET, project)


def bench_tokenizer(repo: Path, scratch: Path) -> tuple[Path, str]:
    """(tokenizer directory, what it is): the default's news tokenizer, else a small BPE made here."""
    from pipeline.data.tokenization import train_bpe_tokenizer

    default = repo / "data" / "news" / "tokenizer"
    if default.exists():
        return default, str(default)
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(2000)]
    tokenizer = train_bpe_tokenizer((" ".join(rng.choice(words, 200)) for _ in range(500)), 2048, 2)
    tokenizer.save_pretrained(scratch / "tokenizer")
    return scratch / "tokenizer", "a 2,048-token BPE trained on random words (no data/news/tokenizer here)"


def write_corpus(project: Path, tokenizer_dir: Path, train_tokens: int, seed: int = 0) -> None:
    """docs/{train,valid,test}.parquet: text decoded from random token ids, DOC_TOKENS per document;
    test as large as train (evaluate reads a few windows of it), valid SMALL_SPLIT_DOCS documents."""
    from transformers import AutoTokenizer

    from pipeline.data.corpora import DOCS_SCHEMA

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = set(tokenizer.all_special_ids)
    pieces = np.array([tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special], dtype=object)
    rng = np.random.default_rng(seed)
    paths_of(project).docs.mkdir(parents=True, exist_ok=True)
    sizes = {"train": train_tokens, "valid": SMALL_SPLIT_DOCS * DOC_TOKENS, "test": train_tokens}
    for split, tokens in sizes.items():
        with StreamingTableWriter(paths_of(project).docs_split(split), DOCS_SCHEMA, DOCS_ROW_GROUP) as writer:
            for d in range(max(1, tokens // DOC_TOKENS)):
                writer.append(doc_id=f"{split}-{d}", text="".join(pieces[rng.integers(0, len(pieces), DOC_TOKENS)]),
                              source="bench")


def write_negatives(project: Path, prefix_len: int, seed: int = 0) -> None:
    """One random continuation per train and valid window, as the negatives stage's shards and manifest."""
    from pipeline.data.tokenization import WindowReader
    from pipeline.sampling.negatives import negatives_table, shard_name

    paths = paths_of(project)
    rng = np.random.default_rng(seed)
    manifest: dict = {"splits": {}}
    for split in ("train", "valid"):
        reader = WindowReader(paths.windows_split(split))
        paths.negatives_split(split).mkdir(parents=True, exist_ok=True)
        for index, (_, ids, tokens) in enumerate(reader.blocks(4096)):
            L, k = tokens.shape[1] - prefix_len, len(ids)
            sampled = rng.integers(1, int(tokens.max()) + 1, (k, 1, L))
            table = negatives_table(ids, sampled, np.zeros((k, 1, L)), np.zeros((k, 1)))
            pq.write_table(table, paths.negatives_split(split) / shard_name(index))
        manifest["splits"][split] = {"windows": reader.rows, "n": 1, "rows": reader.rows}
    write_json(paths.negatives / "manifest.json", manifest)


def write_params(project: Path, repo_params: Path, tokenizer_dir: Path) -> Path:
    raw = yaml.safe_load(repo_params.read_text(encoding="utf-8"))
    raw["tokenize"]["pretrained"] = str(tokenizer_dir)
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the measured stages
def run_tokenize(project: Path) -> dict:
    from stages import tokenize

    summary = tokenize.run(DATASET, project / "params.yaml", root=project)
    return {"windows": {s: v["windows"] for s, v in summary["splits"].items()}}


def run_train_ebm(project: Path) -> dict:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    from pipeline.core.config import OptimConfig, TokenizeConfig, load_section
    from pipeline.models.energy import EnergyModel, EnergyScorer
    from pipeline.training.ebm_data import load_nce_data
    from pipeline.training.nce import train_energy

    paths = paths_of(project)
    tok = load_section(TokenizeConfig, "tokenize", project / "params.yaml")
    train = load_nce_data(paths.windows_split("train"), paths.negatives_split("train"), tok.prefix_len, scratch=project)
    valid = load_nce_data(paths.windows_split("valid"), paths.negatives_split("valid"), tok.prefix_len, limit=16,
                          scratch=project)
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    torch.manual_seed(0)
    body = GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_positions=tok.seq_len, n_embd=32, n_layer=1, n_head=2))
    scorer = EnergyScorer(EnergyModel.from_body(body, "unit"), tokenizer, tokenizer)
    cfg = OptimConfig(batch_size=8, max_steps=3, warmup_steps=1, max_lr=1e-3, max_grad_norm=1.0, eval_every=3,
                      eval_batch_size=16, checkpoint_every=3, precision="fp32")
    result = train_energy(scorer, train, valid, cfg, seed=0, checkpoint_dir=project / "ebm-checkpoints",
                          device=torch.device("cpu"), fingerprint="bench-scale", desc="bench scale")
    return {"train_windows": len(train), "steps": result.steps}


def run_evaluate(project: Path) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.core.config import EvaluateConfig, TokenizeConfig, load_section
    from pipeline.data.tokenization import WindowReader, window_documents
    from pipeline.estimation.evaluation import evenly_spaced
    from pipeline.estimation.perplexity import continuation_logprobs

    paths, params = paths_of(project), project / "params.yaml"
    cfg = load_section(EvaluateConfig, "evaluate", params)
    tok = load_section(TokenizeConfig, "tokenize", params)
    reader = WindowReader(paths.windows_split("test"))  # as stages/evaluate.py reads it
    window_ids, windows = reader.take(evenly_spaced(cfg.windows or reader.rows, reader.rows))
    documents = window_documents(paths.windows_split("test"), window_ids)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=int(windows.max()) + 1, n_positions=tok.seq_len, n_embd=32,
                                    n_layer=1, n_head=2)).eval()
    logprobs = continuation_logprobs(lm, windows, tok.prefix_len, 8, torch.device("cpu"))
    return {"test_windows": reader.rows, "evaluated": len(window_ids), "documents": len(set(documents)),
            "mean_logprob": float(logprobs.mean())}


MEASURED = {"tokenize": run_tokenize, "train_ebm": run_train_ebm, "evaluate": run_evaluate}


def peak_rss_mib() -> float:
    """This process's peak RSS since its exec: VmHWM of /proc/self/status. (`ru_maxrss` would not
    do: Linux carries it across fork and exec, so a child reports at least its parent's RSS at the
    fork, here the benchmark's own.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource  # not Linux: the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def child(stage: str, project: str) -> None:
    """Entry point of a measured process: run one stage, print its summary and its peak RSS as JSON."""
    summary = MEASURED[stage](Path(project))
    print(json.dumps({**summary, "peak_rss_mib": peak_rss_mib()}))


def measure(stage: str, project: Path) -> tuple[float, dict, float]:
    """(peak RSS MiB, the stage's summary, seconds) of `stage` in a fresh Python process."""
    code = f"from pipeline.tools.bench_scale import child; child({stage!r}, {str(project)!r})"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RebmError(f"bench scale: {stage} failed on {project}:\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return summary.pop("peak_rss_mib"), summary, time.perf_counter() - started


# --------------------------------------------------------------------------- the benchmark
def parse_sizes(text: str) -> tuple[float, ...]:
    try:
        sizes = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise RebmError(f"bench scale: --sizes must be GB numbers separated by commas, got {text!r}") from None
    if len(sizes) < 2 or any(x <= 0 for x in sizes) or list(sizes) != sorted(sizes):
        raise RebmError(f"bench scale: --sizes needs at least two increasing positive sizes, got {text!r}")
    return sizes


def scale_benchmark(sizes: tuple[float, ...], params: Path, workdir: Path, keep: bool = False,
                    log=print) -> dict:
    """Peak RSS (MiB) of each measured stage at each size; `flat` per stage: largest ≤ 1.3 x smallest."""
    from pipeline.core.config import TokenizeConfig, load_section

    repo = Path(params).resolve().parent
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir, tokenizer_text = bench_tokenizer(repo, workdir)
    prefix_len = load_section(TokenizeConfig, "tokenize", params).prefix_len
    peak: dict[str, list[float]] = {s: [] for s in STAGES}
    seconds: dict[str, list[float]] = {s: [] for s in STAGES}
    details = []
    try:
        for size in sizes:
            project = workdir / f"size-{size:g}gb"
            shutil.rmtree(project, ignore_errors=True)
            project.mkdir(parents=True)
            started = time.perf_counter()
            write_corpus(project, tokenizer_dir, int(size * 1e9 / 4))
            write_params(project, Path(params), tokenizer_dir)
            log(f"{size:g} GB: corpus written in {time.perf_counter() - started:.0f} s")
            row = {"size_gb": size}
            for stage in STAGES:
                if stage == "train_ebm":
                    write_negatives(project, prefix_len)
                rss, summary, secs = measure(stage, project)
                peak[stage].append(round(rss, 1))
                seconds[stage].append(round(secs, 1))
                row[stage] = summary
                log(f"{size:g} GB: {stage} peak RSS {rss:,.0f} MiB in {secs:.0f} s  {summary}")
            details.append(row)
            if not keep:
                shutil.rmtree(project, ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ratio = {s: round(v[-1] / v[0], 3) for s, v in peak.items()}
    return {"sizes_gb": list(sizes), "peak_rss_mib": peak, "seconds": seconds, "ratio_largest_to_smallest": ratio,
            "flat": {s: r <= FLAT for s, r in ratio.items()}, "baseline": f"the smallest size, {sizes[0]:g} GB",
            "tokenizer": tokenizer_text, "details": details}


def format_scale(result: dict) -> str:
    sizes = result["sizes_gb"]
    lines = [f"peak RSS (MiB) per stage, train split of {', '.join(f'{s:g}' for s in sizes)} GB of int32 tokens "
             f"(baseline: {result['baseline']}; goal: largest ≤ {FLAT}x baseline)"]
    lines.append(f"{'stage':10s} " + " ".join(f"{s:>10g}" for s in sizes) + "   ratio  flat")
    for stage, values in result["peak_rss_mib"].items():
        flat = "yes" if result["flat"][stage] else "NO"
        lines.append(f"{stage:10s} " + " ".join(f"{v:10.0f}" for v in values)
                     + f"   {result['ratio_largest_to_smallest'][stage]:.2f}  {flat}")
    lines.append(f"tokenizer: {result['tokenizer']}")
    return "\n".join(lines)
