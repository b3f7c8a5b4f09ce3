"""The matched-cost comparison (qdec.eval.costs) on a tiny random Llama: the
grid of points, their cost accounting, that the model is restored, and that
compensation of any kind lowers the output error."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qdec.eval.costs import CostConfig, compare_costs, cost_table, plot_costs
from qdec.patch import decoder_linears, patch, qdec_layers
from qdec.quant.pipeline import quantize_model

RANKS, FRACTIONS = [2, 8], [0.1, 0.25]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    calib = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    qmodel = copy.deepcopy(model)
    res = quantize_model(qmodel, "rtn", 2, 32, calib_ids=calib, progress=False)
    reference = {n: m.weight.detach().float().clone() for n, m in decoder_linears(qmodel)}
    patch(qmodel, res.packed(), k=0)
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits

    def score(m, label):  # output error against the FP model, as the "ppl"
        with torch.no_grad():
            return {"ppl": float((m(ids).logits - want).pow(2).mean())}

    return qmodel, reference, calib, score


def test_grid_costs_and_restoration(setup):
    qmodel, reference, calib, score = setup
    before = score(qmodel, "before")["ppl"]
    out = compare_costs(qmodel, reference, calib, score,
                        CostConfig(ranks=RANKS, fractions=FRACTIONS), progress=False)
    pts = out["points"]
    methods = [p["method"] for p in pts]
    assert methods.count("none") == 1 and methods.count("qdec") == 2
    assert methods.count("lowrank") == 3 * 2 and methods.count("hybrid") == 2 * 2

    layers = [m for _, m in qdec_layers(qmodel)]
    row_bytes = {id(m): m.residual.shape[1] * 4 for m in layers}

    def fetched(f):
        return sum(round(f * m.in_features) * row_bytes[id(m)] for m in layers)

    def factors(r):  # fp16 factors
        return sum(r * (m.in_features + m.out_features) * 2 for m in layers)

    scales = sum(m.out_features * 4 for m in layers)
    for p in pts:
        want_fetch = fetched(p["fraction"]) if p["fraction"] else 0
        want_gpu = (factors(p["rank"]) if p["rank"] else 0) + (scales if p["fraction"] else 0)
        assert p["fetched_bytes_per_token"] == want_fetch, p
        assert p["gpu_extra_bytes"] == want_gpu, p
        assert p["lowrank_bytes"] == (factors(p["rank"]) if p["rank"] else 0)
        # QDEC, ASER (the exact minimiser of the calibration output error) and
        # the hybrid lower the output error; LoRC/LQER need not on random weights,
        # whose error has no structure for an unweighted SVD to find.
        if p["method"] in ("qdec", "hybrid") or p["lowrank_method"] == "aser":
            assert p["ppl"] < pts[0]["ppl"], p
    by = {(p["method"], p["lowrank_method"], p["rank"], p["fraction"]): p["ppl"] for p in pts}
    for f in FRACTIONS:  # at equal fetched bytes the hybrid's low-rank term helps
        for r in RANKS:
            assert by["hybrid", "aser", r, f] < by["qdec", None, 0, f]
    assert by["lowrank", "aser", 8, 0.0] < by["lowrank", "aser", 2, 0.0]
    # the model is left as it was
    assert all(m.lowrank is None and m.k == 0 for m in layers)
    assert score(qmodel, "after")["ppl"] == pytest.approx(before, rel=1e-6)
    assert pts[0]["ppl"] == pytest.approx(before, rel=1e-6)

    table = cost_table(out, reference_ppl=0.0)
    assert table.count("\n") == len(pts) + 1 and "| hybrid | aser | 8 | 25% |" in table


def test_plot_writes_png(setup, tmp_path):
    qmodel, reference, calib, score = setup
    out = compare_costs(qmodel, reference, calib, score,
                        CostConfig(ranks=[2], fractions=[0.1], lowrank_methods=["aser"]),
                        progress=False)
    path = tmp_path / "costs.png"
    plot_costs([{"label": "tiny", "cost_comparison": out}], 0.0, path)
    assert path.stat().st_size > 1000


def test_config_validation():
    with pytest.raises(ValueError, match="low-rank methods must be among"):
        CostConfig(lowrank_methods=["svd"])
    with pytest.raises(ValueError, match="ranks must be positive"):
        CostConfig(ranks=[0])
    with pytest.raises(ValueError, match="fractions must lie in"):
        CostConfig(fractions=[0.0])
