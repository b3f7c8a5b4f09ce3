"""Fetch-budget allocation (qdec.budget): gain curves on a tiny random Llama,
the allocation's budget and optimality, and the per-linear k map's round trip
through a checkpoint and the readers every loader uses."""

from __future__ import annotations

import copy
import itertools
import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qdec import budget as qb
from qdec import tune
from qdec.formats import FormatError
from qdec.formats.qdec_checkpoint import (
    checkpoint_k_map,
    k_for_linear,
    read_qdec_checkpoint,
    save_quantization_result,
    write_k_map,
)
from qdec.patch import configure, load_patched_checkpoint, patch, qdec_layers
from qdec.quant.pipeline import quantize_model


@pytest.fixture(scope="module")
def tiny():
    """(float model, quantized patched model, quantization result, calibration ids):
    2 layers, hidden 64, RTN W2 g32 with a 4-bit residual."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    calib = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    qmodel = copy.deepcopy(model)
    res = quantize_model(qmodel, "rtn", 2, 32, calib_ids=calib, progress=False)
    saved = copy.deepcopy(qmodel)
    patch(qmodel, res.packed(), k=0)
    return saved, qmodel, res, calib


def _curve(ks, gains, per=10, K=None):
    return qb.GainCurve(list(ks), list(gains), per, K or ks[-1])


# ------------------------------------------------------------------ allocation

def test_hull_drops_points_below_chords_and_flat_steps():
    c = _curve([0, 1, 2, 3, 4, 5], [0, 1, 1.5, 1.4, 3.0, 3.0])
    # (2, 1.5) lies under the chord (0,0)-(4,3); k=3 and k=5 do not gain
    assert qb._hull(c) == [(0, 0), (1, 1), (4, 3.0)]
    assert qb._hull(_curve([0, 4], [0, -1.0])) == [(0, 0)]


def test_allocate_respects_budget_exactly():
    """Random curves and budgets: never over the budget, and every linear
    that could still grow needs more bytes than are left."""
    rng = random.Random(0)
    for trial in range(200):
        curves = {}
        for i in range(rng.randint(1, 6)):
            K = rng.choice([8, 16, 64])
            ks = sorted({0, K} | {rng.randint(1, K) for _ in range(4)})
            gains = [0.0] + sorted(rng.uniform(0, 5) for _ in ks[1:])
            curves[f"l{i}"] = qb.GainCurve(ks, gains, rng.choice([3, 8, 96]), K)
        full = sum(c.in_features * c.bytes_per_channel for c in curves.values())
        budget = rng.randint(0, full + 50)
        # half the trials with a floor (the blend candidate), within the budget
        floor = {n: rng.randint(0, c.in_features // 2) for n, c in curves.items()}
        if trial % 2 or qb.fetched_bytes(floor, curves) > budget:
            floor = {}
        k_map = qb.allocate(curves, budget, floor=floor)
        spent = qb.fetched_bytes(k_map, curves)
        assert spent <= budget
        for name, c in curves.items():
            start = floor.get(name, 0)
            top = max(start, qb._hull(c, start)[-1][0])
            assert start <= k_map[name] <= top
            if k_map[name] < top:
                assert budget - spent < c.bytes_per_channel, (trial, name)


def test_allocate_is_optimal_on_concave_curves():
    """Concave per-channel curves: the greedy equals exhaustive search."""
    rng = random.Random(1)
    for _ in range(30):
        curves = {}
        for i in range(3):
            K = 5
            steps = sorted((rng.uniform(0, 1) for _ in range(K)), reverse=True)
            gains = [0.0] + list(itertools.accumulate(steps))
            curves[f"l{i}"] = qb.GainCurve(list(range(K + 1)), gains, rng.choice([1, 2, 3]), K)
        budget = rng.randint(0, 30)
        best = max(
            (sum(curves[n].gain[k] for n, k in zip(curves, ks))
             for ks in itertools.product(range(6), repeat=3)
             if sum(k * curves[n].bytes_per_channel for n, k in zip(curves, ks)) <= budget),
            default=0.0)
        k_map = qb.allocate(curves, budget)
        got = sum(curves[n].gain[k] for n, k in k_map.items())
        # the greedy is exact up to one partially filled segment per linear
        # whose channels cost more than one byte; with unit costs it is optimal
        if all(c.bytes_per_channel == 1 for c in curves.values()):
            assert got == pytest.approx(best)
        assert got <= best + 1e-9


def test_allocate_prefers_gain_per_byte():
    curves = {"cheap": _curve([0, 4], [0, 4.0], per=1),      # 1 per byte
              "dear": _curve([0, 4], [0, 4.0], per=4),       # 0.25 per byte
              "useless": _curve([0, 4], [0, 0.0], per=1)}
    assert qb.allocate(curves, 4) == {"cheap": 4, "dear": 0, "useless": 0}
    assert qb.allocate(curves, 12) == {"cheap": 4, "dear": 2, "useless": 0}
    assert qb.allocate(curves, 0) == {"cheap": 0, "dear": 0, "useless": 0}


def test_allocate_above_a_floor():
    curves = {"a": _curve([0, 4, 8], [0, 4.0, 5.0], per=1), "b": _curve([0, 4, 8], [0, 2.0, 3.0],
                                                                         per=1)}
    assert qb.allocate(curves, 8) == {"a": 4, "b": 4}
    # b's floor is paid first; the hull above it starts at b's interpolated gain
    assert qb.allocate(curves, 8, floor={"b": 6}) == {"a": 2, "b": 6}
    assert qb._hull(curves["b"], 6) == [(6, 2.5), (8, 3.0)]
    with pytest.raises(ValueError, match="the floor fetches 10 bytes per token, more than the "
                                         "budget of 8"):
        qb.allocate(curves, 8, floor={"a": 5, "b": 5})


def test_allocate_rejects_bad_input():
    with pytest.raises(ValueError, match="budget must be >= 0"):
        qb.allocate({"a": _curve([0, 1], [0, 1])}, -1)
    with pytest.raises(ValueError, match="gain curve of a must start at k = 0"):
        qb.allocate({"a": _curve([1, 2], [0, 1])}, 10)
    with pytest.raises(ValueError, match="positive bytes per channel"):
        qb.allocate({"a": _curve([0, 2], [0, 1], per=0)}, 10)


def test_parse_budget_and_uniform_maps():
    assert qb.parse_budget("2%") == ("fraction", 0.02)
    assert qb.parse_budget("0.05") == ("fraction", 0.05)
    assert qb.parse_budget("40000B") == ("bytes", 40000)
    for bad in ("abc", "150%", "-1B", "1.5B", "2"):
        with pytest.raises(ValueError, match="budget"):
            qb.parse_budget(bad)
    curves = {"a": _curve([0, 100], [0, 1], per=3, K=100), "b": _curve([0, 50], [0, 1], per=5,
                                                                        K=50)}
    assert qb.uniform_k_map(curves, ("fraction", 0.1)) == {"a": 10, "b": 5}
    assert qb.budget_bytes(curves, ("fraction", 0.1)) == 10 * 3 + 5 * 5
    by_bytes = qb.uniform_k_map(curves, ("bytes", 54))
    assert qb.fetched_bytes(by_bytes, curves) <= 54
    assert qb.estimated_gain({"a": 50, "b": 50}, curves) == pytest.approx(0.5 + 1.0)


# ----------------------------------------------------------------- gain curves

def test_gain_curves_on_tiny_model(tiny):
    _, qmodel, _, calib = tiny
    layers = dict(qdec_layers(qmodel))
    configure(qmodel, k=1)
    grid = (0.25, 0.5, 1.0)
    curves = qb.measure_gain_curves(qmodel, calib, fractions=grid, progress=False)
    assert set(curves) == set(qb.GAIN_MEASURES)
    for measure, cs in curves.items():
        assert set(cs) == set(layers)
        for name, c in cs.items():
            K = layers[name].in_features
            assert c.k == [0, K // 4, K // 2, K] and c.gain[0] == 0
            assert c.bytes_per_channel == layers[name].fetched_bytes_per_channel > 0
            assert all(g >= 0 for g in c.gain) and c.gain[-1] > 0
    # at k = K the residual's whole error is removed: the output gain at K
    # is the error at k = 0, and nothing is left to gain
    name = "model.layers.1.mlp.down_proj"
    layer = layers[name]
    x_seen = []
    h = layer.register_forward_pre_hook(lambda m, a: x_seen.append(a[0].detach()))
    configure(qmodel, k=0)
    with torch.no_grad():
        for row in calib:
            qmodel(row.unsqueeze(0))
    h.remove()
    x = torch.cat([t.reshape(-1, layer.in_features) for t in x_seen]).float()
    err0 = (x @ layer.dense_weights()[1]).square().sum().item() / x.shape[0]
    assert curves["output"][name].gain[-1] == pytest.approx(err0, rel=1e-4)
    # settings and gradients are left as they were
    assert all(m.k == 0 and m.simulate_dense is False for m in layers.values())
    assert not any(p.requires_grad for p in qmodel.parameters()) or all(
        p.grad is None for p in qmodel.parameters())


def test_gain_curves_reject_bad_input(tiny):
    saved, qmodel, _, calib = tiny
    with pytest.raises(ValueError, match=r"calib_ids must be an int64 \[samples, length\]"):
        qb.measure_gain_curves(qmodel, calib[0], progress=False)
    with pytest.raises(ValueError, match="no QDECLinear with a residual store"):
        qb.measure_gain_curves(saved, calib, progress=False)


# ------------------------------------------------------- k map round trips

@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    saved, _, res, _ = tiny
    path = tmp_path_factory.mktemp("budget") / "ckpt"
    save_quantization_result(path, res, saved)
    return path


def _k_map(ckpt_path):
    linears = read_qdec_checkpoint(ckpt_path, load_residual=False).linears
    return {n: (i * 7) % (w.in_features + 1) for i, (n, w) in enumerate(linears.items())}


def test_k_map_round_trips_through_checkpoint_and_patch_path(ckpt, tmp_path):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(ckpt, path)
    assert all(m.k == 0 for _, m in qdec_layers(load_patched_checkpoint(str(path))))
    k_map = _k_map(path)
    write_k_map(path, k_map, {"budget": "2%", "budget_bytes": 123})
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["k"] == k_map
    assert config["qdec"]["k_allocation"] == {"budget": "2%", "budget_bytes": 123}
    ck = read_qdec_checkpoint(path, load_residual=False)  # still a valid checkpoint
    in_features = {n: w.in_features for n, w in ck.linears.items()}
    assert checkpoint_k_map(ck.config, in_features) == k_map
    model = load_patched_checkpoint(str(path))
    assert {n: m.k for n, m in qdec_layers(model)} == k_map
    # an explicit k still overrides the checkpoint's
    assert all(m.k == 2 for _, m in qdec_layers(load_patched_checkpoint(str(path), k=2)))


def test_write_k_map_rejects_bad_maps(ckpt, tmp_path):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(ckpt, path)
    before = (path / "config.json").read_text()
    name = next(iter(_k_map(path)))
    K = read_qdec_checkpoint(path, load_residual=False).linears[name].in_features
    with pytest.raises(FormatError, match="names 'model.layers.9.mlp.up_proj', not a quantized"):
        write_k_map(path, {"model.layers.9.mlp.up_proj": 1})
    with pytest.raises(FormatError, match=rf"k of {name} must be an int in \[0, {K}\]"):
        write_k_map(path, {name: K + 1})
    with pytest.raises(FormatError, match="must be an int"):
        write_k_map(path, {name: 0.5})
    assert (path / "config.json").read_text() == before  # nothing half-written
    with pytest.raises(FormatError, match="nope/config.json: config not found"):
        write_k_map(tmp_path / "nope", {})


def test_shared_k_rule_and_bad_checkpoint_k():
    spec = {"model.layers.0.mlp.down_proj": 7, "down_proj": 0.5, "q_proj": 3}
    assert k_for_linear(spec, "model.layers.0.mlp.down_proj", 100) == 7
    assert k_for_linear(spec, "model.layers.1.mlp.down_proj", 100) == 50
    assert k_for_linear(spec, "model.layers.1.self_attn.q_proj", 100) == 3
    assert k_for_linear(spec, "model.layers.1.self_attn.k_proj", 100) == 0
    assert k_for_linear(0.025, "x", 100) == round(2.5)
    with pytest.raises(ValueError, match=r"k for x must be in \[0, 4\], got 9"):
        k_for_linear(9, "x", 4)
    block = {"quant_method": "qdec", "format_version": 1, "k": {"model.layers.0.mlp.up_proj": 9}}
    with pytest.raises(FormatError, match=r"cfg.json: quantization_config.k: k for "
                                          r"model.layers.0.mlp.up_proj must be in \[0, 4\]"):
        checkpoint_k_map(block, {"model.layers.0.mlp.up_proj": 4}, "cfg.json")


def test_k_map_as_tune_config_gives_exact_k(tiny, tmp_path):
    """The tune-format k map (fractions k/K by full name, what qdec_infer and
    QDEC_TUNE_CONFIG read) resolves to exactly the allocated k per linear."""
    _, qmodel, _, _ = tiny
    layers = dict(qdec_layers(qmodel))
    curves = {n: qb.GainCurve([0, m.in_features], [0, 1.0], m.fetched_bytes_per_channel,
                              m.in_features) for n, m in layers.items()}
    k_map = {n: (3 * i + 1) % m.in_features for i, (n, m) in enumerate(layers.items())}
    config = qb.tune_config_for({"2%": k_map}, curves, {"variant": "test"})
    path = tune.write_config(config, tmp_path / "kmaps.json")
    configure(qmodel, k=tune.load_config(path, "2%"))
    assert {n: m.k for n, m in layers.items()} == k_map
    assert json.loads(path.read_text())["targets"]["2%"]["fetched_bytes_per_token"] == \
        qb.fetched_bytes(k_map, curves)
    configure(qmodel, k=0)
    # k / K survives the float round trip for every k of realistic widths
    for K in (576, 1536, 4096, 14336):
        assert all(round(k / K * K) == k for k in range(K + 1))


def test_allocate_checkpoint_stores_a_budgeted_map(ckpt, tiny, tmp_path):
    import shutil

    _, _, _, calib = tiny
    path = tmp_path / "ckpt"
    shutil.copytree(ckpt, path)
    result = qb.allocate_checkpoint(str(path), calib, "10%", progress=False)
    assert result["fetched_bytes_per_token"] <= result["budget_bytes"] > 0
    # the stored map is the candidate with the lowest calibration loss, never worse than uniform
    cands = result["candidates"]
    assert set(cands) == {"uniform", "allocated", "calibrated", "blend"}
    assert cands[result["chosen"]]["calib_nll"] == min(c["calib_nll"] for c in cands.values())
    assert result["fetched_bytes_per_token"] == cands[result["chosen"]]["fetched_bytes_per_token"]
    model = load_patched_checkpoint(str(path))
    assert {n: m.k for n, m in qdec_layers(model)} == result["k"]
    assert sum(m.fetched_bytes_per_token for _, m in qdec_layers(model)) == \
        result["fetched_bytes_per_token"]
    stored = json.loads((path / "config.json").read_text())["qdec"]["k_allocation"]
    assert stored["budget"] == "10%" and stored["calibration_tokens"] == calib.numel()
    assert stored["chosen"] == result["chosen"]
    with pytest.raises(ValueError, match="gain measure must be one of"):
        qb.allocate_checkpoint(str(path), calib, "10%", gain_measure="loss", progress=False)


def test_allocate_cli_errors(tmp_path, capsys):
    from qdec.cli import main

    assert main(["allocate", str(tmp_path), "--budget", "2%"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it, naming the flag
        main(["allocate", str(tmp_path), "--budget", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--budget" in err and "budget 'x' must be a fraction" in err


def test_allocation_summary():
    curves = {f"model.layers.{i}.mlp.{p}": qb.GainCurve([0, 100], [0, 1.0], b, 100)
              for i in range(6) for p, b in (("down_proj", 2), ("up_proj", 6))}
    k_map = {n: (10 if "down" in n else 0) + (5 if "layers.5." in n else 0) for n in curves}
    s = qb.allocation_summary(k_map, curves)
    total = qb.fetched_bytes(k_map, curves)
    assert s["projection"]["down_proj"]["byte_share"] == pytest.approx((6 * 20 + 10) / total)
    assert s["projection"]["up_proj"]["mean_fraction"] == pytest.approx(5 / 100 / 6)
    assert set(s["depth"]) == {"layers 0-1", "layers 2-3", "layers 4-5"}
    assert sum(v["byte_share"] for v in s["depth"].values()) == pytest.approx(1.0)


# ------------------------------------------ calibration-checked allocation

def test_groups_cover_every_linear_once_per_kind():
    names = [f"model.layers.{i}.{p}" for i in range(7) for p in ("self_attn.q_proj", "mlp.up_proj")]
    groups = qb.linear_groups(names)
    assert set(groups) == {"proj:q_proj", "proj:up_proj", "depth:layers 0-2", "depth:layers 3-5",
                           "depth:layers 6-6"}
    for kind in ("proj:", "depth:"):
        members = [n for g, ns in groups.items() if g.startswith(kind) for n in ns]
        assert sorted(members) == sorted(names)


def test_select_k_map_falls_back_to_uniform(monkeypatch):
    """The lowest calibration NLL wins; uniform wins ties (an allocation must
    beat it to be used); identical maps are scored once."""
    scored = []

    def fake_nll(model, windows, k_map):
        scored.append(dict(k_map))
        return {1: 2.0, 2: 2.5, 3: 1.5}[k_map["a"]]

    monkeypatch.setattr(qb, "calibration_nll", fake_nll)
    worse = {"uniform": {"a": 1}, "allocated": {"a": 2}}
    assert qb.select_k_map(None, worse, None, progress=False) == (
        "uniform", {"uniform": 2.0, "allocated": 2.5})
    tie = {"uniform": {"a": 1}, "allocated": {"a": 2}, "blend": {"a": 1}}
    assert qb.select_k_map(None, tie, None, progress=False)[0] == "uniform"
    assert scored[-1] == {"a": 2}  # blend equals uniform: not scored again
    better = {"uniform": {"a": 1}, "allocated": {"a": 2}, "calibrated": {"a": 3}}
    assert qb.select_k_map(None, better, None, progress=False)[0] == "calibrated"


def test_calibration_nll_is_the_decode_faithful_perplexity(tiny):
    from qdec.eval.perplexity import perplexity

    _, qmodel, _, calib = tiny
    layers = dict(qdec_layers(qmodel))
    k_map = {n: 3 for n in layers}
    configure(qmodel, k=0, policy="random", simulate_dense=False)
    nll = qb.calibration_nll(qmodel, calib, k_map)
    assert all(m.k == 0 and m.policy == "random" and not m.simulate_dense
               for m in layers.values())  # settings restored
    configure(qmodel, k=k_map, policy="dynamic", simulate_dense=True, compensate_prefill=True)
    ref = perplexity(qmodel, calib.reshape(-1), seq_len=calib.shape[1], progress=False)
    assert nll == pytest.approx(ref["nll"], rel=1e-6)
    configure(qmodel, k=0, simulate_dense=False)


def test_plan_budgets_never_worse_than_uniform_on_calibration(tiny):
    """On the tiny model: scales for every group, every candidate within the
    budget (uniform exactly), the chosen map the lowest calibration NLL."""
    _, qmodel, _, calib = tiny
    curves = qb.measure_gain_curves(qmodel, calib, progress=False)["fisher"]
    plan = qb.plan_budgets(qmodel, curves, calib, calib[:2], ["10%", "30%", "2000B"],
                           progress=False)
    scales = plan["group_scales"]
    full = sum(c.in_features * c.bytes_per_channel for c in curves.values())
    median = sorted([2000 / full, 0.1, 0.3])[1]
    assert scales["fraction"] == pytest.approx(median, rel=0.1)  # the median budget
    assert set(scales["scales"]) == set(curves) and all(v > 0 for v in scales["scales"].values())
    assert set(scales["groups"]) == set(qb.linear_groups(list(curves)))
    for spec, p in plan["budgets"].items():
        cands = p["candidates"]
        assert list(cands) == ["uniform", "allocated", "calibrated", "blend"]
        for c in cands.values():
            assert c["fetched_bytes_per_token"] <= p["budget_bytes"]
        if spec.endswith("%"):
            assert cands["uniform"]["fetched_bytes_per_token"] == p["budget_bytes"]
        assert all(cands["blend"]["k"][n] >= k // 2 for n, k in cands["uniform"]["k"].items())
        assert cands[p["chosen"]]["calib_nll"] == min(c["calib_nll"] for c in cands.values())
        assert cands[p["chosen"]]["calib_nll"] <= cands["uniform"]["calib_nll"]
        assert p["k"] == cands[p["chosen"]]["k"]
        # the recorded NLL is the map's real calibration NLL
        assert qb.calibration_nll(qmodel, calib[:2], p["k"]) == pytest.approx(
            cands[p["chosen"]]["calib_nll"])
