"""Stage `stepwise` and `rebm generate --method stepwise`: Appendix A.1 run on a pool of workers.

`StepwiseWorker` holds the base LM and the energy; one call estimates one context's K
candidates (`pipeline.generation.stepwise` has the math). `StepwiseRun` finds the contexts in
LM samples of evenly spaced test prefixes, runs one pool task per context (each saved to a
checkpoint as it lands, so a killed run redoes only what is missing) and turns the results
into the candidates table, Table 3 and the repetition claim. `stepwise_decode` is top-k
auto-regressive sampling (§3.3) on one prompt, in this process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.core.config import NegativesConfig, StepwiseConfig
from pipeline.core.io import ArrayCheckpoint, fingerprint, write_table, write_text
from pipeline.core.seeds import stepwise_seed
from pipeline.generation.stepwise import (
    CANDIDATES_SCHEMA,
    ContextPair,
    context_converged,
    log_ratio_at,
    pick_pairs,
    plug_in,
    repetition_claims,
    step_distribution,
    would_repeat,
)
from pipeline.sampling.actor_pool import PoolStats, Task, make_pool, ship

KINDS = ("repetition", "control")


class StepwiseWorker:
    """A pool worker with the base LM (full-distribution sampler) and the energy."""

    def __init__(self, lm_source, energy_source, tokenizer_source, threads: int, batch_samples: int, dtype: str,
                 precision: str, batch_size: int, device: str = "cpu"):
        from pipeline.estimation.scoring import EnergyWorker
        from pipeline.sampling.negatives import SamplerWorker

        self.lm = SamplerWorker(lm_source, threads, 0, batch_samples, dtype, device)
        self.energy = EnergyWorker(energy_source, tokenizer_source, threads, precision, batch_size, device)
        self.batch_samples = max(1, batch_samples)

    def ready(self) -> dict:
        return self.lm.ready()

    def candidate_weights(self, context: np.ndarray, observed: int, K: int, n: int, seq_len: int,
                          seed: int) -> dict[str, np.ndarray]:
        """The base LM's top K next tokens after `context` (with `observed` swapped in for the K-th
        when it is not among them), log P_LM of each, and −E of n completions of each [K, n]
        (one exact column when the candidate is the window's last token)."""
        from pipeline.estimation.evaluation import completed_windows

        context = np.array(context, dtype=np.int64)  # a copy: arrays from Ray are read-only
        model = self.lm.sampler.model
        with torch.inference_mode():
            logits = model(input_ids=torch.as_tensor(context[None], device=self.lm.device)).logits[0, -1]
        logp = torch.log_softmax(logits.double(), -1).cpu()
        top = torch.topk(logp, K).indices.numpy().astype(np.int64)
        if observed >= 0 and observed not in top:
            top[-1] = observed
        prefixes = np.concatenate([np.repeat(context[None], K, 0), top[:, None]], axis=1)
        remaining = seq_len - prefixes.shape[1]
        if remaining <= 0:
            energies = self.energy.score(prefixes)[:, None]
        else:
            energies = np.empty((K, n))
            for a in range(0, n, self.batch_samples):  # bounded: K × batch_samples windows at a time
                m = min(self.batch_samples, n - a)
                tokens = self.lm.sample(top, prefixes, m, remaining, seed, a)["tokens"].astype(np.int64)
                full = completed_windows(prefixes, prefixes.shape[1], tokens)
                energies[:, a : a + m] = self.energy.score(full.reshape(K * m, -1)).reshape(K, m)
        return {"candidates": top, "base_logprob": logp[top].numpy(), "log_weights": -energies}


def worker_args(lm_dir: Path, energy_dir: Path, tokenizer_dir: Path, cfg: StepwiseConfig, neg: NegativesConfig,
                dtype: str, device: str) -> tuple:
    local = cfg.num_workers == 0
    threads = torch.get_num_threads() if local else cfg.cpus_per_worker
    return (ship(lm_dir, local), ship(energy_dir, local), ship(tokenizer_dir, local, require_config=False), threads,
            neg.batch_samples, dtype, cfg.precision, cfg.batch_size, device)


@dataclass(frozen=True)
class Context:
    pair: int
    kind: str
    window_id: int
    doc_id: str
    window: np.ndarray  # the LM-sampled window [T]
    position: int

    @property
    def observed(self) -> int:
        return int(self.window[self.position])


@dataclass
class StepwiseRun:
    """The stage's computation on `windows` (evenly spaced test windows [W, T]) and their documents."""

    window_ids: np.ndarray
    windows: np.ndarray
    documents: np.ndarray
    prefix_len: int
    cfg: StepwiseConfig
    seed: int
    checkpoint: ArrayCheckpoint
    progress: bool = True
    stats: PoolStats = field(default_factory=PoolStats)

    def sampled_windows(self, lm_dir: Path, device: Any, dtype: str) -> np.ndarray:
        """Each prefix completed by one top-k LM sample (generate's k): where repetitions are found."""
        from pipeline.models.lm import load_lm
        from pipeline.sampling.sampler import Sampler

        L = self.windows.shape[1] - self.prefix_len
        sampler = Sampler(load_lm(lm_dir, device, dtype=dtype), top_k=self.cfg.lm_top_k)
        drawn = sampler.sample(self.windows[:, : self.prefix_len], self.window_ids, 1, L,
                               stepwise_seed(self.seed, "contexts"))
        return np.concatenate([self.windows[:, : self.prefix_len], drawn.tokens[:, 0].astype(np.int64)], axis=1)

    def contexts(self, sampled: np.ndarray) -> list[Context]:
        pairs: list[ContextPair] = pick_pairs(sampled, self.prefix_len, self.cfg.ngram, self.cfg.pairs, self.documents)
        return [Context(i, kind, int(self.window_ids[p.row]), str(self.documents[p.row]), sampled[p.row],
                        p.repetition if kind == "repetition" else p.control)
                for i, p in enumerate(pairs) for kind in KINDS]

    def summarise(self, c: Context, r: dict[str, np.ndarray]) -> dict[str, Any]:
        """One context's estimates over its K candidates (Eq. 5 with Eq. 4's range, the n/2 plug-in,
        the convergence verdict): what the outputs need, so the K x n weights are dropped at once."""
        w = r["log_weights"]
        est = step_distribution(r["base_logprob"], w)
        watched = np.union1d(np.argsort(-est.point)[: self.cfg.show], np.flatnonzero(r["candidates"] == c.observed))
        converged, _ = context_converged(w, watched, self.cfg.convergence.epsilon, self.cfg.convergence.min_samples)
        return {"candidates": r["candidates"], "estimate": est, "converged": converged, "samples": w.shape[1],
                "half": plug_in(r["base_logprob"], w[:, : max(1, w.shape[1] // 2)])}

    def estimate(self, contexts: list[Context], models_key: str, pool_factory) -> list[dict[str, Any]]:
        """Every context's summary (`summarise`): from the checkpoint, else computed on the pool.
        The driver holds K numbers per context, never the K x n weights of more than one."""
        K, n, T = self.cfg.candidates, self.cfg.samples, self.windows.shape[1]
        keys = [fingerprint(models_key, K, n, c.window_id, c.position, c.window[: c.position + 1]) for c in contexts]
        results: list[dict | None] = []
        for i, (c, key) in enumerate(zip(contexts, keys, strict=True)):
            saved = self.checkpoint.load(f"context-{i}", key)
            results.append(None if saved is None else self.summarise(c, saved))
        todo = [i for i, r in enumerate(results) if r is None]
        self.stats.shards_reused = len(contexts) - len(todo)
        if todo:
            bar = tqdm(total=len(contexts), initial=len(contexts) - len(todo), desc="stepwise contexts",
                       unit="context", disable=not self.progress)

            def done(task: Task, out: dict) -> None:
                self.checkpoint.save(f"context-{task.payload}", keys[task.payload], **out)
                results[task.payload] = self.summarise(contexts[task.payload], out)
                self.stats.shards_computed += 1
                bar.update(1)

            tasks = [Task(i, "candidate_weights", (contexts[i].window[: contexts[i].position], contexts[i].observed,
                                                   K, n, T, stepwise_seed(self.seed, contexts[i].window_id,
                                                                          contexts[i].position)), i) for i in todo]
            pool = pool_factory()
            try:
                pool.run(tasks, done, self.stats)
            finally:
                pool.shutdown()
                bar.close()
        return results  # type: ignore[return-value]

    def table(self, contexts: list[Context], results: list[dict], decode) -> pa.Table:
        rows: dict[str, list] = {f.name: [] for f in CANDIDATES_SCHEMA}
        for c, r in zip(contexts, results, strict=True):
            est = r["estimate"]
            repeats = would_repeat(c.window[: c.position], r["candidates"], self.cfg.ngram)
            for rank, token in enumerate(r["candidates"]):
                values = (c.pair, c.kind, c.window_id, c.doc_id, c.position, c.observed, rank, int(token),
                          decode([int(token)]), bool(repeats[rank]), float(est.base[rank]), float(est.point[rank]),
                          float(est.low[rank]), float(est.high[rank]), float(r["half"][rank]), r["converged"],
                          r["samples"])
                for name, value in zip(rows, values, strict=True):
                    rows[name].append(value)
        return pa.Table.from_pydict(rows, schema=CANDIDATES_SCHEMA)


def pair_log_ratios(contexts: list[Context], results: list[dict]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per pair d = log P_K,joint(x_t) − log P_K,base(x_t) (plug-in, low, high) of both contexts,
    and each pair's document."""
    out: dict[str, list[float]] = {k: [] for k in ("rep", "rep_low", "rep_high", "ctrl", "ctrl_low", "ctrl_high")}
    documents = []
    for c, r in zip(contexts, results, strict=True):
        index = int(np.flatnonzero(r["candidates"] == c.observed)[0])
        point, low, high = log_ratio_at(r["estimate"], index)
        key = "rep" if c.kind == "repetition" else "ctrl"
        out[key].append(point)
        out[f"{key}_low"].append(low)
        out[f"{key}_high"].append(high)
        if c.kind == "repetition":
            documents.append(c.doc_id)
    return {k: np.array(v) for k, v in out.items()}, np.array(documents)


def _top_rows(ctx, column: str, cfg: StepwiseConfig) -> list[dict]:
    """A model's top `renormalise_top` candidates renormalised among themselves, first `show` kept;
    the joint's Eq. 4 range scaled by the same renormalisation."""
    top = ctx.nlargest(cfg.renormalise_top, column)
    log_norm = np.logaddexp.reduce(top[column].to_numpy())
    rows = []
    for _, r in top.head(cfg.show).iterrows():
        label = f"**{r['text']!r}** ↺" if r["repeats"] else repr(r["text"])
        rows.append({"label": label, "p": float(np.exp(r[column] - log_norm)),
                     "low": float(np.exp(r["joint_logprob_low"] - log_norm)),
                     "high": float(np.exp(r["joint_logprob_high"] - log_norm))})
    return rows


def table3_markdown(table: pa.Table, cfg: StepwiseConfig, dataset: str, joint: str, energy_name: str,
                    context_text: dict[int, str]) -> str:
    """Table 3 (templates/table3.md.j2): `cfg.examples` repetition contexts, converged ones first;
    `context_text` maps a pair to the decoded tail of its context."""
    import jinja2

    data = table.to_pandas()
    reps = data[data["kind"] == "repetition"]
    firsts = reps.groupby("pair").first().reset_index().sort_values(["converged", "pair"], ascending=[False, True])
    examples = []
    for pair in firsts["pair"].head(cfg.examples):
        ctx = reps[reps["pair"] == pair]
        observed = ctx[ctx["token"] == ctx["observed"].iloc[0]].iloc[0]
        examples.append({
            "window_id": int(observed["window_id"]), "position": int(observed["position"]),
            "converged": bool(observed["converged"]), "observed_text": repr(observed["text"]),
            "context_text": context_text.get(int(pair), "").replace("\n", " ⏎ "),  # one Markdown paragraph
            "rows": list(zip(_top_rows(ctx, "base_logprob", cfg), _top_rows(ctx, "joint_logprob", cfg), strict=True)),
            **{f"observed_{k}": float(np.exp(observed[c])) for k, c in (
                ("base", "base_logprob"), ("joint", "joint_logprob"), ("low", "joint_logprob_low"),
                ("high", "joint_logprob_high"))},
        })
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=False,
                             keep_trailing_newline=True)
    return env.get_template("table3.md.j2").render(
        dataset=dataset, joint=joint, energy_name=energy_name, K=cfg.candidates, n=cfg.samples, show=cfg.show,
        renormalise=cfg.renormalise_top, ngram=cfg.ngram, examples=examples)


def write_outputs(work: StepwiseRun, contexts: list[Context], results: list[dict], paths, dataset: str) -> dict:
    """The candidates table, Table 3 and the claim (metrics, without the wall time) of a finished run."""
    from pipeline.core.variants import DISPLAY_NAMES
    from pipeline.models.lm import load_tokenizer

    cfg = work.cfg
    tokenizer = load_tokenizer(paths.tokenizer, "stepwise")
    table = work.table(contexts, results, tokenizer.decode)
    write_table(paths.stepwise_file, table, CANDIDATES_SCHEMA)
    context_text = {c.pair: tokenizer.decode(c.window[max(0, c.position - 60) : c.position].tolist())
                    for c in contexts if c.kind == "repetition"}
    joint = DISPLAY_NAMES[cfg.energy]
    write_text(paths.stepwise_results / "table3.md",
               table3_markdown(table, cfg, dataset, joint, cfg.energy, context_text))
    ratios, documents = pair_log_ratios(contexts, results)
    return {
        "dataset": dataset, "energy": cfg.energy, "joint": joint, "candidates": cfg.candidates,
        "samples": cfg.samples, "ngram": cfg.ngram, "windows_searched": len(work.window_ids),
        "pairs": len(contexts) // 2, "contexts": len(results),
        "contexts_converged": sum(bool(r["converged"]) for r in results),
        "claim": repetition_claims(ratios, documents, cfg.bootstrap.level, cfg.bootstrap.resamples, work.seed),
        "pool": {"contexts_computed": work.stats.shards_computed, "contexts_reused": work.stats.shards_reused},
    }


def make_worker_pool(args: tuple, cfg: StepwiseConfig):
    def factory():
        return make_pool(StepwiseWorker, args, cfg.num_workers, cfg.cpus_per_worker, name="stepwise",
                         gpus_per_worker=cfg.gpus_per_worker)
    return factory


# --------------------------------------------------------------------------- §3.3 decoding
def stepwise_decode(worker: StepwiseWorker, prefix: np.ndarray, steps: int, K: int, n: int, seq_len: int, seed: int,
                    progress: bool = True) -> dict[str, Any]:
    """Top-k auto-regressive sampling: each next token drawn from the plug-in Eq. 5 distribution
    over the base LM's top K (n completions each). Cost: steps × K × n LM samples and energies."""
    tokens = [int(t) for t in prefix]
    chosen, low, high = [], [], []
    rng = np.random.default_rng(stepwise_seed(seed, "decode"))
    for step in tqdm(range(steps), desc="stepwise decoding", unit="token", disable=not progress):
        r = worker.candidate_weights(np.array(tokens), -1, K, n, seq_len, stepwise_seed(seed, "decode", step))
        est = step_distribution(r["base_logprob"], r["log_weights"])
        probs = np.exp(est.point - est.point.max())
        pick = int(rng.choice(len(probs), p=probs / probs.sum()))
        tokens.append(int(r["candidates"][pick]))
        chosen.append(float(est.point[pick]))
        low.append(float(est.low[pick]))
        high.append(float(est.high[pick]))
    return {"tokens": tokens[len(prefix):], "logprob": chosen, "logprob_low": low, "logprob_high": high}


def stepwise_prompt(prompt: str, lm_dir: Path, energy_dir: Path, tokenizer_dir: Path, cfg: StepwiseConfig,
                    neg: NegativesConfig, prefix_len: int, seq_len: int, seed: int, device: Any,
                    progress: bool = True) -> dict[str, Any]:
    """`rebm generate --method stepwise`: the prompt's last p tokens decoded to the window length."""
    from pipeline.core.errors import RebmError
    from pipeline.core.precision import resolve_dtype, resolve_precision
    from pipeline.models.lm import load_tokenizer

    if not prompt.strip():
        raise RebmError("--prompt: the prompt is empty")
    tokenizer = load_tokenizer(tokenizer_dir, "stepwise")
    prefix = np.array(tokenizer(prompt)["input_ids"][-prefix_len:], dtype=np.int64)
    device = torch.device(device)
    local = cfg.model_copy(update={"num_workers": 0, "precision": resolve_precision(cfg.precision, device)})
    worker = StepwiseWorker(*worker_args(lm_dir, energy_dir, tokenizer_dir, local, neg,
                                         resolve_dtype(neg.dtype, device), str(device)))
    steps = seq_len - prefix_len
    out = stepwise_decode(worker, prefix, steps, cfg.candidates, cfg.samples, len(prefix) + steps, seed, progress)
    return {"prompt_tokens_used": len(prefix), "energy": cfg.energy, "candidates": cfg.candidates,
            "samples": cfg.samples, "text": tokenizer.decode(out["tokens"]), **out}


def stepwise_summary(result: dict[str, Any]) -> str:
    """The continuation and its per-token log-probability under the joint, with the Eq. 4 range."""
    steps = len(result["tokens"])
    mean = sum(result["logprob"]) / max(1, steps)
    low, high = sum(result["logprob_low"]) / max(1, steps), sum(result["logprob_high"]) / max(1, steps)
    return (f"JOINT ({result['energy']}) top-{result['candidates']} auto-regressive sampling, "
            f"{result['samples']} completions per candidate, {steps} tokens\n"
            f"mean log P_K(x_t | x_<t) of the drawn tokens: {mean:.3f} [Eq. 4 range {low:.3f}, {high:.3f}]\n"
            f"{'-' * 60}\n{result['text']}")
