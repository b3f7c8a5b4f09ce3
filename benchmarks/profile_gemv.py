"""Hardware counters of the batch-1 decode kernels (Nsight Compute), to say
what bounds a kernel when a speed target in ``bench_gemv`` or
``bench_decode_layer`` is missed: DRAM bandwidth, instruction issue, or
latency (too little work in flight).

``benchmarks/gpu_run.sh`` runs it in two steps::

    ncu --clock-control none --profile-from-start off --print-units base --csv \\
        --metrics "$(python benchmarks/profile_gemv.py metrics)" --log-file ncu.csv \\
        python benchmarks/profile_gemv.py launch --manifest manifest.json
    python benchmarks/profile_gemv.py summarize ncu.csv manifest.json --out profile_gemv.json

``launch`` builds random operands at the Llama-3-8B shapes (qdec W4 and W3
g128 GEMVs, W3 with compensation at 8 per 1024 channels, torch's int4
tinygemm), warms every call up outside the profiled range, then runs each
once between ``cudaProfilerStart``/``Stop``, each preceded by a marker kernel
(``torch.cuda._sleep``, ATen's ``spin_kernel``), and writes the labels in
launch order. ``summarize`` splits the profiled kernels at the markers and
reports, per label and kernel: time, DRAM read bytes and GB/s, DRAM
throughput and issue-slot use as % of peak, achieved occupancy, registers,
and a one-word verdict (``memory``, ``issue`` or ``latency``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdec.eval.sweep import write_json  # noqa: E402  (atomic, like every benchmark)

METRICS = {
    "gpu__time_duration.sum": "time",
    "dram__bytes_read.sum": "dram_read",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy_pct",
    "launch__registers_per_thread": "registers",
    "launch__grid_size": "grid",
}
MARKER = "spin_kernel"
# A kernel is called bound by what it uses most, once that passes this share
# of its peak; below it on both counts, it waits on latency (too few bytes or
# instructions in flight), which more or larger loads per thread would fix.
BOUND_PCT = 60.0
TIME_TO_US = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
BYTES = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}


def launch(manifest: Path, iters_warmup: int = 20) -> None:
    import torch

    from qdec import ops
    from qdec.benchmarking import (SHAPE_PRESETS, packed_layer, residual_store, run_metadata,
                                   tinygemm_setup)

    if not torch.cuda.is_available():
        raise SystemExit("profile_gemv launch needs a CUDA GPU")
    gen = torch.Generator().manual_seed(0)
    calls: list[tuple[str, object]] = []
    for N, K in dict.fromkeys(SHAPE_PRESETS["llama3-8b"].values()):
        x = torch.randn(1, K, generator=gen).to("cuda", torch.float16)
        w4, _ = packed_layer(N, K, 4, 128, torch.float16, "cuda", gen)
        w3, _ = packed_layer(N, K, 3, 128, torch.float16, "cuda", gen)
        residual, rscales = residual_store(N, K, 4, "cuda", gen)
        k = max(1, K // 128)
        shape = f"{N}x{K}"
        calls += [(f"qdec_w4 {shape}", lambda x=x, a=w4: ops.quantized_matmul(x, *a)),
                  (f"qdec_w3 {shape}", lambda x=x, a=w3: ops.quantized_matmul(x, *a)),
                  (f"qdec_w3_comp_k{k} {shape}",
                   lambda x=x, a=w3, r=residual, s=rscales, k=k:
                   ops.compensated_linear(x, *a, r, s, 4, k))]
        try:
            fn, _ = tinygemm_setup(N, K, 128, "cuda", gen)
            calls.append((f"tinygemm_int4 {shape}", lambda fn=fn, xb=x.bfloat16(): fn(xb)))
        except Exception as e:  # noqa: BLE001  (profile the rest)
            print(f"tinygemm unavailable at {shape}: {type(e).__name__}: {e}")
    for _, fn in calls:
        for _ in range(iters_warmup):
            fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _, fn in calls:
        torch.cuda._sleep(1)  # marker kernel: the next group of kernels is this call's
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    write_json({"meta": run_metadata("cuda"), "labels": [label for label, _ in calls]}, manifest)


def read_ncu_csv(path: Path) -> list[dict]:
    """Kernels in launch order from ``ncu --csv`` (details page, one row per
    metric): ``[{"id", "name", "metrics": {metric name: (value, unit)}}]``."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{path}: no ncu CSV header (a line starting with \"ID\"); "
                         "was ncu run with --csv and did it profile any kernel?")
    rows = csv.DictReader(lines[start:])
    need = {"ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value"}
    if missing := need - set(rows.fieldnames or []):
        raise ValueError(f"{path}: ncu CSV lacks columns {sorted(missing)}; has {rows.fieldnames}")
    kernels: dict[int, dict] = {}
    for row in rows:
        if not row["ID"].strip().isdigit():
            continue  # ==PROF== notes and the like
        k = kernels.setdefault(int(row["ID"]), {"id": int(row["ID"]), "name": row["Kernel Name"],
                                                "metrics": {}})
        value = row["Metric Value"].replace(",", "").strip()
        try:
            k["metrics"][row["Metric Name"]] = (float(value), row["Metric Unit"].strip())
        except ValueError:
            k["metrics"][row["Metric Name"]] = (None, row["Metric Unit"].strip())
    return [kernels[i] for i in sorted(kernels)]


