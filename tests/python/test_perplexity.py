"""Perplexity protocol: text loading, windowing, the chunked loss, model
callables of every kind, and a short real run of the embedded model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qdec.eval.perplexity import load_text, perplexity, tokenize_for_ppl, window_nll

WIKITEXT_TEST = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")


def test_load_text_normalises_line_endings(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffa\r\nb\rc\n = Title = \r\n".encode())
    assert load_text(path) == "a\nb\nc\n = Title = \n"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(tmp_path / "missing.txt")
    path.write_bytes(b"ok\xff\xfe")
    with pytest.raises(ValueError, match=r"t\.txt: not valid UTF-8 at byte offset 2"):
        load_text(path)


def test_tokenize_for_ppl():
    def fake_tokenizer(text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    ids = tokenize_for_ppl(fake_tokenizer, "abc")
    assert ids.dtype == torch.int64 and ids.tolist() == [97, 98, 99]
    with pytest.raises(ValueError, match="empty"):
        tokenize_for_ppl(fake_tokenizer, "")


class Bigram(torch.nn.Module):
    """logits[t] = table[ids[t]]: a deterministic model with a known loss."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 3)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(ids.shape))
        return self.table[ids]


def reference_nll(model, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    """The protocol written out plainly: full cross-entropy per window."""
    total = 0.0
    for w in range(windows):
        x = ids[w * seq_len:(w + 1) * seq_len]
        logits = model.table[x].double()
        total += F.cross_entropy(logits[:-1], x[1:], reduction="sum").item()
    return total / (windows * (seq_len - 1))


def test_windows_and_partial_window_dropped():
    vocab, seq_len = 11, 16
    ids = torch.randint(0, vocab, (5 * seq_len + 7,), generator=torch.Generator().manual_seed(0))
    model = Bigram(vocab)
    r = perplexity(model, ids, seq_len=seq_len, progress=False)
    assert r["windows"] == 5 and r["tokens"] == 5 * 15 and r["seq_len"] == seq_len
    assert set(r) == {"ppl", "nll", "tokens", "windows", "seq_len", "seconds"}
    assert math.isclose(r["nll"], reference_nll(model, ids, seq_len, 5), rel_tol=1e-6)
    assert math.isclose(r["ppl"], math.exp(r["nll"]), rel_tol=1e-12)
    r2 = perplexity(model, ids, seq_len=seq_len, max_windows=2, progress=False)
    assert r2["windows"] == 2
    assert math.isclose(r2["nll"], reference_nll(model, ids, seq_len, 2), rel_tol=1e-6)


def test_batch_size_does_not_change_the_result():
    vocab, seq_len = 13, 10
    ids = torch.randint(0, vocab, (7 * seq_len,), generator=torch.Generator().manual_seed(1))
    model = Bigram(vocab)
    one = perplexity(model, ids, seq_len=seq_len, batch_size=1, progress=False)
    model.calls.clear()
    three = perplexity(model, ids, seq_len=seq_len, batch_size=3, progress=False)
    assert model.calls == [(3, seq_len), (3, seq_len), (1, seq_len)]
    assert math.isclose(one["nll"], three["nll"], rel_tol=1e-9)


def test_uniform_and_perfect_models():
    vocab, seq_len = 50, 32
    ids = torch.randint(0, vocab, (4 * seq_len,), generator=torch.Generator().manual_seed(2))
    uniform = perplexity(lambda x: torch.zeros(*x.shape, vocab), ids, seq_len, progress=False)
    assert math.isclose(uniform["ppl"], vocab, rel_tol=1e-6)

    def oracle(x):  # puts all mass on the true next token
        logits = torch.full((*x.shape, vocab), -1e4)
        logits[:, :-1].scatter_(2, x[:, 1:, None], 0.0)
        return logits

    assert math.isclose(perplexity(oracle, ids, seq_len, progress=False)["ppl"], 1.0,
                        rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_matches_full_cross_entropy(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 37, 29, generator=g) * 4).to(dtype)
    ids = torch.randint(0, 29, (2, 37), generator=g)
    full = F.cross_entropy(logits[:, :-1].float().reshape(-1, 29), ids[:, 1:].reshape(-1),
                           reduction="none").view(2, -1).double().sum(1)
    for chunk in (1, 5, 36, 1000):
        torch.testing.assert_close(window_nll(logits, ids, chunk=chunk), full, rtol=1e-6,
                                   atol=1e-6)


def test_hf_model_and_output_objects():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1)).eval()
    ids = torch.randint(0, 40, (3 * 12,), generator=torch.Generator().manual_seed(4))
    r = perplexity(model, ids, seq_len=12, progress=False)
    with torch.no_grad():  # a wrapper returning the HF output object, called plainly
        r2 = perplexity(lambda x: model(x), ids.view(1, -1), seq_len=12, progress=False)
        logits = model(ids.view(3, 12)).logits
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 40), ids.view(3, 12)[:, 1:].reshape(-1))
    assert math.isclose(r["nll"], manual.item(), rel_tol=1e-5)
    assert math.isclose(r2["nll"], r["nll"], rel_tol=1e-9)


def test_bad_inputs():
    model = Bigram(7)
    ids = torch.randint(0, 7, (40,))
    with pytest.raises(ValueError, match="at least seq_len = 64 tokens"):
        perplexity(model, ids, seq_len=64, progress=False)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        perplexity(model, ids, seq_len=1, progress=False)
    with pytest.raises(ValueError, match="shape \\[T\\] or \\[1, T\\]"):
        perplexity(model, ids.view(2, 20), seq_len=8, progress=False)
    with pytest.raises(ValueError, match="integer tensor"):
        perplexity(model, ids.float(), seq_len=8, progress=False)
    with pytest.raises(ValueError, match="must return logits of shape"):
        perplexity(lambda x: torch.zeros(x.shape[1], 7), ids, seq_len=8, progress=False)
    with pytest.raises(ValueError, match="token id 9 is outside the model's vocabulary of 7"):
        perplexity(lambda x: torch.zeros(*x.shape, 7), torch.full((16,), 9), seq_len=8,
                   progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, ids, seq_len=8, batch_size=0, progress=False)


@torch.no_grad()
def test_embedded_model_short_perplexity():
    """One 256-token window of WikiText-2 test: a healthy 135M model scores ~32
    here; leaving llama.cpp's Q/K row order in place scores ~230."""
    from qdec.models.llama import default_model_path, load_gguf_llama, permute_qk

    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"{WIKITEXT_TEST} not available")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared machines: oversubscription costs more than it gains
    try:
        model, tok = load_gguf_llama(path)
        ids = tokenize_for_ppl(tok, load_text(WIKITEXT_TEST)[:2000])
        assert ids.numel() >= 256
        ref = perplexity(model, ids, seq_len=256, max_windows=1, progress=False)
        assert ref["windows"] == 1 and ref["tokens"] == 255
        assert 10 < ref["ppl"] < 60, ref

        for layer in model.model.layers:  # back to GGUF row order, as if never undone
            attn = layer.self_attn
            cfg = model.config
            attn.q_proj.weight.copy_(permute_qk(attn.q_proj.weight, cfg.num_attention_heads))
            attn.k_proj.weight.copy_(permute_qk(attn.k_proj.weight, cfg.num_key_value_heads))
        broken = perplexity(model, ids, seq_len=256, max_windows=1, progress=False)
        assert broken["ppl"] > 3 * ref["ppl"], (ref, broken)
    finally:
        torch.set_num_threads(threads)
