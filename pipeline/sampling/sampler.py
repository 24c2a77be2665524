"""Fast ancestral sampling of n continuations per prefix from a causal LM.

The prefix of a window is run once and its key/value cache is shared by the window's n
samples: the attention of a sample's new token to the prefix is one matmul against the
window's prefix keys (never copied n times), and the keys/values of the continuation live in
a preallocated buffer written in place each step (no concatenation). That path is for GPT-2
(`GPT2LMHeadModel`); any other HF causal LM takes a generic path on a `DynamicCache`
(prefix run once, then the cache repeated n times).

Randomness: the u ~ U[0, 1) that picks token `step` of sample `sample_idx` of window
`window_id` is a counter-based hash (splitmix64) of (seed, window_id, sample_idx, step), and
the token is found by inverting the CDF of the (full or top-k) next-token distribution. A
sample therefore does not depend on which worker ran it, in what order, or with what other
windows it was batched — only on the LM's numerics for that batch, which is why callers group
windows into fixed batches.

Every sample keeps its per-token log-probs under the full (untruncated) LM softmax, also when
it was drawn with top-k, and their float64 sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, window_ids: np.ndarray, n: int, steps: int) -> np.ndarray:
    """float64 [W, n, steps] in [0, 1): u = hash(seed, window_id, sample_idx, step)."""
    with np.errstate(over="ignore"):
        w = np.asarray(window_ids, dtype=np.int64).astype(np.uint64)[:, None, None]
        s = np.arange(n, dtype=np.uint64)[None, :, None]
        t = np.arange(steps, dtype=np.uint64)[None, None, :]
        h = _splitmix64(np.full((1, 1, 1), seed & _MASK64, dtype=np.uint64))
        h = _splitmix64(h ^ w)
        h = _splitmix64(h ^ s)
        h = _splitmix64(h ^ t)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class Samples:
    """n samples for each of W windows."""

    tokens: np.ndarray  # int32 [W, n, L]
    token_logprobs: np.ndarray  # float32 [W, n, L], full-softmax log P_LM(token | history)
    logprob: np.ndarray  # float64 [W, n], sum of token_logprobs

    @staticmethod
    def concat(parts: list[Samples]) -> Samples:
        return Samples(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.token_logprobs for p in parts]),
            np.concatenate([p.logprob for p in parts]),
        )


def pick_tokens(logits: torch.Tensor, u: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw from softmax(logits) (top-k if top_k > 0) with uniforms `u` [R].

    Returns (token ids [R] int64, their log-probs under the FULL softmax [R] float32).
    """
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    if top_k and top_k < logits.shape[-1]:
        values, index = logits.topk(top_k, dim=-1)
        cdf = torch.softmax(values, dim=-1).double().cumsum_(-1)
    else:
        index = None
        cdf = logp.exp().double().cumsum_(-1)
    x = (u.double() * cdf[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cdf, x, right=True).clamp_(max=cdf.shape[-1] - 1)
    tokens = choice if index is None else index.gather(-1, choice)
    return tokens.squeeze(-1), logp.gather(-1, tokens).squeeze(-1)


class _Gpt2Decoder:
    """Manual GPT-2 decode loop over the HF module's own weights, shared prefix, preallocated KV."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        self.model = model
        self.tr = model.transformer
        self.heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dim = cfg.n_embd
        self.scales = []
        for i in range(cfg.n_layer):
            scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            self.scales.append(scale)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        cfg = model.config
        return (
            type(model).__name__ == "GPT2LMHeadModel"
            and not getattr(cfg, "add_cross_attention", False)
            and hasattr(model, "transformer")
        )

    def sample(
        self, prefixes: torch.Tensor, u: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """prefixes [W, p] int64, u [W, n, L] -> tokens [W, n, L], token log-probs [W, n, L]."""
        tr, H, dh = self.tr, self.heads, self.head_dim
        W, p = prefixes.shape
        _, n, L = u.shape
        R = W * n
        out = self.model(input_ids=prefixes, use_cache=True, logits_to_keep=1)
        cache = out.cache
        prefix_k = [layer.keys for layer in cache.layers]  # [W, H, p, dh]
        prefix_v = [layer.values for layer in cache.layers]
        first = out.logits[:, -1].repeat_interleave(n, dim=0)  # [R, V]
        tokens = torch.empty(R, L, dtype=torch.long)
        token_lp = torch.empty(R, L, dtype=torch.float32)
        u = u.reshape(R, L)
        tokens[:, 0], token_lp[:, 0] = pick_tokens(first, u[:, 0], top_k)
        if L == 1:
            return tokens.view(W, n, L), token_lp.view(W, n, L)

        dtype = prefix_k[0].dtype
        # Continuation keys/values of every sample, written in place: [W, H, n, L-1, dh].
        cont_k = [torch.empty(W, H, n, L - 1, dh, dtype=dtype) for _ in tr.h]
        cont_v = [torch.empty(W, H, n, L - 1, dh, dtype=dtype) for _ in tr.h]
        lm_weight = self.model.lm_head.weight
        lm_bias = getattr(self.model.lm_head, "bias", None)
        for t in range(L - 1):
            hidden = tr.wte(tokens[:, t]) + tr.wpe.weight[p + t]  # [R, D]
            for i, block in enumerate(tr.h):
                attn = block.attn
                x = block.ln_1(hidden)
                qkv = torch.addmm(attn.c_attn.bias, x, attn.c_attn.weight)  # [R, 3D]
                q, k, v = qkv.view(W, n, 3, H, dh).permute(2, 0, 3, 1, 4)  # each [W, H, n, dh]
                cont_k[i][:, :, :, t] = k
                cont_v[i][:, :, :, t] = v
                ck = cont_k[i][:, :, :, : t + 1]  # [W, H, n, t+1, dh]
                cv = cont_v[i][:, :, :, : t + 1]
                scale = self.scales[i]
                s_prefix = torch.matmul(q, prefix_k[i].transpose(-1, -2))  # [W, H, n, p]
                s_cont = torch.matmul(ck, q.unsqueeze(-1)).squeeze(-1)  # [W, H, n, t+1]
                probs = torch.softmax(torch.cat([s_prefix, s_cont], dim=-1).float() * scale, dim=-1).to(dtype)
                ctx = torch.matmul(probs[..., :p], prefix_v[i])  # [W, H, n, dh]
                ctx = ctx + torch.matmul(probs[..., p:].unsqueeze(-2), cv).squeeze(-2)
                ctx = ctx.permute(0, 2, 1, 3).reshape(R, self.dim)
                hidden = hidden + torch.addmm(attn.c_proj.bias, ctx, attn.c_proj.weight)
                hidden = hidden + block.mlp(block.ln_2(hidden))
            logits = F.linear(tr.ln_f(hidden), lm_weight, lm_bias)
            tokens[:, t + 1], token_lp[:, t + 1] = pick_tokens(logits, u[:, t + 1], top_k)
        return tokens.view(W, n, L), token_lp.view(W, n, L)


def _generic_sample(
    model: torch.nn.Module, prefixes: torch.Tensor, u: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any HF causal LM: prefix once on a DynamicCache, repeated n times, then step by step."""
    W, p = prefixes.shape
    _, n, L = u.shape
    R = W * n
    out = model(input_ids=prefixes, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].repeat_interleave(n, dim=0)
    u = u.reshape(R, L)
    tokens = torch.empty(R, L, dtype=torch.long)
    token_lp = torch.empty(R, L, dtype=torch.float32)
    for t in range(L):
        tokens[:, t], token_lp[:, t] = pick_tokens(logits, u[:, t], top_k)
        if t + 1 < L:
            position = torch.full((R, 1), p + t, dtype=torch.long)
            out = model(input_ids=tokens[:, t : t + 1], cache=cache, use_cache=True, position_ids=position)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            logits = out.logits[:, -1]
    return tokens.view(W, n, L), token_lp.view(W, n, L)


class Sampler:
    """Draw n continuations of `new_tokens` tokens per prefix; see the module docstring.

    `batch_samples` bounds the rows of one forward batch: windows are processed
    max(1, batch_samples // n) at a time, always in the order given, so the same list of
    windows always meets the same numerics.
    """

    def __init__(self, model: torch.nn.Module, top_k: int = 0, batch_samples: int = 256, fast: bool = True):
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = full distribution), got {top_k}")
        self.model = model.eval()
        self.top_k = top_k
        self.batch_samples = batch_samples
        self.fast = _Gpt2Decoder(model) if fast and _Gpt2Decoder.supports(model) else None

    @property
    def path(self) -> str:
        return "gpt2-shared-prefix" if self.fast else "generic-dynamic-cache"

    def windows_per_batch(self, n: int) -> int:
        return max(1, self.batch_samples // n)

    @torch.inference_mode()
    def sample(
        self, prefixes: np.ndarray, window_ids: np.ndarray, n: int, new_tokens: int, seed: int
    ) -> Samples:
        prefixes = np.asarray(prefixes, dtype=np.int64)
        window_ids = np.asarray(window_ids, dtype=np.int64)
        if prefixes.ndim != 2 or len(prefixes) != len(window_ids):
            raise ValueError("prefixes must be [W, p] with one window id per row")
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        if max_pos is not None and prefixes.shape[1] + new_tokens > max_pos:
            raise ValueError(
                f"prefix ({prefixes.shape[1]}) + new tokens ({new_tokens}) exceed the model's "
                f"{max_pos} positions"
            )
        per_batch = self.windows_per_batch(n)
        parts = []
        for start in range(0, len(prefixes), per_batch):
            ids = window_ids[start : start + per_batch]
            u = torch.from_numpy(sample_uniforms(seed, ids, n, new_tokens))
            batch = torch.from_numpy(np.array(prefixes[start : start + per_batch]))
            if self.fast is not None:
                tokens, token_lp = self.fast.sample(batch, u, self.top_k)
            else:
                tokens, token_lp = _generic_sample(self.model, batch, u, self.top_k)
            lp = token_lp.numpy()
            parts.append(Samples(tokens.numpy().astype(np.int32), lp, lp.astype(np.float64).sum(-1)))
        if not parts:
            return Samples(
                np.zeros((0, n, new_tokens), np.int32), np.zeros((0, n, new_tokens), np.float32), np.zeros((0, n))
            )
        return Samples.concat(parts)


def full_forward_logprobs(model: torch.nn.Module, prefixes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Reference: log P_LM of each continuation token by one full forward pass on prefix+sample.

    prefixes [W, p], tokens [W, n, L] -> float32 [W, n, L]. Used by tests and sanity checks.
    """
    W, n, L = tokens.shape
    p = prefixes.shape[1]
    full = np.concatenate([np.repeat(prefixes[:, None, :], n, axis=1), tokens], axis=-1).reshape(W * n, p + L)
    ids = torch.from_numpy(full.astype(np.int64))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[:, p - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None]).squeeze(-1)
    return lp.numpy().reshape(W, n, L)