def kernel_summary(kernel: dict) -> dict:
    """One kernel's numbers in fixed units, and its verdict."""
    out: dict = {"kernel": kernel["name"]}
    for metric, key in METRICS.items():
        value, unit = kernel["metrics"].get(metric, (None, ""))
        if value is None:
            continue
        if key == "time":
            out["time_us"] = value * TIME_TO_US.get(unit, float("nan"))
        elif key == "dram_read":
            out["dram_read_bytes"] = value * BYTES.get(unit, float("nan"))
        else:
            out[key] = value
    if out.get("time_us") and "dram_read_bytes" in out:
        out["dram_read_GBps"] = out["dram_read_bytes"] / (out["time_us"] * 1e-6) / 1e9
    dram, issue = out.get("dram_pct"), out.get("issue_pct")
    if dram is not None and issue is not None:
        out["bound_by"] = ("memory" if dram >= BOUND_PCT and dram >= issue
                           else "issue" if issue >= BOUND_PCT else "latency")
    return out


def summarize(csv_path: Path, manifest_path: Path) -> dict:
    """Per label: its kernels' summaries and their summed time."""
    manifest = json.loads(manifest_path.read_text())
    labels = manifest["labels"]
    groups: list[list[dict]] = []
    for kernel in read_ncu_csv(csv_path):
        if MARKER in kernel["name"]:
            groups.append([])
        elif groups:
            groups[-1].append(kernel)
    if len(groups) != len(labels):
        raise ValueError(f"{csv_path}: {len(groups)} marker-separated kernel groups but "
                         f"{len(labels)} labels in {manifest_path}; was the whole launch "
                         "profiled (--profile-from-start off, no kernel filter)?")
    calls = {}
    for label, kernels in zip(labels, groups):
        summaries = [kernel_summary(k) for k in kernels]
        calls[label] = {"kernels": summaries,
                        "time_us": sum(s.get("time_us", 0.0) for s in summaries)}
    return {"meta": manifest["meta"], "bound_pct": BOUND_PCT, "calls": calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("metrics", help="print the --metrics list for ncu")
    p = sub.add_parser("launch", help="run the profiled calls (under ncu)")
    p.add_argument("--manifest", required=True)
    p = sub.add_parser("summarize", help="ncu CSV + manifest -> JSON")
    p.add_argument("csv")
    p.add_argument("manifest")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "metrics":
        print(",".join(METRICS))
    elif args.command == "launch":
        launch(Path(args.manifest))
    else:
        result = summarize(Path(args.csv), Path(args.manifest))
        write_json(result, Path(args.out))
        for label, call in result["calls"].items():
            main_kernel = max(call["kernels"], key=lambda s: s.get("time_us", 0.0), default={})
            print(f"{label:32s} {call['time_us']:8.2f} us  longest: "
                  f"{main_kernel.get('kernel', '-')[:40]:40s} DRAM "
                  f"{main_kernel.get('dram_pct', float('nan')):5.1f}%  issue "
                  f"{main_kernel.get('issue_pct', float('nan')):5.1f}%  "
                  f"{main_kernel.get('bound_by', '?')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
