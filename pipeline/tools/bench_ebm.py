"""`rebm bench ebm`: energy-model throughput, training and scoring, against the base LM.

The named baseline is the base LM's own forward pass over the same windows: the energy is
applied on top of that LM, so "scoring costs k LM forwards" is the number a researcher
planning an evaluation or Algorithm 1 run needs.
"""

from __future__ import annotations

import functools
import time

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

from pipeline.core.paths import DatasetPaths
from pipeline.core.variants import ENERGY_VARIANTS
from pipeline.data.tokenization import read_window_ids
from pipeline.models.energy import EnergyModel, EnergyScorer, nce_loss, resolve_pretrained
from pipeline.models.lm import load_lm


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, tokenizer caches
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _bodies(paths: DatasetPaths, bit_star: str) -> dict[str, str]:
    bodies = {"unit": paths.lm("base"), "bit": paths.mlm}
    found = {name: str(path) for name, path in bodies.items() if (path / "config.json").exists()}
    found["bit_star"] = resolve_pretrained(bit_star)
    return found


def ebm_benchmark(dataset: str, bit_star: str, batch: int = 16, repeats: int = 3) -> dict:
    """Sequences/s for NCE training steps (batch real + batch LM windows) and for scoring."""
    transformers.logging.set_verbosity_error()  # loading an LM checkpoint as a bare body reports its unused head
    paths = DatasetPaths(dataset)
    windows = torch.from_numpy(read_window_ids(paths.windows_split("valid"))[: 2 * batch])
    lm_tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    report: dict = {"dataset": dataset, "sequences_per_batch": 2 * batch, "seq_len": windows.shape[1],
                    "threads": torch.get_num_threads()}

    base = load_lm(paths.lm("base")).eval()
    with torch.inference_mode():
        lm_seconds = _timed(lambda: base(input_ids=windows), repeats)
    report["baseline"] = {"name": "base LM forward", "sequences_per_s": round(len(windows) / lm_seconds, 1)}

    for variant, source in _bodies(paths, bit_star).items():
        model = EnergyModel.from_body(AutoModel.from_pretrained(source), "unit" if variant == "unit" else "bit")
        scorer = EnergyScorer(model, AutoTokenizer.from_pretrained(source), lm_tokenizer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def train_step(scorer: EnergyScorer = scorer, optimizer: torch.optim.Optimizer = optimizer) -> None:
            energies = scorer(windows)
            nce_loss(energies[:batch], energies[batch:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        model.train()
        train_seconds = _timed(train_step, repeats)
        model.eval()
        with torch.inference_mode():
            score_seconds = _timed(functools.partial(scorer, windows), repeats)
        report[variant] = {
            "body": source,
            "parameters": sum(p.numel() for p in model.parameters()),
            "input": "token ids" if scorer.shares_vocab else "detokenised text",
            "train_sequences_per_s": round(len(windows) / train_seconds, 1),
            "score_sequences_per_s": round(len(windows) / score_seconds, 1),
            "score_cost_in_lm_forwards": round(score_seconds / lm_seconds, 2),
        }
    return report


def format_report(r: dict) -> str:
    lines = [
        f"rebm bench ebm — {r['dataset']} valid windows, {r['sequences_per_batch']} sequences of "
        f"{r['seq_len']} tokens per batch, {r['threads']} threads",
        f"baseline: {r['baseline']['name']}: {r['baseline']['sequences_per_s']} sequences/s",
    ]
    for variant in ENERGY_VARIANTS:
        if variant in r:
            v = r[variant]
            lines.append(
                f"{variant:9s} {v['parameters'] / 1e6:5.1f}M params ({v['input']}): "
                f"train {v['train_sequences_per_s']} seq/s, score {v['score_sequences_per_s']} seq/s "
                f"= {v['score_cost_in_lm_forwards']}x the base LM forward"
            )
    missing = [v for v in ("unit", "bit") if v not in r]
    if missing:
        lines.append(f"(skipped {', '.join(missing)}: train the base LM / pretrain_mlm first)")
    return "\n".join(lines)



