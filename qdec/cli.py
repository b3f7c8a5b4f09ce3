"""The ``qdec`` command line: ``demo``, ``quantize``, ``eval``, ``report``, ``generate``,
``tune``, ``residual``, ``allocate``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import cli_args as A
from .phases import phase

#: ``qdec generate``'s k when --k is not given (a fraction: 2 % of input channels).
GENERATE_DEFAULT_K = 0.02

DESCRIPTION = ("QDEC: quantize a model, evaluate perplexity with dynamic error compensation, "
               "generate, tune k per projection. Every argument is checked before a model is "
               "loaded. --k everywhere: an integer (16) is a count of input channels, a number "
               "with a decimal point (0.05, 1.0) a fraction of them.")


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

    A.check_model_path("--model", args.model)
    A.check_text_files(None, args.calib)
    out = A.check_output_dir("--out", args.out, args.overwrite)
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
        with phase(f"calibration windows from {args.calib}"):
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

        with phase(f"loading {args.model or 'the embedded SmolLM2-135M'}"):
            model, tok = load_model(args.model)
        with phase(f"calibration windows from {args.calib}"):
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
    if _foreign_format(args.checkpoint):
        return _generate_foreign(args)
    import torch

    from transformers import AutoTokenizer

    from .patch import configure, load_patched_checkpoint, qdec_layers

    k_arg = A.check_checkpoint_k(args.checkpoint, args.k, GENERATE_DEFAULT_K)
    if args.tune_config:  # fail now, not after loading the model
        from .tune import load_config

        load_config(args.tune_config, args.tune_target)
    with phase(f"loading {args.checkpoint}"):
        model = load_patched_checkpoint(args.checkpoint)
    # the checkpoint's own k (e.g. a per-linear k map from `qdec allocate`): it
    # runs unless --k is given
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
    elif args.k is None and any(stored.values()):
        settings.append(stored)
    elif k_arg:
        settings.append(k_arg)
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
        elif isinstance(k, dict):
            what = ", ".join(f"{n} {f:.2%}" for n, f in k.items()) + " of input channels"
        else:
            what = A.describe_k(k)
        print(f"--- k = {what}: {new} tokens in {dt:.2f} s "
              f"({new / dt:.1f} tokens/s)")
        print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.model and _foreign_format(args.model):
        return _eval_foreign(args)
    from .eval.perplexity import keep_freed_memory
    from .eval.sweep import EvalConfig, plot_results, run_eval

    A.check_model_path("--model", args.model)
    A.check_text_files(args.text, args.calib)
    A.check_output_file("--out", args.out)
    cfg = EvalConfig(
        text=Path(args.text), calib_text=Path(args.calib), model=args.model,
        seq_len=args.seq_len, max_windows=args.max_windows, variants=args.variants,
        fractions=args.fractions, policies=args.policies,
        residual_bits=args.residual_bits, calib_samples=args.calib_samples,
        calib_len=args.calib_len, progress=not args.no_progress,
        ranks=args.ranks, cost_fractions=args.cost_fractions,
        lowrank_methods=args.lowrank_methods,
        tune_config=Path(args.tune_config) if args.tune_config else None,
        tune_targets=args.tune_targets,
        budgets=args.budget, gain_measure=args.gain_measure,
        budget_calib_windows=args.budget_calib_windows,
        budget_score_candidates=args.budget_score_candidates)
    if cfg.budgets:  # fail now, not after the reference pass
        from .budget import parse_budget

        for b in cfg.budgets:
            parse_budget(b)
    if cfg.tune_config is not None:  # fail now, not after the reference pass
        from .tune import load_targets

        load_targets(cfg.tune_config, cfg.tune_targets)
    out = Path(args.out)
    keep_freed_memory()
    results = run_eval(cfg, out)
    if cfg.policies and cfg.fractions:
        plot_results(results, out.with_suffix(".png"))
    ref = results["reference"]["ppl"]
    scored = results["reference"]
    windows = f"{scored['windows']} window{'s' if scored['windows'] != 1 else ''}"
    print(f"reference perplexity {ref:.3f} ({scored['tokens']} tokens scored in {windows} of "
          f"{cfg.seq_len}; the text has {results['text_tokens']})")
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

    from .budget import allocate_checkpoint
    from .eval.sweep import calibration_ids

    A.check_text_files(None, args.calib)  # fail before loading anything

    if not (Path(args.checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"{args.checkpoint}: not a checkpoint directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    calib = calibration_ids(tok, Path(args.calib), args.calib_samples, args.calib_len, args.seed)
    result = allocate_checkpoint(args.checkpoint, calib, args.budget, args.gain_measure,
                                 progress=not args.no_progress)
    ks = result["k"]
    print(f"{args.checkpoint}: k map of {len(ks)} linears for budget {args.budget} "
          f"({result['budget_bytes'] / 1024:.1f} KiB/token; allocated "
          f"{result['fetched_bytes_per_token'] / 1024:.1f} KiB/token); chosen on calibration "
          f"loss: {result['chosen']} (" + ", ".join(
              f"{name} {c['calib_nll']:.4f}" for name, c in result["candidates"].items())
          + " nats/token)")
    by_proj: dict[str, list[int]] = {}
    for name, k in ks.items():
        by_proj.setdefault(name.rsplit(".", 1)[-1], []).append(k)
    for proj, values in by_proj.items():
        print(f"  {proj:10s} k min {min(values)}, mean {sum(values) / len(values):.1f}, "
              f"max {max(values)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .eval.report import write_report

    for path in args.results:
        A.check_input_file("results", path)
    A.check_output_file("--out", args.out)
    written = write_report([Path(p) for p in args.results], Path(args.out))
    for what, path in written.items():
        print(f"{what}: {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Measure, choose k per target, write the config, print the choice."""
    from .tune import (_parse_target, default_config_path, measure, parse_weights,
                       summary_table, tune, write_config)

    targets = [_parse_target(t) for t in args.targets]
    weights = parse_weights(args.weights)
    if unknown := set(weights) - {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj"}:
        raise ValueError(f"--weights names unknown projections {sorted(unknown)}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if out is not None:
        A.check_output_file("--out", out)
    budgets = args.sm_budgets
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


def _foreign_format(path: str) -> str | None:
    """The tool that made ``path`` (AutoAWQ / GPTQ / compressed-tensors), if any."""
    from .formats.foreign import detect_quantized_format

    fmt = detect_quantized_format(path) if Path(path).is_dir() else None
    return {"autoawq": "AutoAWQ", "gptq": "GPTQ"}.get(fmt, fmt)


def _generate_foreign(args: argparse.Namespace) -> int:
    """``qdec generate`` on an AutoAWQ / GPTQ / compressed-tensors directory: converted
    to a temporary QDEC checkpoint (weights bit for bit, no residual store), run at
    k = 0 only."""
    import tempfile

    from .formats.foreign import convert_without_residual

    fmt = _foreign_format(args.checkpoint)
    if args.k or args.tune_config:
        # as check_checkpoint_k refuses --k > 0 on a QDEC checkpoint without a
        # residual store (and qdec_infer on this directory): not silently dropped
        raise ValueError(f"--k/--tune-config ask for k > 0, but {args.checkpoint} is a {fmt} "
                         f"checkpoint with no residual store, so only k = 0 runs; add one with "
                         f"qdec residual --quantized {args.checkpoint} --reference <original HF "
                         f"model dir> --out <dir>")
    print(f"{args.checkpoint}: {fmt} checkpoint, no residual store; running the "
          f"quantized model alone (k = 0). To compensate, add a residual store from the "
          f"original weights: qdec residual --quantized {args.checkpoint} --reference "
          f"<original HF model dir> --out <dir>, then qdec generate <dir>", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="qdec-generate-") as tmp:
        converted = Path(tmp) / "qdec"
        convert_without_residual(args.checkpoint, converted)
        return cmd_generate(argparse.Namespace(**{**vars(args), "checkpoint": str(converted),
                                                  "k": 0.0, "tune_config": None}))


def _eval_foreign(args: argparse.Namespace) -> int:
    """``qdec eval --model DIR`` on an AutoAWQ / GPTQ / compressed-tensors directory:
    the perplexity of the quantized model itself (k = 0; no reference, no variants),
    written as JSON to ``--out``."""
    import tempfile

    from transformers import AutoTokenizer

    from .eval.perplexity import load_text, perplexity
    from .eval.sweep import environment, write_json
    from .formats.foreign import convert_without_residual
    from .patch import load_patched_checkpoint

    fmt = _foreign_format(args.model)
    print(f"{args.model}: {fmt} checkpoint, no residual store; scoring the "
          f"quantized model alone (k = 0). To evaluate QDEC on it, add a residual store "
          f"from the original weights: qdec residual --quantized {args.model} --reference "
          f"<original HF model dir> --out <dir>", file=sys.stderr)
    text = Path(args.text)
    if not text.is_file():
        raise FileNotFoundError(f"--text {text}: text file not found")
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    ids = tokenizer(load_text(text), return_tensors="pt").input_ids[0]
    with tempfile.TemporaryDirectory(prefix="qdec-eval-") as tmp:
        converted = Path(tmp) / "qdec"
        convert_without_residual(args.model, converted)
        model = load_patched_checkpoint(str(converted))
        r = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.max_windows,
                       progress=not args.no_progress, desc=f"{fmt} k=0")
    result = {"model": str(args.model), "format": fmt, "environment": environment(),
              "text": str(text), "quantized": {k: r[k] for k in
                                               ("ppl", "nll", "tokens", "windows", "seconds")}}
    write_json(result, Path(args.out))
    print(f"{fmt} quantized perplexity {r['ppl']:.3f} ({r['tokens']} tokens scored); "
          f"results: {args.out}")
    return 0


def cmd_residual(args: argparse.Namespace) -> int:
    """Add a residual store to a quantized checkpoint made by another tool: the
    quantized weights are kept bit for bit, R = W - W_hat from the original model."""
    from tqdm import tqdm

    from .formats.foreign import residual_checkpoint

    # Checked before any weight is read, naming the flag.
    for flag, path in (("--quantized", args.quantized), ("--reference", args.reference)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path}: no such directory")
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")
    out = residual_checkpoint(
        args.quantized, args.reference, args.out, residual_bits=args.residual_bits,
        overwrite=args.overwrite,
        progress=lambda names: tqdm(names, desc="residual", unit="layer",
                                    disable=args.no_progress))
    print(f"wrote {out}")
    return 0


def _add_residual_parser(sub) -> None:
    p = sub.add_parser(
        "residual",
        help="residual store for an AutoAWQ, GPTQ or compressed-tensors checkpoint, from "
             "the original model; writes a QDEC checkpoint")
    p.add_argument("--quantized", required=True,
                   help="AutoAWQ (gemm), GPTQ or compressed-tensors (pack-quantized) directory")
    p.add_argument("--reference", required=True,
                   help="the original (unquantized) model: Hugging Face directory with "
                        "safetensors, in the quantized model's basis (see README)")
    p.add_argument("--out", required=True, help="output QDEC checkpoint directory")
    p.add_argument("--residual-bits", type=int, default=4, choices=range(2, 9),
                   metavar="{2..8}", help="bits per residual code (default: 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_residual)


def add_calibration_args(p: argparse.ArgumentParser, samples: int) -> None:
    """--calib, --calib-samples, --calib-len, --seed of a command that draws
    calibration windows (quantize, allocate)."""
    p.add_argument("--calib", default=str(A.DEFAULT_CALIB),
                   help="calibration text, never the evaluation text (default: the WikiText-2 "
                        "validation excerpt shipped with qdec; the full file is "
                        "wikitext-2/valid.txt)")
    p.add_argument("--calib-samples", type=A.int_at_least(1), default=samples,
                   help="calibration windows")
    p.add_argument("--calib-len", type=A.int_at_least(1), default=512,
                   help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")


def main(argv: list[str] | None = None) -> int:
    from .tune import SHAPE_PRESETS

    parser = argparse.ArgumentParser(prog="qdec", description=DESCRIPTION,
                                     formatter_class=A.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="compensate one real layer of the embedded model",
                       formatter_class=A.HelpFormatter)
    p.add_argument("--layer", type=A.int_at_least(0), default=10, help="decoder layer index")
    p.add_argument("--bits", type=A.weight_bits, default=3, help="RTN bits (2..8)")
    p.add_argument("--group-size", type=A.group_size, default=64,
                   help="-1 (one group per row) or a multiple of 32")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("quantize", help="quantize a model, write a QDEC checkpoint",
                       formatter_class=A.HelpFormatter)
    p.add_argument("--model", default=None,
                   help="GGUF file or HF model directory (default: embedded SmolLM2-135M)")
    p.add_argument("--method", choices=["rtn", "awq", "gptq"], default="awq", help="quantizer")
    p.add_argument("--bits", type=A.weight_bits, default=3, help="weight bits (2..8)")
    p.add_argument("--group-size", type=A.group_size, default=128,
                   help="-1 (one group per row) or a multiple of 32")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero points)")
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order")
    p.add_argument("--residual-bits", type=A.residual_bits(allow_none=True), default=4,
                   help="bits of the residual store, 2..8; 0 for none")
    add_calibration_args(p, samples=16)
    p.add_argument("--out", required=True,
                   help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("generate", help="generate from a QDEC checkpoint with/without QDEC",
                       formatter_class=A.HelpFormatter)
    p.add_argument("checkpoint", help="QDEC checkpoint directory (written by qdec quantize)")
    p.add_argument("--prompt", default="What is the capital of France?",
                   help="user message (the chat template is applied)")
    p.add_argument("--max-new-tokens", type=A.int_at_least(1), default=48,
                   help="tokens to generate")
    p.add_argument("--k", type=A.k_value, default=None,
                   help=f"channels compensated per token in every quantized linear: {A.K_RULE} "
                        f"(default: {GENERATE_DEFAULT_K}; 0 on a checkpoint without a residual "
                        f"store)")
    p.add_argument("--temperature", type=A.nonnegative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=A.int_at_least(0), default=0,
                   help="sample among the N most likely tokens (0 = all)")
    p.add_argument("--tune-config", default=None,
                   help="k per projection type from a qdec tune config (overrides --k; "
                        "default: none)")
    p.add_argument("--tune-target", default=None,
                   help="slowdown target in the config, e.g. 2.5%% (default: the smallest)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity sweep: reference, quantized, QDEC x policies",
                       formatter_class=A.HelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: embedded SmolLM2-135M)")
    p.add_argument("--text", default=str(A.DEFAULT_TEXT),
                   help="text to score (default: the WikiText-2 test excerpt shipped with qdec, "
                        "~20k tokens; the full file is wikitext-2-raw/wiki.test.raw)")
    p.add_argument("--calib", default=str(A.DEFAULT_CALIB),
                   help="calibration text (default: the WikiText-2 validation excerpt shipped "
                        "with qdec; the full file is wikitext-2/valid.txt)")
    p.add_argument("--seq-len", type=A.int_at_least(2), default=2048, help="tokens per window")
    p.add_argument("--max-windows", type=A.int_at_least(1), default=None,
                   help="evaluate only the first N windows (default: the whole text)")
    p.add_argument("--variants", type=A.variant_list, default="rtn:3:128,awq:3:128,awq:2:64",
                   help="comma-separated method:bits:group[:sym], method rtn, awq or gptq")
    p.add_argument("--fractions", type=A.fraction_list, default="0.01,0.02,0.05,0.1",
                   help="k of the sweep, as fractions of the input channels in [0, 1]")
    p.add_argument("--policies", type=A.policy_list, default="dynamic,static,random,oracle",
                   help="selection policies of the k sweep ('' skips the sweep)")
    p.add_argument("--residual-bits", type=A.residual_bits(allow_none=False), default=4,
                   help="bits of the residual store (2..8)")
    p.add_argument("--ranks", type=A.positive_int_list, default="",
                   help="matched-cost comparison (none / low-rank / QDEC / hybrid) at these "
                        "low-rank budgets, e.g. 8,32 (default: no comparison)")
    p.add_argument("--cost-fractions", type=A.fraction_list, default="0.02,0.05",
                   help="fetched-channel budgets of the matched-cost comparison")
    p.add_argument("--lowrank-methods", type=A.lowrank_method_list, default="lorc,lqer,aser",
                   help="static low-rank baselines of the comparison")
    p.add_argument("--calib-samples", type=A.int_at_least(1), default=16,
                   help="calibration windows")
    p.add_argument("--calib-len", type=A.int_at_least(1), default=512,
                   help="tokens per calibration window")
    p.add_argument("--tune-config", default=None,
                   help="also evaluate k per projection type from this qdec tune config "
                        "(default: none)")
    p.add_argument("--tune-targets", type=A.target_list, default="",
                   help="targets of the config to evaluate, e.g. 2.5%%,5%% (default: all)")
    p.add_argument("--budget", type=A.budget_list, default="",
                   help="fetch budgets, e.g. 1%%,2%%,5%% (bytes of that uniform fraction) or "
                        "40000B (bytes per token): uniform vs allocated k per linear at equal "
                        "bytes (default: not run)")
    p.add_argument("--gain-measure", default="fisher", choices=["fisher", "fisher_full", "output"],
                   help="error measure of the allocation's gain curves (qdec.budget)")
    p.add_argument("--budget-calib-windows", type=A.int_at_least(0), default=2,
                   help="windows of the calibration text also scored at each budget")
    p.add_argument("--budget-score-candidates", action="store_true",
                   help="also score every candidate k map (not only uniform and the chosen "
                        "one) on the evaluation text: shows whether the calibration ranking holds")
    p.add_argument("--out", default="results/eval.json",
                   help="results JSON (replaced if it exists); plots are written beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tune", help="measure the GEMV and compensation cost on this device and "
                                    "choose k per projection for target slowdowns",
                       formatter_class=A.HelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="device to time")
    p.add_argument("--targets", type=A.target_list, default="2.5%,5%,10%",
                   help="allowed slowdowns of the decode step's linears (summed GEMVs)")
    p.add_argument("--bits", type=A.weight_bits, default=3, help="weight bits (2..8)")
    p.add_argument("--group-size", type=A.group_size, default=128,
                   help="-1 (one group per row) or a multiple of 32")
    p.add_argument("--residual-bits", type=A.residual_bits(allow_none=False), default=4,
                   help="bits of the residual store (2..8)")
    p.add_argument("--shapes", default="llama3-8b", choices=sorted(SHAPE_PRESETS),
                   help="projection shapes to time: llama3-8b or smollm2-135m")
    p.add_argument("--iters", type=A.int_at_least(0), default=0,
                   help="timed calls per point (0: the built-in count)")
    p.add_argument("--sm-budgets", type=A.nonnegative_int_list, default="0,4,8,16",
                   help="thread-block caps of the compensation kernel to time at each k "
                        "(0 = automatic); the fastest per k is kept")
    p.add_argument("--weights", default="",
                   help="value of a channel per projection, e.g. down_proj=2,k_proj=2,v_proj=0 "
                        "(default 1 each; 0 = never compensate)")
    p.add_argument("--out", default=None,
                   help="config file (default configs/<device>_<shapes>_w<b>g<g>r<rb>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("allocate", help="choose k per linear for a fetch budget from "
                                        "calibration text; store the k map in the checkpoint",
                       formatter_class=A.HelpFormatter)
    p.add_argument("checkpoint", help="QDEC checkpoint directory (with tokenizer)")
    p.add_argument("--budget", type=A.budget_value, required=True,
                   help="2%% (the bytes of 2%% uniform) or 40000B (bytes per token)")
    add_calibration_args(p, samples=8)
    p.add_argument("--gain-measure", default="fisher", choices=["fisher", "fisher_full", "output"],
                   help="error measure of the gain curves (qdec.budget)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("report", help="tables and plots from qdec eval JSON files, merged",
                       formatter_class=A.HelpFormatter)
    p.add_argument("results", nargs="+", help="JSON files written by qdec eval")
    p.add_argument("--out", required=True,
                   help="output prefix: writes PREFIX.md, PREFIX.png, PREFIX_costs.png")
    p.set_defaults(func=cmd_report)

    _add_residual_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"qdec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
