"""The shared-prefix sampler: exact log-probs, top-k support, the LM's distribution, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pipeline.sampling.sampler import Sampler, full_forward_logprobs, pick_tokens, sample_uniforms

VOCAB = 96
P, L = 10, 6


def tiny_gpt2(vocab: int = VOCAB, seed: int = 0, positions: int = 32, sharpen: float = 4.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # sharper than the 0.02-std init (tied to wte), so far from uniform
        model.lm_head.weight.mul_(sharpen)
    return model


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture(scope="module")
def prefixes() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.integers(0, VOCAB, size=(5, P)), np.array([3, 17, 1 << 40, (2 << 40) + 5, 99], dtype=np.int64)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("top_k", [0, 5])
def test_token_logprobs_equal_a_full_forward_pass(gpt2, prefixes, fast: bool, top_k: int) -> None:
    pre, ids = prefixes
    sampler = Sampler(gpt2, top_k=top_k, batch_samples=16, fast=fast)
    assert sampler.path == ("gpt2-shared-prefix" if fast else "generic-dynamic-cache")
    out = sampler.sample(pre, ids, n=7, new_tokens=L, seed=3)
    assert out.tokens.shape == (5, 7, L) and out.tokens.dtype == np.int32
    ref = full_forward_logprobs(gpt2, pre, out.tokens)
    # Full-softmax log-probs, also when the draw was top-k: compare with the untruncated LM.
    np.testing.assert_allclose(out.token_logprobs, ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(out.logprob, out.token_logprobs.astype(np.float64).sum(-1), rtol=0, atol=1e-12)
    assert (out.token_logprobs <= 0).all()


def test_top_k_samples_never_leave_the_top_k(gpt2, prefixes) -> None:
    pre, ids = prefixes
    k, n = 3, 20
    out = Sampler(gpt2, top_k=k, batch_samples=64).sample(pre, ids, n=n, new_tokens=L, seed=11)
    full = np.concatenate([np.repeat(pre[:, None], n, 1), out.tokens], -1).reshape(-1, P + L)
    with torch.no_grad():
        logits = gpt2(input_ids=torch.from_numpy(full.astype(np.int64))).logits[:, P - 1 : -1]
    kth = logits.topk(k, dim=-1).values[..., -1]
    chosen = logits.gather(-1, torch.from_numpy(out.tokens.reshape(-1, L).astype(np.int64))[..., None]).squeeze(-1)
    assert bool((chosen >= kth).all())
    # and top-k is not the full distribution: over 600 draws some step would leave the top 3
    free = Sampler(gpt2, top_k=0, batch_samples=64).sample(pre, ids, n=n, new_tokens=L, seed=11)
    chosen_free = logits.gather(-1, torch.from_numpy(free.tokens.reshape(-1, L).astype(np.int64))[..., None])
    assert not np.array_equal(free.tokens, out.tokens) or bool((chosen_free.squeeze(-1) < kth).any())


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic, pooling cells with expected count < 5 into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum() - 1)


@pytest.mark.parametrize("top_k", [0, 4])
def test_empirical_distribution_matches_the_lm(top_k: int) -> None:
    vocab = 12
    model = tiny_gpt2(vocab=vocab, seed=5, sharpen=3.0)
    pre = np.array([[1, 2, 3, 4, 5, 6]])
    n = 6000
    out = Sampler(model, top_k=top_k, batch_samples=n).sample(pre, np.array([7]), n=n, new_tokens=2, seed=2020)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(pre)).logits[0, -1]
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits.double(), -1).numpy()
    assert probs.max() < 0.9  # a non-degenerate target
    first = np.bincount(out.tokens[0, :, 0], minlength=vocab)
    stat, dof = _chi_square(first, probs)
    # 99.9% quantile of chi2 is < 3.3 * dof + 10 for dof <= 12 (e.g. 32.9 at dof 11)
    assert stat < 3.3 * dof + 10, (stat, dof, first, probs * n)
    if top_k:
        assert (first[probs == 0] == 0).all()

    # Second token, conditioned on the most frequent first token: the cache path must be right too.
    t0 = int(first.argmax())
    rows = out.tokens[0, out.tokens[0, :, 0] == t0, 1]
    with torch.no_grad():
        logits2 = model(input_ids=torch.from_numpy(np.append(pre[0], t0)[None])).logits[0, -1]
    if top_k:
        logits2 = logits2.masked_fill(logits2 < logits2.topk(top_k).values[-1], float("-inf"))
    stat2, dof2 = _chi_square(np.bincount(rows, minlength=vocab), torch.softmax(logits2.double(), -1).numpy())
    assert stat2 < 3.3 * dof2 + 10, (stat2, dof2)


def test_samples_depend_only_on_seed_window_and_index(gpt2, prefixes) -> None:
    pre, ids = prefixes
    sampler = Sampler(gpt2, batch_samples=8)  # one window per batch: numerics independent of grouping
    together = sampler.sample(pre, ids, n=8, new_tokens=L, seed=9)
    order = np.array([4, 2, 0, 3, 1])
    shuffled = sampler.sample(pre[order], ids[order], n=8, new_tokens=L, seed=9)
    np.testing.assert_array_equal(shuffled.tokens, together.tokens[order])
    np.testing.assert_array_equal(shuffled.token_logprobs, together.token_logprobs[order])
    # More samples per window: the first 8 are the same samples (index i is index i).
    more = sampler.sample(pre[:1], ids[:1], n=12, new_tokens=L, seed=9)
    np.testing.assert_array_equal(more.tokens[0, :8], together.tokens[0])
    # Batching windows together changes float numerics at most in the last bits: same tokens.
    batched = Sampler(gpt2, batch_samples=64).sample(pre, ids, n=8, new_tokens=L, seed=9)
    np.testing.assert_array_equal(batched.tokens, together.tokens)
    other_seed = sampler.sample(pre, ids, n=8, new_tokens=L, seed=10)
    assert not np.array_equal(other_seed.tokens, together.tokens)
    # Samples of one window differ from each other (not n copies of one draw).
    assert len({tuple(r) for r in together.tokens[0]}) > 1


def test_uniforms_are_a_counter_based_hash() -> None:
    u = sample_uniforms(1, np.array([5, 6, 1 << 41]), 4, 3)
    assert u.shape == (3, 4, 3) and (u >= 0).all() and (u < 1).all()
    np.testing.assert_array_equal(sample_uniforms(1, np.array([1 << 41]), 2, 3)[0], u[2, :2])
    assert not np.array_equal(sample_uniforms(2, np.array([5]), 4, 3)[0], u[0])
    big = sample_uniforms(-7, np.arange(200), 50, 10).ravel()
    assert abs(big.mean() - 0.5) < 0.005 and abs(big.var() - 1 / 12) < 0.002
    assert len(np.unique(big)) == big.size


def test_pick_tokens_inverts_the_cdf() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3]]).clamp_min(1e-30)).repeat(4, 1)
    u = torch.tensor([0.05, 0.1001, 0.69, 0.71])
    tokens, lp = pick_tokens(logits, u, top_k=0)
    assert tokens.tolist() == [0, 2, 2, 3]
    np.testing.assert_allclose(lp.numpy(), np.log([0.1, 0.6, 0.6, 0.3]), rtol=1e-5)
    tokens_k, lp_k = pick_tokens(logits, torch.tensor([0.0, 0.5, 0.67, 0.99]), top_k=2)
    assert tokens_k.tolist() == [2, 2, 3, 3]  # renormalised over {2: 2/3, 3: 1/3}
    np.testing.assert_allclose(lp_k.numpy(), np.log([0.6, 0.6, 0.3, 0.3]), rtol=1e-5)  # full softmax


# Llama-style: 2 layers, hidden 32, 4 query heads on 2 key/value heads (GQA), vocab 50.
LLAMA_LIKE = dict(
    vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)


def tiny_causal_lm(config_cls, model_cls, seed: int = 0, sharpen: float = 4.0, **overrides):
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**LLAMA_LIKE, **overrides})).eval()
    with torch.no_grad():  # far from uniform, as tiny_gpt2
        model.lm_head.weight.mul_(sharpen)
    return model


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_causal_lm(LlamaConfig, LlamaForCausalLM)


@pytest.fixture(scope="module")
def llama_prefixes() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return rng.integers(0, 50, size=(5, P)), np.array([3, 17, 1 << 40, (2 << 40) + 5, 99], dtype=np.int64)


@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_llama_fast_path_matches_a_full_forward_and_the_generic_path(llama, llama_prefixes, arch, top_k) -> None:
    model = {
        "llama": lambda: llama,
        "qwen2": lambda: tiny_causal_lm(Qwen2Config, Qwen2ForCausalLM, seed=1),  # q/k/v biases
        "mistral": lambda: tiny_causal_lm(MistralConfig, MistralForCausalLM, seed=2, sliding_window=32),
    }[arch]()
    pre, ids = llama_prefixes
    sampler = Sampler(model, top_k=top_k, batch_samples=16)
    assert sampler.path == "llama-shared-prefix"
    out = sampler.sample(pre, ids, n=7, new_tokens=L, seed=3)
    assert sampler.path == "llama-shared-prefix"  # P + L within Mistral's window
    assert out.tokens.shape == (5, 7, L) and out.tokens.dtype == np.int32 and out.token_logprobs.dtype == np.float32
    np.testing.assert_allclose(out.token_logprobs, full_forward_logprobs(model, pre, out.tokens), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.logprob, out.token_logprobs.astype(np.float64).sum(-1), rtol=0, atol=1e-12)
    generic = Sampler(model, top_k=top_k, batch_samples=16, fast=False)
    assert generic.path == "generic-dynamic-cache"
    reference = generic.sample(pre, ids, n=7, new_tokens=L, seed=3)
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    np.testing.assert_allclose(out.token_logprobs, reference.token_logprobs, atol=1e-4, rtol=0)
    assert len({tuple(r) for r in out.tokens[0]}) > 1
    if top_k:  # drawn from the top k, log-probs under the full softmax
        full = np.concatenate([np.repeat(pre[:, None], 7, 1), out.tokens], -1).reshape(-1, P + L)
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(full.astype(np.int64))).logits[:, P - 1 : -1]
        chosen = logits.gather(-1, torch.from_numpy(out.tokens.reshape(-1, L).astype(np.int64))[..., None])
        assert bool((chosen.squeeze(-1) >= logits.topk(top_k, dim=-1).values[..., -1] - 1e-5).all())


def test_llama_samples_depend_only_on_seed_window_and_index(llama, llama_prefixes) -> None:
    pre, ids = llama_prefixes
    sampler = Sampler(llama, top_k=4, batch_samples=8)  # one window per batch
    together = sampler.sample(pre, ids, n=8, new_tokens=L, seed=9)
    order = np.array([4, 2, 0, 3, 1])
    shuffled = sampler.sample(pre[order], ids[order], n=8, new_tokens=L, seed=9)
    np.testing.assert_array_equal(shuffled.tokens, together.tokens[order])
    np.testing.assert_array_equal(shuffled.token_logprobs, together.token_logprobs[order])
    more = sampler.sample(pre[:1], ids[:1], n=12, new_tokens=L, seed=9)
    np.testing.assert_array_equal(more.tokens[0, :8], together.tokens[0])
    batched = Sampler(llama, top_k=4, batch_samples=64).sample(pre, ids, n=8, new_tokens=L, seed=9)
    np.testing.assert_array_equal(batched.tokens, together.tokens)
    assert not np.array_equal(sampler.sample(pre, ids, n=8, new_tokens=L, seed=10).tokens, together.tokens)


def test_models_the_llama_path_does_not_compute_take_the_generic_path(llama_prefixes) -> None:
    pre, ids = llama_prefixes
    others = {
        # not Llama-shaped: GPT-NeoX (fused qkv, parallel residual), Qwen3 (q_norm / k_norm)
        "gpt_neox": GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64,
        )),
        "qwen3": tiny_causal_lm(Qwen3Config, Qwen3ForCausalLM, head_dim=8),
        # Llama-shaped, computes otherwise: rejected by the construction-time probe
        "granite": tiny_causal_lm(
            GraniteConfig, GraniteForCausalLM, embedding_multiplier=12.0, residual_multiplier=0.25, logits_scaling=8.0,
        ),
    }
    for name, model in others.items():
        sampler = Sampler(model.eval(), batch_samples=8)
        assert sampler.path == "generic-dynamic-cache", name
        out = sampler.sample(pre, ids, n=4, new_tokens=L, seed=1)
        np.testing.assert_allclose(out.token_logprobs, full_forward_logprobs(model, pre, out.tokens), atol=2e-5)
    # A window shorter than prefix + continuation: the generic path for that call.
    mistral = tiny_causal_lm(MistralConfig, MistralForCausalLM, sliding_window=8)
    sampler = Sampler(mistral, batch_samples=8)
    assert sampler.path == "llama-shared-prefix"
    out = sampler.sample(pre, ids, n=4, new_tokens=L, seed=1)
    assert sampler.path == "generic-dynamic-cache"
    np.testing.assert_allclose(out.token_logprobs, full_forward_logprobs(mistral, pre, out.tokens), atol=2e-5)


def test_rejects_sequences_beyond_the_models_positions(gpt2) -> None:
    with pytest.raises(ValueError, match="positions"):
        Sampler(gpt2).sample(np.zeros((1, 30), dtype=np.int64), np.array([0]), n=2, new_tokens=5, seed=0)


@pytest.mark.parametrize("fast", [True, False])
def test_a_range_of_sample_indices_is_that_range_of_one_draw(gpt2, prefixes, fast: bool) -> None:
    """first_sample: samples k0 … k1−1 drawn alone are those indices of one draw (the same uniforms).
    The ranges batch other row counts, which may move log-probs in the last bits; on this GPT-2 the
    tokens are the same."""
    pre, ids = prefixes
    np.testing.assert_array_equal(sample_uniforms(5, ids, 4, L, first_sample=5), sample_uniforms(5, ids, 9, L)[:, 5:])
    sampler = Sampler(gpt2, batch_samples=64, fast=fast)
    whole = sampler.sample(pre, ids, n=12, new_tokens=L, seed=5)
    parts = [sampler.sample(pre, ids, n=k1 - k0, new_tokens=L, seed=5, first_sample=k0)
             for k0, k1 in ((0, 5), (5, 9), (9, 12))]
    np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts], axis=1), whole.tokens)
    np.testing.assert_allclose(np.concatenate([p.token_logprobs for p in parts], axis=1), whole.token_logprobs,
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate([p.logprob for p in parts], axis=1), whole.logprob, atol=1e-4, rtol=0)
