"""The ``qdec`` command line: ``demo``, ``quantize``, ``eval``, ``generate``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _variants(text: str):
    from .eval.sweep import Variant

    return [Variant.parse(s) for s in text.split(",") if s]


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s]


def cmd_demo(args: argparse.Namespace) -> int:
    """Quantize one real layer of the embedded model and show how dynamic
    compensation shrinks its output error on real activations."""
    import torch

    import qdec
    from .models.llama import load_gguf_llama
    from .quant.residual import quantize_residual
    from .quant.rtn import quantize_rtn

    model, tok = load_gguf_llama()
    name = f"model.layers.{args.layer}.mlp.down_proj"
    linear = model.get_submodule(name)
    captured = []
    handle = linear.register_forward_pre_hook(lambda m, a: captured.append(a[0][0]))
    prompt = "The capital of France is Paris. The tower was built in 1889 for the World's Fair."
    with torch.no_grad():
        model(tok(prompt, return_tensors="pt").input_ids)
    handle.remove()
    x = captured[0]
    w = linear.weight.detach()
    qw = quantize_rtn(w, args.bits, args.group_size)
    residual, rscales = quantize_residual(w - qw.dequantize(), 4)
    qweight, scales = qw.pack(), qw.scales.float()
    zeros = None if qw.zeros is None else qw.zeros.float()
    ref = x @ w.t()
    print(f"{name}: W {tuple(w.shape)}, {x.shape[0]} tokens, RTN {args.bits}-bit "
          f"g{args.group_size}, 4-bit residual")
    for frac in (0.0, 0.01, 0.02, 0.05, 0.1, 1.0):
        k = round(frac * w.shape[1])
        y = qdec.compensated_linear(x, qweight, scales, zeros, args.bits, args.group_size,
                                    residual, rscales, 4, k)
        err = ((y - ref).norm() / ref.norm()).item()
        print(f"  k = {k:4d} ({frac:5.0%} of input channels): relative output error {err:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.sweep import EvalConfig, plot_results, run_eval

    cfg = EvalConfig(
        text=Path(args.text), calib_text=Path(args.calib), model=args.model,
        seq_len=args.seq_len, max_windows=args.max_windows, variants=_variants(args.variants),
        fractions=_floats(args.fractions), policies=args.policies.split(","),
        residual_bits=args.residual_bits, calib_samples=args.calib_samples,
        calib_len=args.calib_len, progress=not args.no_progress)
    out = Path(args.out)
    results = run_eval(cfg, out)
    plot_results(results, out.with_suffix(".png"))
    ref = results["reference"]["ppl"]
    print(f"reference perplexity {ref:.3f} ({results['text_tokens']} tokens)")
    for v in results["variants"]:
        print(f"{v['label']}: {v['quantized']['ppl']:.3f}")
        for c in v["compensated"]:
            print(f"  {c['policy']:8s} k={c['fraction']:5.1%}: {c['ppl']:.3f} "
                  f"(gap closed {c['gap_closed']:+.1%})")
    print(f"wall time {results['wall_seconds']:.0f} s; results: {out}, plot: "
          f"{out.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qdec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="compensate one real layer of the embedded model")
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="perplexity sweep: reference, quantized, QDEC x policies")
    p.add_argument("--model", default=None, help="GGUF file (default: embedded SmolLM2-135M)")
    p.add_argument("--text", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate only the first N windows (default: the whole text)")
    p.add_argument("--variants", default="rtn:3:128,awq:3:128,awq:2:64",
                   help="comma-separated method:bits:group[:sym]")
    p.add_argument("--fractions", default="0.01,0.02,0.05,0.1")
    p.add_argument("--policies", default="dynamic,static,random,oracle")
    p.add_argument("--residual-bits", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--out", default="results/eval.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"qdec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
