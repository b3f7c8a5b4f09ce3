"""benchmarks/profile_gemv.py's summarizer on a hand-written Nsight Compute
CSV (the GPU half, `launch`, runs only in benchmarks/gpu_run.sh)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("profile_gemv", ROOT / "benchmarks/profile_gemv.py")
profile_gemv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_gemv)

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value"')


def rows(kid: int, name: str, metrics: dict[str, tuple[str, str]]) -> list[str]:
    return [f'"{kid}","1","python3","h","{name}","1","7","(128, 1, 1)","(256, 1, 1)","0","9.0",'
            f'"Command line profiler metrics","{m}","{unit}","{value}"'
            for m, (unit, value) in metrics.items()]


def write_csv(path: Path, kernels: list[tuple[str, dict]]) -> None:
    lines = ["==PROF== Connected to process 1", HEADER]
    for i, (name, metrics) in enumerate(kernels):
        lines += rows(i, name, metrics)
    path.write_text("\n".join(lines) + "\n")


MARK = {"gpu__time_duration.sum": ("nsecond", "1000")}  # ncu lists every metric of a kernel
GEMV = {"gpu__time_duration.sum": ("nsecond", "4,000"),
        "dram__bytes_read.sum": ("byte", "12000000"),
        "dram__throughput.avg.pct_of_peak_sustained_elapsed": ("%", "85.5"),
        "smsp__issue_active.avg.pct_of_peak_sustained_active": ("%", "40"),
        "sm__warps_active.avg.pct_of_peak_sustained_active": ("%", "30"),
        "launch__registers_per_thread": ("register/thread", "96")}
SLOW = {**GEMV, "dram__throughput.avg.pct_of_peak_sustained_elapsed": ("%", "20"),
        "smsp__issue_active.avg.pct_of_peak_sustained_active": ("%", "25")}
BUSY = {**GEMV, "dram__throughput.avg.pct_of_peak_sustained_elapsed": ("%", "50"),
        "smsp__issue_active.avg.pct_of_peak_sustained_active": ("%", "90")}


def test_summarize_groups_kernels_by_marker_and_names_the_bound(tmp_path):
    write_csv(tmp_path / "ncu.csv", [
        ("spin_kernel(long)", MARK),
        ("gemv_kernel<3, __half, __half>", GEMV),
        ("spin_kernel(long)", MARK),
        ("select_kernel", SLOW), ("gemv_kernel<3, __half, float>", BUSY), ("combine", SLOW)])
    (tmp_path / "m.json").write_text(json.dumps({"meta": {"device": "H100"},
                                                 "labels": ["qdec_w3 a", "comp a"]}))
    out = tmp_path / "p.json"
    assert profile_gemv.main(["summarize", str(tmp_path / "ncu.csv"), str(tmp_path / "m.json"),
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    w3 = result["calls"]["qdec_w3 a"]
    assert w3["time_us"] == pytest.approx(4.0)
    (k,) = w3["kernels"]
    assert k["bound_by"] == "memory" and k["registers"] == 96
    assert k["dram_read_GBps"] == pytest.approx(12e6 / 4e-6 / 1e9)
    comp = result["calls"]["comp a"]
    assert [s["bound_by"] for s in comp["kernels"]] == ["latency", "issue", "latency"]
    assert comp["time_us"] == pytest.approx(12.0)


def test_summarize_errors_name_the_file(tmp_path):
    bad = tmp_path / "ncu.csv"
    bad.write_text("==PROF== no kernels were profiled\n")
    (tmp_path / "m.json").write_text(json.dumps({"meta": {}, "labels": ["a"]}))
    with pytest.raises(ValueError, match="ncu.csv: no ncu CSV header"):
        profile_gemv.summarize(bad, tmp_path / "m.json")
    write_csv(bad, [("spin_kernel", MARK), ("gemv", GEMV), ("spin_kernel", MARK)])
    with pytest.raises(ValueError, match="2 marker-separated kernel groups but 1 labels"):
        profile_gemv.summarize(bad, tmp_path / "m.json")


def test_metrics_list_is_what_ncu_takes(capsys):
    assert profile_gemv.main(["metrics"]) == 0
    assert capsys.readouterr().out.strip().split(",") == list(profile_gemv.METRICS)
