"""One decoder layer's linears at decode time (batch 1), Llama-3-8B shapes,
random weights, every configuration side by side in ONE run:

- ``fp16``: ``F.linear`` per projection (cuBLAS on CUDA; fp32 BLAS on CPU);
- ``tinygemm_int4``: torch's ``aten._weight_int4pack_mm``, 4-bit g128 (CUDA);
- ``qdec_w4`` / ``qdec_w3``: ``quantized_matmul``, g128;
- ``qdec_w3_comp``: 3-bit ``compensated_linear`` at k = 8 per 1024 input
  channels (0.8 %), 4-bit residual store in pinned host memory (CUDA);
- ``qdec_w3_tuned_<target>``: k per projection from ``--tune-config``.

Each configuration is timed as the whole sequence q, k, v, o, gate, up, down
(one timed call per layer step, so launch gaps count as in a decode step),
and per projection. Also measured, on CUDA, in the same run: device-to-device
copy bandwidth (the roof of a memory-bound GEMV) and the pinned-host read
roofs (DMA copy and the kernel's own sequential zero-copy read) against which
the residual fetch is judged.

``outlier_select_us``: the selection alone (``outlier_select``, batch 1) at
each input width of the layer, k = 8 per 1024 (target at K = 14336: < 3 us).

Ratios (``ratios``): ``comp_vs_w3`` = compensated layer / 3-bit layer (target
<= 1.10 on H100), ``comp_vs_tinygemm`` = compensated 3-bit layer / tinygemm
4-bit layer (target <= 0.6), ``w3_vs_w4`` and ``w4_vs_tinygemm`` (GEMV).

    python benchmarks/bench_decode_layer.py --device cuda
    python benchmarks/bench_decode_layer.py --device cpu --quick   # logic check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qdec import ops  # noqa: E402  (registers the ops)
from qdec.benchmarking import (  # noqa: E402
    SHAPE_PRESETS,
    copy_bandwidth,
    packed_layer,
    pinned_read_bandwidths,
    residual_store,
    run_metadata,
    time_op,
    tinygemm_setup,
)
from qdec.eval.sweep import write_json  # noqa: E402

GROUP = 128
RESIDUAL_BITS = 4
K_PER_1024 = 8  # 0.8 % of input channels, the compensation setting


def build(shapes: dict, device: str, dtype, tune_fractions: dict[str, dict[str, float]],
          tune_budgets: dict[str, dict[str, int]]):
    """Per configuration, the list of zero-argument calls (one per projection)."""
    gen = torch.Generator().manual_seed(0)
    configs: dict[str, dict[str, object]] = {"fp16": {}, "qdec_w4": {}, "qdec_w3": {},
                                             "qdec_w3_comp": {}}
    configs.update({f"qdec_w3_tuned_{t}": {} for t in tune_fractions})
    tinygemm: dict[str, object] = {}
    tinygemm_reason = None
    keep = []  # operands stay alive for the lambdas
    for name, (N, K) in shapes.items():
        x = torch.randn(1, K, generator=gen).to(device, dtype)
        w = (torch.randn(N, K, generator=gen) * 0.02).to(device, dtype)
        w4, _ = packed_layer(N, K, 4, GROUP, dtype, device, gen)
        w3, _ = packed_layer(N, K, 3, GROUP, dtype, device, gen)
        residual, rscales = residual_store(N, K, RESIDUAL_BITS, device, gen)
        keep += [x, w, w4, w3, residual, rscales]
        k = max(1, round(K_PER_1024 * K / 1024))
        configs["fp16"][name] = lambda x=x, w=w: torch.nn.functional.linear(x, w)
        configs["qdec_w4"][name] = lambda x=x, a=w4: ops.quantized_matmul(x, *a)
        configs["qdec_w3"][name] = lambda x=x, a=w3: ops.quantized_matmul(x, *a)
        configs["qdec_w3_comp"][name] = (
            lambda x=x, a=w3, r=residual, s=rscales, k=k:
            ops.compensated_linear(x, *a, r, s, RESIDUAL_BITS, k))
        for t, fractions in tune_fractions.items():
            kt = round(fractions.get(name, 0.0) * K)
            bt = tune_budgets[t].get(name, 0)
            configs[f"qdec_w3_tuned_{t}"][name] = (
                lambda x=x, a=w3, r=residual, s=rscales, k=kt, b=bt:
                ops.compensated_linear(x, *a, r, s, RESIDUAL_BITS, k, None, b))
        try:
            fn, _ = tinygemm_setup(N, K, GROUP, device, gen)
            xb = x.to(torch.bfloat16)
            keep.append(xb)
            tinygemm[name] = lambda fn=fn, xb=xb: fn(xb)
        except Exception as e:  # noqa: BLE001  (record why, keep benchmarking)
            tinygemm_reason = f"{type(e).__name__}: {e}"
    if len(tinygemm) == len(shapes):
        configs["tinygemm_int4"] = tinygemm
    return configs, tinygemm_reason, keep


def run(args) -> dict:
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    shapes = dict(SHAPE_PRESETS[args.shapes])
    iters = args.iters or (200 if device == "cuda" else (2 if args.quick else 5))
    warmup = 20 if device == "cuda" else 1
    tune_fractions, tune_budgets = {}, {}
    if args.tune_config:
        from qdec.tune import load_sm_budgets, load_targets

        tune_fractions = load_targets(args.tune_config)
        tune_budgets = {t: load_sm_budgets(args.tune_config, t) for t in tune_fractions}
    configs, tinygemm_reason, _keep = build(shapes, device, dtype, tune_fractions, tune_budgets)
    layer_us, per_projection = {}, {}
    for cfg, calls in configs.items():
        seq = list(calls.values())

        def step(seq=seq):
            for f in seq:
                f()
        layer_us[cfg] = time_op(step, device, iters, warmup) * 1e6
        per_projection[cfg] = {n: time_op(f, device, iters, warmup) * 1e6
                               for n, f in calls.items()}
        print(f"{cfg:<24} layer {layer_us[cfg]:10.1f} us", flush=True)
    # The selection that compensated_linear runs first, timed alone per width.
    gen = torch.Generator().manual_seed(1)
    outlier_select_us = {}
    for K in sorted({K for _, K in shapes.values()}):
        k = max(1, round(K_PER_1024 * K / 1024))
        x = torch.randn(1, K, generator=gen).to(device, dtype)
        outlier_select_us[f"K={K} k={k}"] = time_op(lambda x=x, k=k: ops.outlier_select(x, k),
                                                    device, iters, warmup) * 1e6
    ratios = {
        "comp_vs_w3": layer_us["qdec_w3_comp"] / layer_us["qdec_w3"],
        "w3_vs_w4": layer_us["qdec_w3"] / layer_us["qdec_w4"],
    }
    if "tinygemm_int4" in layer_us:
        ratios["comp_vs_tinygemm"] = layer_us["qdec_w3_comp"] / layer_us["tinygemm_int4"]
        ratios["w4_vs_tinygemm"] = layer_us["qdec_w4"] / layer_us["tinygemm_int4"]
    for t in tune_fractions:
        ratios[f"tuned_{t}_vs_w3"] = layer_us[f"qdec_w3_tuned_{t}"] / layer_us["qdec_w3"]
    roofs = {}
    if device == "cuda":
        roofs["d2d_copy_bytes_per_s"] = copy_bandwidth("cuda")
        roofs["pinned_read"] = pinned_read_bandwidths()
    return {**run_metadata(device), "dtype": str(dtype), "iters": iters, "warmup": warmup,
            "shapes": args.shapes, "group_size": GROUP, "residual_bits": RESIDUAL_BITS,
            "compensation_k_per_1024": K_PER_1024, "tune_config": args.tune_config,
            "tinygemm": {"available": "tinygemm_int4" in layer_us, "reason": tinygemm_reason},
            "layer_us": layer_us, "per_projection_us": per_projection, "ratios": ratios,
            "outlier_select_us": outlier_select_us,
            "roofs": roofs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="llama3-8b", choices=sorted(SHAPE_PRESETS))
    p.add_argument("--iters", type=int, default=0, help="timed calls (0: device default)")
    p.add_argument("--quick", action="store_true", help="SmolLM2 shapes, 2 iterations")
    p.add_argument("--tune-config", default=None, help="also time the k of a qdec tune config")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON (default benchmarks/results/bench_decode_layer_<device>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes = "smollm2-135m"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    with torch.inference_mode():
        data = run(args)
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_decode_layer_{args.device}.json"
    write_json(data, out)
    print(f"{data['device']} | torch {data['torch']} | commit {data['commit']}")
    for name, r in data["ratios"].items():
        print(f"  {name:<24} {r:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
