"""The ``qdec`` command line: ``demo``, ``quantize``, ``eval``, ``report``, ``generate``,
``tune``, ``allocate``."""

from __future__ import annotations

import argparse
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


def load_model(path: str | None):
    """``(model, tokenizer)`` from a GGUF file, a Hugging Face model directory,
    or (``None``) the embedded SmolLM2-135M; always offline."""
    from .models.llama import load_gguf_llama

    if path is None or str(path).endswith(".gguf"):
        return load_gguf_llama(path)
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: neither a .gguf file nor a model directory with config.json")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype="float32")
    return model.eval(), AutoTokenizer.from_pretrained(p, local_files_only=True)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize every decoder linear and write a QDEC checkpoint (packed weights,
    residual store, tokenizer) plus a JSON summary of per-layer errors.

    A Hugging Face directory is quantized by streaming: one decoder layer in memory
    at a time (:func:`qdec.quant.streaming.quantize_checkpoint_streaming`), so peak
    memory does not grow with the model. A GGUF file (the embedded model by
    default) is loaded whole, as it is small."""
    from .eval.sweep import calibration_ids, environment, write_json

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    options = dict(symmetric=args.symmetric, residual_bits=args.residual_bits or None,
                   gptq_act_order=args.act_order)
    t0 = time.time()
    if args.model is not None and not str(args.model).endswith(".gguf"):
        import torch
        from transformers import AutoTokenizer

        from .quant.streaming import quantize_checkpoint_streaming

        src = Path(args.model)
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src}: neither a .gguf file nor a model directory with "
                                    f"config.json")
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
        calib = calibration_ids(tok, Path(args.calib), args.calib_samples, args.calib_len,
                                args.seed)
        with tempfile_dir(out) as tmp_tok:
            tok.save_pretrained(tmp_tok)
            extra = {f.name: f for f in Path(tmp_tok).iterdir()}
            # float32 compute, as the in-memory path loads HF directories (load_model).
            result = quantize_checkpoint_streaming(
                src, out, args.method, args.bits, args.group_size, calib_ids=calib,
                overwrite=args.overwrite, dtype=torch.float32, extra_files=extra, **options)
    else:
        from .formats.qdec_checkpoint import save_quantization_result
        from .quant.pipeline import quantize_model

        model, tok = load_model(args.model)
        calib = calibration_ids(tok, Path(args.calib), args.calib_samples, args.calib_len,
                                args.seed)
        result = quantize_model(model, args.method, args.bits, args.group_size,
                                calib_ids=calib, **options)
        with tempfile_dir(out) as tmp_tok:
            tok.save_pretrained(tmp_tok)
            extra = {f.name: f for f in Path(tmp_tok).iterdir()}
            save_quantization_result(out, result, model, overwrite=args.overwrite,
                                     extra_files=extra)
    layers = {name: {"rel_error": r.rel_error, "rel_error_full_residual": r.rel_error_full_residual,
                     "weight_bytes": r.weight_bytes, "residual_bytes": r.residual_bytes,
                     "seconds": round(r.seconds, 3)} for name, r in result.linears.items()}
    summary = {"model": args.model or "embedded SmolLM2-135M (dequantized Q4_1)",
               "method": args.method, "bits": args.bits, "group_size": args.group_size,
               "symmetric": args.symmetric, "residual_bits": args.residual_bits,
               "seconds": round(time.time() - t0, 1),
               "weight_bytes": sum(v["weight_bytes"] for v in layers.values()),
               "residual_bytes": sum(v["residual_bytes"] for v in layers.values()),
               "layer_seconds": {k: round(v, 3) for k, v in result.layer_seconds.items()},
               "streaming": hasattr(result, "layer_rss_bytes"),
               "environment": environment(), "layers": layers}
    if hasattr(result, "layer_rss_bytes"):
        summary["layer_rss_bytes"] = result.layer_rss_bytes
    write_json(summary, out / "quantize_summary.json")
    print(result.summary())
    print(f"wrote {out}")
    return 0


class tempfile_dir:
    """A temporary directory beside ``target`` (same filesystem), removed on exit."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __enter__(self) -> str:
        import tempfile

        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(dir=self.target.parent, prefix=".qdec-tok-")
        return self._tmp.name

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a QDEC checkpoint with and without compensation; report
    tokens/s."""
    import torch

    from transformers import AutoTokenizer

    from .patch import configure, load_patched_checkpoint, qdec_layers

    model = load_patched_checkpoint(args.checkpoint)
    # the checkpoint's own k (e.g. a per-linear k map from `qdec allocate`)
    stored = {name: m.k for name, m in qdec_layers(model)}
    tok = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    messages = [{"role": "user", "content": args.prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
    settings: list = [0.0]
    if args.tune_config:
        from .tune import load_config, load_sm_budgets

        settings.append(load_config(args.tune_config, args.tune_target))
        configure(model, sm_budget=load_sm_budgets(args.tune_config, args.tune_target))
    elif args.k:
        settings.append(args.k)
    elif any(stored.values()):
        settings.append(stored)
    for k in settings:
        configure(model, k=0)
        configure(model, k=k)
        t0 = time.time()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.max_new_tokens,
                                 do_sample=args.temperature > 0,
                                 temperature=args.temperature or None, top_k=args.top_k or None)
        new = out.shape[1] - ids.shape[1]
        dt = time.time() - t0
        if k is stored:
            what = f"the checkpoint's k map ({sum(v > 0 for v in k.values())} linears)"
        else:
            what = (", ".join(f"{n} {f:.2%}" for n, f in k.items()) if isinstance(k, dict)
                    else f"{k:.1%}")
        print(f"--- k = {what} of input channels: {new} tokens in {dt:.2f} s "
              f"({new / dt:.1f} tokens/s)")
        print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.sweep import EvalConfig, plot_results, run_eval

    cfg = EvalConfig(
        text=Path(args.text), calib_text=Path(args.calib), model=args.model,
        seq_len=args.seq_len, max_windows=args.max_windows, variants=_variants(args.variants),
        fractions=_floats(args.fractions), policies=[p for p in args.policies.split(",") if p],
        residual_bits=args.residual_bits, calib_samples=args.calib_samples,
        calib_len=args.calib_len, progress=not args.no_progress,
        ranks=[int(r) for r in args.ranks.split(",") if r],
        cost_fractions=_floats(args.cost_fractions),
        lowrank_methods=[m for m in args.lowrank_methods.split(",") if m],
        tune_config=Path(args.tune_config) if args.tune_config else None,
        tune_targets=[t for t in args.tune_targets.split(",") if t],
        budgets=[b for b in args.budget.split(",") if b], gain_measure=args.gain_measure,
        budget_calib_windows=args.budget_calib_windows)
    if cfg.budgets:  # fail now, not after the reference pass
        from .budget import parse_budget

        for b in cfg.budgets:
            parse_budget(b)
    if cfg.tune_config is not None:  # fail now, not after the reference pass
        from .tune import load_targets

        load_targets(cfg.tune_config, cfg.tune_targets)
    out = Path(args.out)
    results = run_eval(cfg, out)
    if cfg.policies and cfg.fractions:
        plot_results(results, out.with_suffix(".png"))
    ref = results["reference"]["ppl"]
    print(f"reference perplexity {ref:.3f} ({results['text_tokens']} tokens)")
    for v in results["variants"]:
        print(f"{v['label']}: {v['quantized']['ppl']:.3f}")
        for c in v["compensated"]:
            print(f"  {c['policy']:8s} k={c['fraction']:5.1%}: {c['ppl']:.3f} "
                  f"(gap closed {c['gap_closed']:+.1%})")
        for t in v.get("tuned", []):
            print(f"  tuned {t['target']:>6}: {t['ppl']:.3f} (gap closed {t['gap_closed']:+.1%}, "
                  f"{t['fetched_bytes_per_token'] / 1024:.0f} KiB fetched/token)")
        for b in v.get("budget", {}).get("runs", []):
            print(f"  budget {b['budget']:>6} {b['allocation']:9s}: {b['ppl']:.3f} "
                  f"(gap closed {b['gap_closed']:+.1%}, "
                  f"{b['fetched_bytes_per_token'] / 1024:.0f} KiB fetched/token)")
        if v.get("cost_comparison"):
            from .eval.costs import cost_table

            print(cost_table(v["cost_comparison"], ref))
    if cfg.ranks:
        from .eval.costs import plot_costs

        plot_costs(results["variants"], ref, out.with_name(out.stem + "_costs.png"))
    print(f"wall time {results['wall_seconds']:.0f} s; results: {out}")
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    """Choose k per linear for a fetch budget from calibration text and store
    the k map in the checkpoint's config (qdec.budget)."""
    from transformers import AutoTokenizer

    from .budget import allocate_checkpoint, parse_budget
    from .eval.sweep import calibration_ids

    parse_budget(args.budget)  # fail before loading anything
    if not (Path(args.checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"{args.checkpoint}: not a checkpoint directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    calib = calibration_ids(tok, Path(args.calib), args.calib_samples, args.calib_len, args.seed)
    result = allocate_checkpoint(args.checkpoint, calib, args.budget, args.gain_measure,
                                 progress=not args.no_progress)
    ks = result["k"]
    print(f"{args.checkpoint}: k map of {len(ks)} linears for budget {args.budget} "
          f"({result['budget_bytes'] / 1024:.1f} KiB/token; allocated "
          f"{result['fetched_bytes_per_token'] / 1024:.1f} KiB/token); estimated gain "
          f"{result['estimated_gain']:.4g} vs uniform {result['uniform_estimated_gain']:.4g}")
    by_proj: dict[str, list[int]] = {}
    for name, k in ks.items():
        by_proj.setdefault(name.rsplit(".", 1)[-1], []).append(k)
    for proj, values in by_proj.items():
        print(f"  {proj:10s} k min {min(values)}, mean {sum(values) / len(values):.1f}, "
              f"max {max(values)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .eval.report import write_report

    written = write_report([Path(p) for p in args.results], Path(args.out))
    for what, path in written.items():
        print(f"{what}: {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Measure, choose k per target, write the config, print the choice."""
    from .tune import (_parse_target, default_config_path, measure, parse_weights,
                       summary_table, tune, write_config)

    targets = [_parse_target(t) for t in args.targets.split(",") if t]
    weights = parse_weights(args.weights)
    if unknown := set(weights) - {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj"}:
        raise ValueError(f"--weights names unknown projections {sorted(unknown)}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    try:
        budgets = [int(b) for b in args.sm_budgets.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--sm-budgets must be comma-separated integers, got "
                         f"{args.sm_budgets!r}") from None
    measurement = measure(args.device, args.bits, args.group_size, args.residual_bits,
                          args.shapes, sm_budgets=budgets or [0], iters=args.iters or None,
                          progress=not args.no_progress)
    config = tune(measurement, targets, weights)
    path = write_config(config, out or default_config_path(config), overwrite=args.overwrite)
    meta = config["meta"]
    print(f"{meta['device']} | torch {meta['torch']} | commit {meta['commit']} | "
          f"W{args.bits} g{args.group_size}, residual {args.residual_bits}-bit, {args.shapes}")
    print(summary_table(config))
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qdec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="compensate one real layer of the embedded model")
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("quantize", help="quantize a model, write a QDEC checkpoint")
    p.add_argument("--model", default=None,
                   help="GGUF file or HF model directory (default: embedded SmolLM2-135M)")
    p.add_argument("--method", choices=["rtn", "awq", "gptq"], default="awq")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order")
    p.add_argument("--residual-bits", type=int, default=4, help="0 for no residual store")
    p.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("generate", help="generate from a QDEC checkpoint with/without QDEC")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--k", type=float, default=0.02, help="fraction of input channels")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--tune-config", default=None,
                   help="k per projection type from a qdec tune config (overrides --k)")
    p.add_argument("--tune-target", default=None,
                   help="slowdown target in the config, e.g. 2.5%% (default: the smallest)")
    p.set_defaults(func=cmd_generate)

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
    p.add_argument("--policies", default="dynamic,static,random,oracle",
                   help="selection policies of the k sweep ('' skips the sweep)")
    p.add_argument("--residual-bits", type=int, default=4)
    p.add_argument("--ranks", default="",
                   help="matched-cost comparison (none / low-rank / QDEC / hybrid) at these "
                        "low-rank budgets, e.g. 8,32 (default: no comparison)")
    p.add_argument("--cost-fractions", default="0.02,0.05",
                   help="fetched-channel budgets of the matched-cost comparison")
    p.add_argument("--lowrank-methods", default="lorc,lqer,aser",
                   help="static low-rank baselines of the comparison")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--tune-config", default=None,
                   help="also evaluate k per projection type from this qdec tune config")
    p.add_argument("--tune-targets", default="",
                   help="targets of the config to evaluate, e.g. 2.5%%,5%% (default: all)")
    p.add_argument("--budget", default="",
                   help="fetch budgets, e.g. 1%%,2%%,5%% (bytes of that uniform fraction) or "
                        "40000B (bytes per token): uniform vs allocated k per linear at equal "
                        "bytes (default: not run)")
    p.add_argument("--gain-measure", default="fisher", choices=["fisher", "fisher_full", "output"],
                   help="error measure of the allocation's gain curves (qdec.budget)")
    p.add_argument("--budget-calib-windows", type=int, default=2,
                   help="windows of the calibration text also scored at each budget")
    p.add_argument("--out", default="results/eval.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tune", help="measure the GEMV and compensation cost on this device and "
                                    "choose k per projection for target slowdowns")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--targets", default="2.5%,5%,10%",
                   help="allowed slowdowns of the decode step's linears (summed GEMVs)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--residual-bits", type=int, default=4)
    p.add_argument("--shapes", default="llama3-8b",
                   help="projection shapes to time: llama3-8b or smollm2-135m")
    p.add_argument("--iters", type=int, default=0, help="timed calls per point (0: default)")
    p.add_argument("--sm-budgets", default="0,4,8,16",
                   help="thread-block caps of the compensation kernel to time at each k "
                        "(0 = automatic); the fastest per k is kept")
    p.add_argument("--weights", default="",
                   help="value of a channel per projection, e.g. down_proj=2,k_proj=2,v_proj=0 "
                        "(default 1 each; 0 = never compensate)")
    p.add_argument("--out", default=None,
                   help="config file (default configs/<device>_<shapes>_w<b>g<g>r<rb>.json)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("allocate", help="choose k per linear for a fetch budget from "
                                        "calibration text; store the k map in the checkpoint")
    p.add_argument("checkpoint", help="QDEC checkpoint directory (with tokenizer)")
    p.add_argument("--budget", required=True,
                   help="2%% (the bytes of 2%% uniform) or 40000B (bytes per token)")
    p.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt",
                   help="calibration text (never the evaluation text)")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gain-measure", default="fisher", choices=["fisher", "fisher_full", "output"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("report", help="tables and plots from qdec eval JSON files, merged")
    p.add_argument("results", nargs="+", help="JSON files written by qdec eval")
    p.add_argument("--out", required=True,
                   help="output prefix: writes PREFIX.md, PREFIX.png, PREFIX_costs.png")
    p.set_defaults(func=cmd_report)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"qdec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
