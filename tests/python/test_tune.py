"""``qdec tune``: the choice of k (pure logic, synthetic timings), the config
file (round trip and bad input), a measurement on each device, the CLI end to
end on CPU, its use by ``qdec eval``, and the decode-layer benchmark script's
logic. No timing is asserted: speed targets live in the benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_sweep import tiny  # noqa: F401  (fixture)

from qdec import tune
from qdec.cli import main

ROOT = Path(__file__).resolve().parents[2]


def proj(K: int, base: float, ks: list[int], comp: list[float], N: int = 64) -> dict:
    return {"N": N, "K": K, "base_us": base, "k": ks, "compensated_us": comp}


# ------------------------------------------------------------ pure logic
def test_k_grid():
    assert tune.k_grid(4096) == [0, 4, 8, 16, 32, 64, 128, 256]
    assert tune.k_grid(100) == [0, 1, 2, 3, 6]  # small K: rounded, at least 1, distinct
    assert tune.k_grid(14336, [0, 8]) == [0, 112]
    with pytest.raises(ValueError, match="exceeds K"):
        tune.k_grid(10, [0, 2048])


def test_overhead_curve_is_monotone_and_non_negative():
    p = proj(1024, 10.0, [0, 8, 16, 32], [9.5, 12.0, 11.0, 15.0])
    # k=0 costs nothing; 16 cannot look cheaper than 8 (noise); never negative.
    assert tune.overhead_curve(p) == [(0, 0.0), (8, 2.0), (16, 2.0), (32, 5.0)]
    assert tune.overhead_curve(proj(1024, 10.0, [8], [9.0])) == [(0, 0.0), (8, 0.0)]


def test_choose_k_respects_budget_and_prefers_cheap_channels():
    projections = {
        "cheap": proj(1000, 100.0, [0, 10, 20, 40], [100.0, 101.0, 102.0, 104.0]),
        "dear": proj(1000, 100.0, [0, 10, 20, 40], [100.0, 105.0, 110.0, 120.0]),
    }
    none = tune.choose_k(projections, 0.0)
    assert none["k"] == {"cheap": 0, "dear": 0} and none["predicted_slowdown"] == 1.0
    small = tune.choose_k(projections, 0.02)  # budget 4 us: only the cheap one
    assert small["k"] == {"cheap": 40, "dear": 0}
    assert small["overhead_us"] == pytest.approx(4.0)
    assert small["overhead_us"] <= small["budget_us"]
    assert small["predicted_slowdown"] == pytest.approx(1.02)
    assert small["fraction"] == {"cheap": 0.04, "dear": 0.0}
    big = tune.choose_k(projections, 0.10)  # budget 20 us: cheap 40 (4) + dear 20 (10)
    assert big["k"] == {"cheap": 40, "dear": 20} and big["overhead_us"] <= big["budget_us"]
    # More budget never means less k.
    last = {"cheap": 0, "dear": 0}
    for target in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 1.0):
        ks = tune.choose_k(projections, target)["k"]
        assert all(ks[n] >= last[n] for n in ks)
        last = ks
    assert last == {"cheap": 40, "dear": 40}


def test_choose_k_free_steps_weights_and_ties():
    free = {"a": proj(512, 50.0, [0, 4, 8], [50.0, 49.0, 50.0]),
            "b": proj(4096, 50.0, [0, 4, 8], [50.0, 60.0, 70.0])}
    assert tune.choose_k(free, 0.0)["k"] == {"a": 8, "b": 0}  # no measurable cost: taken
    same = {"small": proj(1024, 10.0, [0, 8], [10.0, 11.0]),
            "large": proj(4096, 10.0, [0, 32], [10.0, 11.0])}
    assert tune.choose_k(same, 0.05)["k"] == {"small": 0, "large": 32}  # tie: larger K
    weighted = tune.choose_k(same, 0.05, weights={"small": 2.0})
    assert weighted["k"] == {"small": 8, "large": 0}
    never = tune.choose_k(free, 1.0, weights={"a": 0.0})  # weight 0: never, even if free
    assert never["k"]["a"] == 0 and never["k"]["b"] == 8
    assert tune.parse_weights("down_proj=2, v_proj=0") == {"down_proj": 2.0, "v_proj": 0.0}
    for bad in ("down_proj", "down_proj=x", "=2", "v_proj=-1"):
        with pytest.raises(ValueError, match="proj=value"):
            tune.parse_weights(bad)
    with pytest.raises(ValueError, match="target"):
        tune.choose_k(same, -0.1)
    with pytest.raises(ValueError, match="target"):
        tune.choose_k(same, float("nan"))


# ------------------------------------------------------------ config file
def synthetic_measurement() -> dict:
    return {"meta": {"device": "Test GPU 9000", "device_type": "cuda", "torch": "x",
                     "cuda": None, "commit": "abc", "threads": None},
            "iters": 1, "warmup": 0, "format": {"bits": 3, "group_size": 128, "residual_bits": 4},
            "shapes": "custom",
            "projections": {
                "q_proj": proj(1024, 100.0, [0, 8, 16], [100.0, 101.0, 103.0]),
                "down_proj": proj(4096, 200.0, [0, 32, 64], [200.0, 202.0, 206.0])}}


def test_config_round_trip_and_targets(tmp_path):
    config = tune.tune(synthetic_measurement(), [0.025, 0.05])
    assert list(config["targets"]) == ["2.5%", "5%"]
    assert tune.default_config_path(config).name == "test-gpu-9000_custom_w3g128r4.json"
    path = tune.write_config(config, tmp_path / "c.json")
    with pytest.raises(FileExistsError, match="overwrite"):
        tune.write_config(config, path)
    tune.write_config(config, path, overwrite=True)
    first = tune.load_config(path)  # default: the smallest target
    assert first == tune.load_config(path, "2.5%") == tune.load_config(path, 0.025)
    assert first == config["targets"]["2.5%"]["fraction"]
    assert tune.load_config(path, "5%")["down_proj"] == 64 / 4096
    assert "| 5% |" in tune.summary_table(config)
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind


def test_sm_budget_follows_the_chosen_k(tmp_path):
    # The fastest budget is recorded per k; the config carries the one at the
    # chosen k (0 = automatic where nothing is compensated).
    m = synthetic_measurement()
    for p in m["projections"].values():
        p["sm_budget"] = [0] + [4 * (i + 1) for i in range(len(p["k"]) - 1)]
    config = tune.tune(m, [0.0, 0.05])
    for key, choice in config["targets"].items():
        for name, k in choice["k"].items():
            p = m["projections"][name]
            assert choice["sm_budget"][name] == (0 if k == 0 else p["sm_budget"][p["k"].index(k)])
    path = tune.write_config(config, tmp_path / "c.json")
    assert tune.load_sm_budgets(path, "5%") == config["targets"]["5%"]["sm_budget"]
    assert set(tune.load_sm_budgets(path).values()) == {0}  # 0 %: nothing compensated
    assert "CTAs" in tune.summary_table(config)
    # A config without budgets (older files) reads as automatic everywhere.
    old = json.loads(path.read_text())
    del old["targets"]["5%"]["sm_budget"]
    path.write_text(json.dumps(old))
    assert tune.load_sm_budgets(path, "5%") == {}
    old["targets"]["5%"]["sm_budget"] = {"q_proj": -2}
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="invalid 'sm_budget'"):
        tune.load_sm_budgets(path, "5%")


def test_configure_sets_sm_budget():
    import torch
    from test_nn import build

    from qdec.patch import configure, qdec_layers

    model = torch.nn.ModuleDict({"q_proj": build(), "down_proj": build()})
    configure(model, sm_budget={"down_proj": 8})
    budgets = {name: layer.sm_budget for name, layer in qdec_layers(model)}
    assert all((b == 8) == name.endswith("down_proj") for name, b in budgets.items())
    configure(model, sm_budget=0)
    assert all(layer.sm_budget == 0 for _, layer in qdec_layers(model))
    with pytest.raises(ValueError, match="sm_budget of .* must be >= 0"):
        configure(model, sm_budget=-1)


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="qdec tune"):
        tune.load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        tune.load_config(bad)
    bad.write_text(json.dumps({"targets": {}}))
    with pytest.raises(ValueError, match="not a qdec tune config"):
        tune.load_config(bad)
    path = tune.write_config(tune.tune(synthetic_measurement(), [0.05]), tmp_path / "c.json")
    with pytest.raises(ValueError, match=r"no target 10%; the file has \['5%'\]"):
        tune.load_config(path, "10%")
    with pytest.raises(ValueError, match="not a number"):
        tune.load_config(path, "fast")
    broken = json.loads(path.read_text())
    broken["targets"]["5%"]["fraction"]["q_proj"] = 1.5
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="valid 'fraction'"):
        tune.load_config(path, "5%")


# ------------------------------------------------------------ measured
def test_measure(device):
    # On every device (the cuda case runs in benchmarks/gpu_run.sh's test step).
    shapes = {"q_proj": (64, 96), "down_proj": (48, 160)}
    m = tune.measure(device, bits=3, group_size=32, residual_bits=4, shapes=shapes,
                     per_1024=(0, 64, 256), sm_budgets=(0, 2), iters=1, warmup=0,
                     progress=False)
    assert m["shapes"] == "custom" and m["meta"]["device_type"] == device
    q = m["projections"]["q_proj"]
    assert q["k"] == [0, 6, 24] and len(q["compensated_us"]) == 3 and q["base_us"] > 0
    assert set(q["by_sm_budget"]) == {"0", "2"} and q["sm_budget"][0] == 0
    for i, b in enumerate(q["sm_budget"]):  # the kept time is the fastest budget's
        assert q["compensated_us"][i] == min(t[i] for t in q["by_sm_budget"].values())
        assert i == 0 or q["compensated_us"][i] == q["by_sm_budget"][str(b)][i]
    with pytest.raises(ValueError, match="SM budgets must be >= 0"):
        tune.measure("cpu", shapes=shapes, sm_budgets=(-1,))
    with pytest.raises(ValueError, match="unknown shape preset"):
        tune.measure("cpu", shapes="gpt-5")


def test_tune_cli_on_cpu(tmp_path, capsys):
    out = tmp_path / "tuned.json"
    assert main(["tune", "--device", "cpu", "--shapes", "smollm2-135m", "--iters", "1",
                 "--targets", "2.5%,10%", "--out", str(out), "--no-progress"]) == 0
    assert "| 10% |" in capsys.readouterr().out
    config = json.loads(out.read_text())
    assert set(config["projections"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"}
    for choice in config["targets"].values():
        assert choice["overhead_us"] <= choice["budget_us"] + 1e-9
    assert main(["tune", "--device", "cpu", "--out", str(out)]) == 2  # exists: refused
    assert "--overwrite" in capsys.readouterr().err
    assert main(["tune", "--device", "cpu", "--weights", "mlp=2", "--out",
                 str(tmp_path / "w.json")]) == 2
    assert "unknown projections ['mlp']" in capsys.readouterr().err
    assert main(["tune", "--device", "cpu", "--shapes", "smollm2-135m", "--iters", "1",
                 "--weights", "v_proj=0", "--out", str(tmp_path / "w.json"),
                 "--no-progress"]) == 0
    weighted = json.loads((tmp_path / "w.json").read_text())
    assert weighted["weights"] == {"v_proj": 0.0}
    assert all(c["k"]["v_proj"] == 0 for c in weighted["targets"].values())


def test_eval_reads_tune_config(tiny, tmp_path):  # noqa: F811
    from qdec.eval.sweep import EvalConfig, Variant, run_eval

    config = tune.tune(synthetic_measurement(), [0.025, 0.05])
    config["targets"]["5%"]["fraction"] = {"q_proj": 0.25, "down_proj": 0.5}
    path = tune.write_config(config, tmp_path / "c.json")
    cfg = EvalConfig(text=tiny, calib_text=tiny, seq_len=64, max_windows=2,
                     variants=[Variant.parse("rtn:2:32")], fractions=[], policies=[],
                     calib_samples=2, calib_len=32, progress=False, tune_config=path,
                     tune_targets=["5%"])
    v = run_eval(cfg)["variants"][0]
    (t,) = v["tuned"]
    assert t["target"] == "5%" and t["fractions"] == {"q_proj": 0.25, "down_proj": 0.5}
    assert t["fetched_bytes_per_token"] > 0 and t["ppl"] != v["quantized"]["ppl"]


def test_decode_layer_benchmark_runs_on_cpu(tmp_path):
    config = tune.tune(synthetic_measurement(), [0.05])
    cfg_path = tune.write_config(config, tmp_path / "c.json")
    out = tmp_path / "layer.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode_layer.py"),
                    "--device", "cpu", "--quick", "--iters", "1", "--tune-config",
                    str(cfg_path), "--out", str(out)], check=True, capture_output=True,
                   timeout=600)
    data = json.loads(out.read_text())
    assert set(data["layer_us"]) == {"fp16", "qdec_w4", "qdec_w3", "qdec_w3_comp",
                                     "qdec_w3_tuned_5%"}
    assert data["tinygemm"]["available"] is False and "CUDA" in data["tinygemm"]["reason"]
    assert {"comp_vs_w3", "w3_vs_w4", "tuned_5%_vs_w3"} <= set(data["ratios"])
    # SmolLM2's widths, k = 8 per 1024 (at least 1).
    assert set(data["outlier_select_us"]) == {"K=576 k=4", "K=1536 k=12"}
    assert all(t > 0 for t in data["outlier_select_us"].values())
    assert data["commit"] and data["torch"]
