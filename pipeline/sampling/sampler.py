"""Fast ancestral sampling of n continuations per prefix from a causal LM.

Three paths, chosen once per `Sampler` (`Sampler.path` says which one ran):

* ``gpt2-shared-prefix`` (`GPT2LMHeadModel`) and ``llama-shared-prefix`` (Llama-style
  models: `model.model.layers[i].self_attn.{q,k,v,o}_proj`, RMSNorm pre-norm blocks, RoPE from
  `model.model.rotary_emb`, grouped-query attention — Llama, Mistral, Qwen2 and the like). The
  prefix of a window is run once by the HF model and its key/value cache (for Llama: keys
  already rotated) is shared by the window's n samples: the attention of a sample's new token to
  the prefix is one matmul against the window's prefix keys (never copied n times; for GQA the
  query heads of a key/value head and the n samples are stacked as rows of that matmul instead
  of repeating the key/value heads), and the keys/values of the continuation live in a
  preallocated buffer written in place each step (no concatenation). The decode loop is written
  out over the HF modules' own weights (projections, MLPs, norms, embeddings, lm_head), with the
  softmax split into [prefix | continuation]; Llama queries/keys get RoPE at their absolute
  positions from the model's own rotary module and `apply_rotary_pos_emb`. A Llama-shaped
  model is only accepted after a probe at construction: two teacher-forced decode steps must
  reproduce the HF model's own logits (so e.g. Granite's embedding/residual/logit multipliers,
  which the loop does not apply, fall back to the generic path). A sliding-window model whose
  window is shorter than prefix + continuation takes the generic path for that call.
* ``generic-dynamic-cache``: any other HF causal LM (and the reference for all of them): the
  prefix is run once on a `DynamicCache`, the cache is repeated n times, then step by step.

Device and precision: everything runs on the model's device (that of its first parameter). The
uniforms are computed on the CPU (float64, below) and moved there; tokens and log-probs are
buffers on that device, and each batch comes back to the host in one transfer at its end.
Whatever dtype the model runs in (e.g. bf16 on a GPU), the logits are cast to float32 before
the log-softmax, the CDF is inverted in float64, per-token log-probs are float32 and their
per-sample sum float64. On the CPU the GPT-2 and generic paths give bit-identical results to
the CPU-only sampler they replaced (`tests/test_sampling.py` checks against a copy of it).

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
from torch import nn

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, window_ids: np.ndarray, n: int, steps: int, first_sample: int = 0) -> np.ndarray:
    """float64 [W, n, steps] in [0, 1): u = hash(seed, window_id, sample_idx, step), for
    sample_idx = first_sample … first_sample + n − 1 (so a range of samples is drawn alone)."""
    with np.errstate(over="ignore"):
        w = np.asarray(window_ids, dtype=np.int64).astype(np.uint64)[:, None, None]
        s = np.arange(first_sample, first_sample + n, dtype=np.uint64)[None, :, None]
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
        device = prefixes.device
        tokens = torch.empty(R, L, dtype=torch.long, device=device)
        token_lp = torch.empty(R, L, dtype=torch.float32, device=device)
        u = u.reshape(R, L)
        tokens[:, 0], token_lp[:, 0] = pick_tokens(first, u[:, 0], top_k)
        if L == 1:
            return tokens.view(W, n, L), token_lp.view(W, n, L)

        dtype = prefix_k[0].dtype
        # Continuation keys/values of every sample, written in place: [W, H, n, L-1, dh].
        cont_k = [torch.empty(W, H, n, L - 1, dh, dtype=dtype, device=device) for _ in tr.h]
        cont_v = [torch.empty(W, H, n, L - 1, dh, dtype=dtype, device=device) for _ in tr.h]
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


def _sliding_window(cfg) -> int | None:
    """The attention window of a sliding-window config (Mistral, Qwen2 with it on), else None."""
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


class _LlamaDecoder:
    """Manual decode loop for Llama-style LMs over the HF modules' own weights, shared prefix,
    preallocated continuation KV, RoPE from the model's rotary module, grouped-query attention."""

    LAYER_CHILDREN = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
    ATTN_CHILDREN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.groups = self.heads // self.kv_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.scalings = [float(layer.self_attn.scaling) for layer in self.layers]
        self.window = _sliding_window(cfg)

    @staticmethod
    def matches(model: nn.Module) -> bool:
        """The module structure this decoder implements (the probe in `supports` checks the numerics)."""
        cfg = getattr(model, "config", None)
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if cfg is None or getattr(cfg, "is_encoder_decoder", False) or not isinstance(layers, nn.ModuleList):
            return False
        if len(layers) == 0 or not isinstance(getattr(model, "lm_head", None), nn.Linear):
            return False
        if not all(isinstance(getattr(base, name, None), nn.Module) for name in ("embed_tokens", "norm", "rotary_emb")):
            return False
        heads = getattr(cfg, "num_attention_heads", None)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        if not heads or heads % kv_heads:
            return False
        inv_freq = getattr(base.rotary_emb, "inv_freq", None)
        head_dim = getattr(layers[0].self_attn, "head_dim", None) if hasattr(layers[0], "self_attn") else None
        if not isinstance(inv_freq, torch.Tensor) or not head_dim or 2 * inv_freq.numel() != head_dim:
            return False  # partial rotary (rotating part of each head) is not what apply_rotary_pos_emb does
        if "RMSNorm" not in type(base.norm).__name__:
            return False
        for layer in layers:
            if {name for name, _ in layer.named_children()} != _LlamaDecoder.LAYER_CHILDREN:
                return False
            attn = layer.self_attn
            if {name for name, _ in attn.named_children()} - {"rotary_emb"} != _LlamaDecoder.ATTN_CHILDREN:
                return False  # e.g. Qwen3 / OLMo-2 q_norm, k_norm
            proj = [getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            if not all(isinstance(m, nn.Linear) for m in proj) or getattr(attn, "head_dim", None) != head_dim:
                return False
            if not hasattr(attn, "scaling"):
                return False
            q, k, v, o = proj
            if (q.out_features, k.out_features, v.out_features, o.in_features) != (
                heads * head_dim, kv_heads * head_dim, kv_heads * head_dim, heads * head_dim
            ):
                return False
            if not all("RMSNorm" in type(m).__name__ for m in (layer.input_layernorm, layer.post_attention_layernorm)):
                return False
        return True

    @staticmethod
    def build(model: nn.Module) -> _LlamaDecoder | None:
        """The decoder if `model` has this structure and passes the probe, else None."""
        if not _LlamaDecoder.matches(model):
            return None
        try:
            decoder = _LlamaDecoder(model)
            return decoder if decoder.probe() else None
        except Exception:  # a module that does not behave as this decoder calls it: generic path
            return None

    @torch.inference_mode()
    def probe(self) -> bool:
        """Two teacher-forced decode steps (2 samples sharing a 3-token prefix) against a full HF forward."""
        cfg = self.model.config
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos is not None and max_pos < 5:
            return False
        device = next(self.model.parameters()).device
        ids = (torch.arange(1, 6, device=device) * 7) % cfg.vocab_size
        ref = self.model(input_ids=ids[None]).logits[0, 3:5].float()  # after tokens 3 and 4
        run = _LlamaRun(self, ids[None, :3], n=2, new_tokens=3)
        got = torch.stack([run.step(ids[3].expand(2), 0), run.step(ids[4].expand(2), 1)]).float()  # [2, 2, V]
        exact = run.dtype in (torch.float32, torch.float64)
        tol = (1e-3 if exact else 5e-2) * max(1.0, float(ref.abs().max()))
        return bool(torch.isfinite(got).all()) and float((got - ref[:, None]).abs().max()) <= tol

    def sample(self, prefixes: torch.Tensor, u: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """prefixes [W, p] int64, u [W, n, L] -> tokens [W, n, L], token log-probs [W, n, L]."""
        W, p = prefixes.shape
        _, n, L = u.shape
        R = W * n
        run = _LlamaRun(self, prefixes, n, L)
        tokens = torch.empty(R, L, dtype=torch.long, device=prefixes.device)
        token_lp = torch.empty(R, L, dtype=torch.float32, device=prefixes.device)
        u = u.reshape(R, L)
        logits = run.first_logits
        for t in range(L):
            tokens[:, t], token_lp[:, t] = pick_tokens(logits, u[:, t], top_k)
            if t + 1 < L:
                logits = run.step(tokens[:, t], t)
        return tokens.view(W, n, L), token_lp.view(W, n, L)


class _LlamaRun:
    """One batch of `_LlamaDecoder`: the prefix's KV (from the HF model) and the continuation's KV buffer."""

    def __init__(self, dec: _LlamaDecoder, prefixes: torch.Tensor, n: int, new_tokens: int):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.dec, self.rope = dec, apply_rotary_pos_emb
        W, p = prefixes.shape
        self.W, self.p, self.n = W, p, n
        out = dec.model(input_ids=prefixes, use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        self.prefix_k = [layer.keys for layer in cache.layers]  # [W, KV, p, dh], RoPE applied
        self.prefix_v = [layer.values for layer in cache.layers]
        if len(self.prefix_k) != len(dec.layers) or self.prefix_k[0].shape != (W, dec.kv_heads, p, dec.head_dim):
            raise RuntimeError(f"unexpected prefix cache layout {tuple(self.prefix_k[0].shape)}")
        self.first_logits = out.logits[:, -1].repeat_interleave(n, dim=0)  # [R, V]
        self.dtype = self.prefix_k[0].dtype
        device = prefixes.device
        steps = max(new_tokens - 1, 1)
        # Continuation keys/values of every sample, written in place: [W, KV, n, L-1, dh].
        shape = (W, dec.kv_heads, n, steps, dec.head_dim)
        self.cont_k = [torch.empty(shape, dtype=self.dtype, device=device) for _ in dec.layers]
        self.cont_v = [torch.empty(shape, dtype=self.dtype, device=device) for _ in dec.layers]
        # cos/sin of the continuation's absolute positions p .. p+L-2, by the model's rotary module.
        positions = torch.arange(p, p + steps, device=device)[None]
        self.cos, self.sin = dec.base.rotary_emb(self.prefix_k[0], positions)  # [1, L-1, dh]

    def step(self, token: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token [R] at position p + t of every sample -> next-token logits [R, V]."""
        dec, W, n, p = self.dec, self.W, self.n, self.p
        R, H, KV, G, dh = W * n, dec.heads, dec.kv_heads, dec.groups, dec.head_dim
        cos, sin = self.cos[:, t : t + 1], self.sin[:, t : t + 1]  # [1, 1, dh]
        hidden = dec.base.embed_tokens(token[:, None])  # [R, 1, D]
        for i, layer in enumerate(dec.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(R, 1, H, dh).transpose(1, 2)  # [R, H, 1, dh]
            k = attn.k_proj(x).view(R, 1, KV, dh).transpose(1, 2)
            v = attn.v_proj(x).view(W, n, KV, dh)
            q, k = self.rope(q, k, cos, sin)
            ck, cv = self.cont_k[i], self.cont_v[i]
            ck[:, :, :, t] = k.view(W, n, KV, dh).transpose(1, 2)
            cv[:, :, :, t] = v.transpose(1, 2)
            ck, cv = ck[:, :, :, : t + 1], cv[:, :, :, : t + 1]  # [W, KV, n, t+1, dh]
            # Query head h uses key/value head h // G: stack (sample, group) as the rows of one KV head.
            q = q.view(W, n, KV, G, dh).transpose(1, 2)  # [W, KV, n, G, dh]
            s_prefix = torch.matmul(q.reshape(W, KV, n * G, dh), self.prefix_k[i].transpose(-1, -2))
            s_cont = torch.matmul(q, ck.transpose(-1, -2)).view(W, KV, n * G, t + 1)
            probs = torch.softmax(torch.cat([s_prefix, s_cont], dim=-1).float() * dec.scalings[i], dim=-1)
            probs = probs.to(self.dtype)  # [W, KV, n*G, p+t+1]
            ctx = torch.matmul(probs[..., :p], self.prefix_v[i]).view(W, KV, n, G, dh)
            ctx = ctx + torch.matmul(probs[..., p:].reshape(W, KV, n, G, t + 1), cv)
            ctx = ctx.transpose(1, 2).reshape(R, 1, H * dh)
            hidden = hidden + attn.o_proj(ctx)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return dec.model.lm_head(dec.base.norm(hidden))[:, 0]


def _generic_sample(
    model: torch.nn.Module, prefixes: torch.Tensor, u: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any HF causal LM: prefix once on a DynamicCache, repeated n times, then step by step."""
    W, p = prefixes.shape
    _, n, L = u.shape
    R = W * n
    device = prefixes.device
    out = model(input_ids=prefixes, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].repeat_interleave(n, dim=0)
    u = u.reshape(R, L)
    tokens = torch.empty(R, L, dtype=torch.long, device=device)
    token_lp = torch.empty(R, L, dtype=torch.float32, device=device)
    for t in range(L):
        tokens[:, t], token_lp[:, t] = pick_tokens(logits, u[:, t], top_k)
        if t + 1 < L:
            position = torch.full((R, 1), p + t, dtype=torch.long, device=device)
            out = model(input_ids=tokens[:, t : t + 1], cache=cache, use_cache=True, position_ids=position)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            logits = out.logits[:, -1]
    return tokens.view(W, n, L), token_lp.view(W, n, L)


class Sampler:
    """Draw n continuations of `new_tokens` tokens per prefix; see the module docstring.

    `batch_samples` bounds the rows of one forward batch: windows are processed
    max(1, batch_samples // n) at a time, always in the order given, so the same list of
    windows always meets the same numerics. `fast=False` forces the generic path.
    """

    def __init__(self, model: torch.nn.Module, top_k: int = 0, batch_samples: int = 256, fast: bool = True):
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = full distribution), got {top_k}")
        self.model = model.eval()
        self.top_k = top_k
        self.batch_samples = batch_samples
        self.fast: _Gpt2Decoder | _LlamaDecoder | None = None
        if fast and _Gpt2Decoder.supports(model):
            self.fast = _Gpt2Decoder(model)
        elif fast:
            self.fast = _LlamaDecoder.build(self.model)
        self._path = self._fast_path_name()

    def _fast_path_name(self) -> str:
        if isinstance(self.fast, _Gpt2Decoder):
            return "gpt2-shared-prefix"
        if isinstance(self.fast, _LlamaDecoder):
            return "llama-shared-prefix"
        return "generic-dynamic-cache"

    @property
    def path(self) -> str:
        """The path of the last batch sampled (before any: the one this model takes)."""
        return self._path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def windows_per_batch(self, n: int) -> int:
        return max(1, self.batch_samples // n)

    @torch.inference_mode()
    def sample(
        self, prefixes: np.ndarray, window_ids: np.ndarray, n: int, new_tokens: int, seed: int, first_sample: int = 0
    ) -> Samples:
        """Samples first_sample … first_sample + n − 1 of every prefix: those indices of a single draw
        of first_sample + n (the same uniforms; batch composition aside, the same tokens)."""
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
        fast = self.fast
        window = getattr(fast, "window", None)
        if window is not None and prefixes.shape[1] + new_tokens > window:
            fast = None  # the decoder attends to everything: beyond the window only the HF model is right
        self._path = self._fast_path_name() if fast is not None else "generic-dynamic-cache"
        device = self.device
        per_batch = self.windows_per_batch(n)
        parts = []
        for start in range(0, len(prefixes), per_batch):
            ids = window_ids[start : start + per_batch]
            # float64, bit-exact
            u = torch.from_numpy(sample_uniforms(seed, ids, n, new_tokens, first_sample)).to(device)
            batch = torch.from_numpy(np.array(prefixes[start : start + per_batch])).to(device)
            if fast is not None:
                tokens, token_lp = fast.sample(batch, u, self.top_k)
            else:
                tokens, token_lp = _generic_sample(self.model, batch, u, self.top_k)
            # The batch's one trip back to the host (no per-step synchronisation before it).
            tokens, lp = tokens.to(torch.int32).cpu().numpy(), token_lp.cpu().numpy()
            parts.append(Samples(tokens, lp, lp.astype(np.float64).sum(-1)))
        if not parts:
            return Samples(
                np.zeros((0, n, new_tokens), np.int32), np.zeros((0, n, new_tokens), np.float32), np.zeros((0, n))
            )
        return Samples.concat(parts)


def full_forward_logprobs(model: torch.nn.Module, prefixes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Reference: log P_LM of each continuation token by one full forward pass on prefix+sample.

    prefixes [W, p], tokens [W, n, L] -> float32 [W, n, L] (on the model's device, float32
    log-softmax). Used by tests and sanity checks.
    """
    W, n, L = tokens.shape
    p = prefixes.shape[1]
    full = np.concatenate([np.repeat(prefixes[:, None, :], n, axis=1), tokens], axis=-1).reshape(W * n, p + L)
    ids = torch.from_numpy(full.astype(np.int64)).to(next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[:, p - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None]).squeeze(-1)
    return lp.cpu().numpy().reshape(W, n, L)
