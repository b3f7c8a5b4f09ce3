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


def test_report_merges_files_and_refuses_mismatched_references(tiny, tmp_path):
    from qdec.cli import main
    from qdec.eval.report import load_results, log_gap_closed

    cfg = EvalConfig(text=tiny, calib_text=tiny, seq_len=64, max_windows=2,
                     variants=[Variant.parse("rtn:3:32")], fractions=[0.25],
                     policies=["dynamic"], calib_samples=2, calib_len=32, progress=False,
                     ranks=[2], cost_fractions=[0.25], lowrank_methods=["aser"])
    a = tmp_path / "a.json"
    results = run_eval(cfg, a)
    b = tmp_path / "b.json"
    b.write_text(json.dumps(results))
    merged = load_results([a, b])
    assert len(merged["variants"]) == 2 and merged["sources"] == [str(a), str(b)]
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep.md").read_text()
    assert md.count("| dynamic |") == 2 and "## Matched cost: RTN W3 g32" in md
    assert (tmp_path / "rep.png").exists() and (tmp_path / "rep_costs.png").exists()
    bad = dict(results, reference=dict(results["reference"], ppl=results["reference"]["ppl"] * 2))
    b.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="not the same evaluation"):
        load_results([a, b])
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match="not a qdec eval file"):
        load_results([tmp_path / "c.json"])
    assert log_gap_closed(10.0, 1000.0, 100.0) == pytest.approx(0.5)


def test_run_eval_budget_uniform_vs_allocated(tiny, tmp_path):
    """--budget: uniform and allocated k at equal bytes, on the evaluation and
    the calibration text; the k maps as a tune config; the report's table and plot."""
    from qdec.eval.report import write_report
    from qdec.tune import load_config

    cfg = EvalConfig(text=tiny, calib_text=tiny, seq_len=64, max_windows=2,
                     variants=[Variant.parse("rtn:2:32")], fractions=[], policies=[],
                     calib_samples=2, calib_len=32, progress=False,
                     budgets=["5%", "3000B"], budget_calib_windows=1,
                     budget_score_candidates=True)
    out = tmp_path / "eval.json"
    results = run_eval(cfg, out)
    b = results["variants"][0]["budget"]
    extra = [r for r in b["runs"] if r["allocation"] == "candidate"]
    for spec in ("5%", "3000B"):  # every candidate not chosen is scored on the text too
        assert sorted(r["choice"] for r in extra if r["budget"] == spec) == sorted(
            n for n in ("uniform", "allocated", "calibrated", "blend")
            if n not in ("uniform", b["candidates"][spec]["chosen"]))
    b["runs"] = [r for r in b["runs"] if r["allocation"] != "candidate"]
    assert [(r["budget"], r["allocation"]) for r in b["runs"]] == [
        ("5%", "uniform"), ("5%", "allocated"), ("3000B", "uniform"), ("3000B", "allocated")]
    for r in b["runs"]:
        assert r["fetched_bytes_per_token"] <= r["budget_bytes"]
        assert r["calib_ppl"] > 0 and "calib_gap_closed" in r
    uniform5 = b["runs"][0]
    assert uniform5["fetched_bytes_per_token"] == uniform5["budget_bytes"]  # 5 % exactly
    # the map used never does worse than uniform on the calibration text that chose it
    for u, a in (b["runs"][0:2], b["runs"][2:4]):
        assert a["calib_nll"] <= u["calib_nll"] and a["choice"] in b["candidates"][a["budget"]]
        assert b["candidates"][a["budget"]]["chosen"] == a["choice"]
    assert set(b["group_scales"]["groups"]) >= {"proj:down_proj", "depth:layers 0-0"}
    fractions = load_config(b["tune_config"], "5%")
    assert {n: round(f * 64 if "down_proj" not in n else f * 160) for n, f in fractions.items()} \
        == b["runs"][1]["k"]
    written = write_report([out], tmp_path / "report")
    assert written["budget_plot"].stat().st_size > 0
    md = written["table"].read_text()
    assert "| 5% | " in md and "| budget | uniform | allocated | calibrated | blend |" in md
    assert "| proj:down_proj | " in md  # the fitted group scales


def test_eval_cli_rejects_bad_budget(capsys):
    from qdec.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it, naming the flag
        main(["eval", "--budget", "150%", "--out", "/nonexistent/x.json"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--budget" in err and "budget fraction must be in [0, 1]" in err
