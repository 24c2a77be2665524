"""`rebm bench sample`: new tokens/s of the shared-prefix sampler vs transformers `generate`,
and of 1 vs 2 Ray workers running the negatives pipeline.

Same model, same device, same prefixes, same batch: `generate` gets each prefix repeated n
times (do_sample=True, top_k=0, i.e. the full distribution, exactly what the sampler draws
from). Without a model directory the model is a random init of `arch`: GPT-2 or a
Llama-architecture model of about the same size as the default base LM (d 256, 4 layers,
vocab 8192). On CUDA the timings synchronise the device; the Ray part runs on CPU only.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def _bench_model(model_dir: Path | None, arch: str, device):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from pipeline.models.lm import load_lm

    if model_dir is not None and Path(model_dir).exists():
        return load_lm(model_dir, device), str(model_dir)
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=8192, n_positions=160, n_embd=256, n_layer=4, n_head=4, bos_token_id=0,
                         eos_token_id=0)
        model, name = GPT2LMHeadModel(cfg), "random-init GPT-2 (4 layers, d 256, 4 heads, vocab 8192"
    elif arch == "llama":
        # The base LM's size: d 256, 4 layers, 4 heads (here on 2 key/value heads), a SwiGLU MLP of
        # 3 x 256 x 688 weights (GPT-2's 2 x 256 x 1024), tied embeddings, 160 positions.
        cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
        name = "random-init Llama (4 layers, d 256, 4 heads / 2 KV heads, SwiGLU 688, vocab 8192"
    else:
        raise ValueError(f"arch must be gpt2 or llama, got {arch!r}")
    params = sum(p.numel() for p in model.parameters())
    return model.to(device).eval(), f"{name}, {params / 1e6:.1f}M parameters)"


def _prefixes(windows_file: Path | None, count: int, prefix_len: int, vocab: int) -> tuple[np.ndarray, np.ndarray, str]:
    if windows_file is not None and Path(windows_file).exists():
        from pipeline.data.tokenization import read_windows

        ids, windows = read_windows(Path(windows_file))
        pre = windows[:, :prefix_len]
        if len(ids) >= count and int(pre.max()) < vocab:
            return ids[:count], pre[:count], str(windows_file)
    rng = np.random.default_rng(0)
    return np.arange(count, dtype=np.int64), rng.integers(0, vocab, size=(count, prefix_len)), "random token ids"


def run_bench(
    model_dir: Path | None = None,
    windows_file: Path | None = None,
    windows: int = 8,
    n: int = 16,
    prefix_len: int = 120,
    new_tokens: int = 40,
    ray_windows: int = 64,
    repeats: int = 2,
    arch: str = "gpt2",
    device: str = "cpu",
) -> dict:
    import torch

    from pipeline.core.precision import resolve_device
    from pipeline.sampling.sampler import Sampler

    dev = resolve_device(device)
    model, model_name = _bench_model(model_dir, arch, dev)
    vocab = model.config.vocab_size
    ids, pre, source = _prefixes(windows_file, max(windows, ray_windows), prefix_len, vocab)
    tokens = windows * n * new_tokens
    result: dict = {
        "model": model_name, "prefixes": source, "windows": windows, "n": n, "prefix_len": prefix_len,
        "new_tokens": new_tokens, "torch_threads": torch.get_num_threads(), "device": str(dev),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    x = torch.from_numpy(pre[:windows]).repeat_interleave(n, dim=0).to(dev)

    def generate(ids_: torch.Tensor, steps: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                ids_, attention_mask=torch.ones_like(ids_), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0,
            )

    sampler = Sampler(model, top_k=0, batch_samples=windows * n)
    generate(x[:n], 2)  # warm up both
    sampler.sample(pre[:1], ids[:1], n, 2, seed=0)
    best = {"generate": float("inf"), "sampler": float("inf")}
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = generate(x, new_tokens)
        sync()
        best["generate"] = min(best["generate"], time.perf_counter() - t0)
        assert out.shape == (windows * n, prefix_len + new_tokens)
        sync()
        t0 = time.perf_counter()
        sampler.sample(pre[:windows], ids[:windows], n, new_tokens, seed=0)  # ends with the copy to the host
        sync()
        best["sampler"] = min(best["sampler"], time.perf_counter() - t0)
    result["generate_tokens_per_s"] = round(tokens / best["generate"], 1)
    result["sampler_tokens_per_s"] = round(tokens / best["sampler"], 1)
    result["sampler_path"] = sampler.path
    result["speedup_vs_generate"] = round(best["generate"] / best["sampler"], 2)
    if dev.type != "cpu":
        result["ray"] = f"skipped (the 1-vs-2 Ray workers run is CPU-only; device {dev})"
    elif ray_windows <= 0:
        result["ray"] = "skipped (--ray-windows 0)"
    else:
        result["ray"] = _bench_ray(model, pre[:ray_windows], ids[:ray_windows], n, new_tokens, windows)
    return result


def _bench_ray(model, prefixes: np.ndarray, ids: np.ndarray, n: int, new_tokens: int, shard_windows: int) -> dict:
    """The negatives pipeline on `len(ids)` windows with 1 then 2 single-CPU workers."""
    from pipeline.sampling.actor_pool import ray_session
    from pipeline.sampling.negatives import NegativesSettings, SplitInput, generate_negatives

    out: dict = {"windows": int(len(ids))}
    with tempfile.TemporaryDirectory(prefix="rebm-bench-") as tmp, ray_session(num_cpus=2):
        model.save_pretrained(Path(tmp) / "model")
        for workers in (1, 2):
            settings = NegativesSettings(new_tokens=new_tokens, top_k=0, seed=0, shard_windows=shard_windows,
                                         batch_samples=shard_windows * n, num_workers=workers, cpus_per_worker=1)
            stats = generate_negatives(Path(tmp) / "model", {"bench": SplitInput(ids, prefixes, n)},
                                       Path(tmp) / f"out{workers}", settings, progress=False)
            out[f"workers_{workers}_tokens_per_s"] = stats["new_tokens_per_second"]
            out[f"workers_{workers}_wall_seconds"] = stats["wall_seconds"]
        same = all(
            (Path(tmp) / "out1" / "bench" / f.name).read_bytes() == f.read_bytes()
            for f in sorted((Path(tmp) / "out2" / "bench").glob("shard-*.parquet"))
        )
    out["speedup_2_vs_1"] = round(out["workers_2_tokens_per_s"] / out["workers_1_tokens_per_s"], 2)
    out["identical_output"] = same
    return out


def format_report(r: dict) -> str:
    lines = [
        f"model: {r['model']}; prefixes: {r['prefixes']}",
        f"{r['windows']} windows x n={r['n']} samples, prefix {r['prefix_len']}, {r['new_tokens']} new tokens, "
        f"device {r['device']} ({r['dtype']}), {r['torch_threads']} torch threads",
        f"  transformers generate (top_k=0): {r['generate_tokens_per_s']:>9.0f} new tokens/s",
        f"  shared-prefix sampler ({r['sampler_path']}): {r['sampler_tokens_per_s']:>9.0f} new tokens/s",
        f"  ratio sampler / generate: {r['speedup_vs_generate']:.2f}x",
    ]
    ray = r["ray"]
    if isinstance(ray, str):
        return "\n".join([*lines, f"Ray negatives pipeline: {ray}"])
    return "\n".join(
        [
            *lines,
            f"Ray negatives pipeline, {ray['windows']} windows (1-CPU workers, excl. actor start-up):",
            f"  1 worker : {ray['workers_1_tokens_per_s']:>9.0f} new tokens/s (wall {ray['workers_1_wall_seconds']} s)",
            f"  2 workers: {ray['workers_2_tokens_per_s']:>9.0f} new tokens/s (wall {ray['workers_2_wall_seconds']} s)",
            f"  ratio 2 / 1: {ray['speedup_2_vs_1']:.2f}x; identical shards: {ray['identical_output']}",
        ]
    )
