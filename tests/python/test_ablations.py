"""The ablations behind notebooks/ (qdec.eval.ablations) on a tiny random Llama
with a character-level tokenizer, so they run in seconds; and the executed
notebooks themselves: saved outputs, no errors, no library code in cells."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_eval_sweep import CharTokenizer
from transformers import LlamaConfig, LlamaForCausalLM

import qdec.models.llama as llama
from qdec.eval import ablations as ab

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
EXPECTED_NOTEBOOKS = ("01_k_sweep", "02_selection_policies", "03_residual_bits",
                      "04_layer_gain", "05_matched_cost", "06_budget_allocation")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama, "load_gguf_llama", lambda path=None: (model, CharTokenizer()))
        config = ab.AblationConfig(text=str(text), calib_text=str(text), variant="rtn:2:32",
                                   seq_len=64, max_windows=3, calib_samples=2, calib_len=32,
                                   progress=False)
        s = ab.load_setup(config)
        assert ab.load_setup(config) is s  # cached: quantized once per process
        ab._SETUPS.clear()
        yield s


def assert_restored(setup) -> None:
    for _, layer in setup.layers():
        assert layer.k == 0 and layer.policy == "dynamic" and layer.residual_bits == 4


def test_setup(setup):
    assert setup.reference["windows"] == 3 and setup.quantized["windows"] == 3
    assert setup.quantized["ppl"] != setup.reference["ppl"]
    assert len(setup.reference_weights) == 3 * 7 == len(list(setup.layers()))
    assert "RTN W2 g32" in setup.summary()
    assert_restored(setup)


def test_k_sweep(setup, tmp_path):
    res = ab.k_sweep(setup, fractions=[0.0, 0.25, 1.0])
    rows = res["rows"]
    assert [r["fraction"] for r in rows] == [0.0, 0.25, 1.0]
    assert rows[0]["ppl"] == pytest.approx(setup.quantized["ppl"], rel=1e-9)
    assert rows[0]["fetched_bytes_per_token"] == 0 and rows[0]["gap_closed"] == 0
    assert rows[0]["fetched_bytes_per_token"] < rows[1]["fetched_bytes_per_token"] < (
        rows[2]["fetched_bytes_per_token"])
    assert rows[2]["channel_share"] == 1.0
    # Every channel compensated with a 4-bit residual: most of the 2-bit gap closes.
    assert rows[2]["gap_closed"] > 0.5
    for r in rows:
        assert r["gap_closed"] == pytest.approx(
            (setup.quantized["ppl"] - r["ppl"]) / (setup.quantized["ppl"] - setup.reference["ppl"]))
    path = ab.save_results(res, "k_sweep", tmp_path)
    assert json.loads(path.read_text())["rows"][1]["fraction"] == 0.25
    assert ab.k_sweep_table(res).count("\n| ") == 1 + 3
    fig = ab.plot_k_sweep(res, tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 1000
    import matplotlib.pyplot as plt
    plt.close(fig)
    assert_restored(setup)


def test_compare_policies(setup, tmp_path):
    res = ab.compare_policies(setup, fractions=[0.1, 0.3])
    assert [(r["policy"], r["fraction"]) for r in res["rows"]] == [
        (p, f) for p in ("dynamic", "static", "random", "oracle") for f in (0.1, 0.3)]
    by = {(r["policy"], r["fraction"]): r for r in res["rows"]}
    # Same k, same bytes, whichever channels are chosen.
    assert len({r["fetched_bytes_per_token"] for r in res["rows"] if r["fraction"] == 0.1}) == 1
    assert by["dynamic", 0.3]["ppl"] < setup.quantized["ppl"]
    assert setup.static_ready
    assert "| oracle |" in ab.policy_table(res)
    import matplotlib.pyplot as plt
    plt.close(ab.plot_policies(res, tmp_path / "p.png"))
    json.dumps(res)
    assert_restored(setup)


def test_residual_bits_equal_bytes(setup, tmp_path):
    before = {n: m.residual.clone() for n, m in setup.layers()}
    res = ab.residual_bits_sweep(setup, bits=[2, 4, 8], budget_fractions=[0.25])
    rows = {(r["bits"], r["budget_fraction"]): r for r in res["rows"]}
    assert len(rows) == 3 * 2
    budget = rows[4, 0.25]["budget_bytes_per_token"]
    for b in (2, 4, 8):
        r = rows[b, 0.25]
        assert r["budget_bytes_per_token"] == budget
        # At most the budget, short of it by less than one row per linear.
        slack = sum(ab.residual_row_bytes(m.out_features, b) for _, m in setup.layers())
        assert budget - slack < r["fetched_bytes_per_token"] <= budget
    assert rows[2, 0.25]["channels_per_token"] == 2 * rows[4, 0.25]["channels_per_token"]
    assert rows[8, 0.25]["channels_per_token"] == rows[4, 0.25]["channels_per_token"] // 2
    # Narrower codes: larger residual error, smaller host store.
    errs = [rows[b, None]["residual_rel_error"] for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]
    assert rows[2, None]["store_bytes"] < rows[8, None]["store_bytes"]
    assert rows[8, None]["channel_share"] == 1.0
    # The rebuilt 4-bit store is the pipeline's: same result as the k sweep.
    ref = ab.k_sweep(setup, fractions=[0.25])["rows"][0]
    assert rows[4, 0.25]["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    for n, m in setup.layers():
        assert torch.equal(m.residual, before[n])
    assert "all channels" in ab.residual_bits_table(res)
    import matplotlib.pyplot as plt
    plt.close(ab.plot_residual_bits(res, tmp_path / "b.png"))
    json.dumps(res)
    assert_restored(setup)


def test_layer_gain(setup, tmp_path):
    assert ab.k_for_budget(10, 64, 4, 10**6) == 10
    res = ab.layer_gain(setup, fraction=0.25, blocks=3)
    rows = res["rows"]
    assert [r["group"] for r in rows] == ["all", *ab.PROJECTIONS, "layers 0-0", "layers 1-1",
                                          "layers 2-2"]
    total = rows[0]["linears"]
    assert total == 21
    for kind in ("projection", "block"):
        group = [r for r in rows if r["kind"] == kind]
        assert sum(r["linears"] for r in group) == total
        fetched = sum(r["fetched_bytes_per_token"] for r in group)
        assert fetched == rows[0]["fetched_bytes_per_token"]
    ref = ab.k_sweep(setup, fractions=[0.25])["rows"][0]
    assert rows[0]["ppl"] == pytest.approx(ref["ppl"], rel=1e-9)
    assert "| down_proj |" in ab.layer_gain_table(res)
    import matplotlib.pyplot as plt
    plt.close(ab.plot_layer_gain(res, tmp_path / "g.png"))
    json.dumps(res)
    with pytest.raises(ValueError, match="blocks"):
        ab.layer_groups(setup, blocks=4)
    with pytest.raises(ValueError, match="policy"):
        ab.set_compensation(setup, 0.1, "best")
    assert_restored(setup)


# ------------------------------------------------------------- notebooks
def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_tp_selection(setup, tmp_path):
    r = ab.tp_selection(setup, fractions=(0.1,), degrees=(1, 2))
    assert [(row["fraction"], row["tp"]) for row in r["rows"]] == [(0.1, 1), (0.1, 2)]
    one, two = r["rows"]
    # Only the row-parallel layers (o_proj, down_proj) split; their channel
    # counts round up per slice.
    assert two["channels_per_token"] >= one["channels_per_token"]
    assert one["ppl"] != setup.quantized["ppl"]
    assert "| k | tp |" in ab.tp_selection_table(r)
    for _, layer in setup.layers():
        assert layer.selection_shards == 1
    assert_restored(setup)


def test_every_notebook_is_there():
    assert sorted(p.stem for p in _notebooks()) == sorted(EXPECTED_NOTEBOOKS)


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_executed_without_library_code(path):
    # An .ipynb is JSON (nbformat 4): read it directly so CI needs no Jupyter packages.
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4, f"{path.name}: nbformat {nb['nbformat']}, expected 4"

    def source(cell) -> str:
        return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]

    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    assert any(re.search(r"^\s*(from qdec|import qdec)", source(c), re.M) for c in code)
    images = 0
    for i, cell in enumerate(code):
        where = f"{path.name}, code cell {i}"
        assert not re.search(r"^\s*(async\s+def|def|class)\s", source(cell), re.M), (
            f"{where} defines a function or class: library logic belongs in qdec")
        assert cell["execution_count"] is not None, f"{where} was not executed"
        imports_only = all(re.match(r"\s*(from \S+ import |import |$)", line)
                           for line in source(cell).splitlines())
        assert cell["outputs"] or imports_only, f"{where} has no saved output"
        for out in cell["outputs"]:
            assert out["output_type"] != "error", (
                f"{where}: {out.get('ename')}: {out.get('evalue')}")
            images += "image/png" in out.get("data", {})
    assert images >= 1, f"{path.name} has no plot"
    assert nb["cells"][-1]["cell_type"] == "markdown", (
        f"{path.name} should end with its conclusions")
