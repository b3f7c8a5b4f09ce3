"""``qdec eval`` end to end (run_eval, its JSON, both plots) on a tiny random
Llama with a character-level tokenizer, so it runs in seconds; the real model
is exercised by test_perplexity.py and the recorded results."""

from __future__ import annotations

import json
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qdec.models.llama as llama
from qdec.eval.costs import plot_costs
from qdec.eval.sweep import EvalConfig, Variant, plot_results, run_eval


class CharTokenizer:
    """Byte-level ids in [0, 97): enough to drive run_eval."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [b % 97 for b in text.encode()]
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors else ids)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    monkeypatch.setattr(llama, "load_gguf_llama", lambda path=None: (model, CharTokenizer()))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return text


def test_run_eval_sweep_and_costs(tiny, tmp_path):
    cfg = EvalConfig(text=tiny, calib_text=tiny, seq_len=64, max_windows=3,
                     variants=[Variant.parse("rtn:2:32")], fractions=[0.1, 0.5],
                     policies=["dynamic", "static", "random", "oracle"], calib_samples=2,
                     calib_len=32, progress=False, ranks=[2, 4], cost_fractions=[0.1],
                     lowrank_methods=["lorc", "aser"])
    out = tmp_path / "eval.json"
    results = run_eval(cfg, out)
    assert json.loads(out.read_text())["variants"][0]["label"] == "RTN W2 g32"
    v = results["variants"][0]
    assert results["reference"]["windows"] == 3 and results["wall_seconds"] >= 0
    assert len(v["compensated"]) == 4 * 2
    for c in v["compensated"]:
        assert c["gap_closed"] == pytest.approx(
            (v["quantized"]["ppl"] - c["ppl"]) / (v["quantized"]["ppl"] - results["reference"]["ppl"]))
    pts = v["cost_comparison"]["points"]
    # none, qdec x1, (lorc, aser) x 2 ranks, hybrid x 2 ranks
    assert [p["method"] for p in pts].count("lowrank") == 4 and len(pts) == 1 + 1 + 4 + 2
    assert pts[0]["ppl"] == pytest.approx(v["quantized"]["ppl"], rel=1e-9)
    assert all("gap_closed" in p for p in pts)
    plot_results(results, tmp_path / "eval.png")
    plot_costs(results["variants"], results["reference"]["ppl"], tmp_path / "costs.png")
    assert (tmp_path / "eval.png").stat().st_size > 1000
    assert (tmp_path / "costs.png").stat().st_size > 1000


def test_variant_parse_errors():
    assert Variant.parse("awq:3:128:sym") == Variant("awq", 3, 128, True)
    with pytest.raises(ValueError, match="method:bits:group"):
        Variant.parse("awq:3")
