"""``qdec eval``: perplexity of the reference, each quantized variant, and each
variant with dynamic compensation at several k under every selection policy.

Semantics are decode-faithful: every token of a window is compensated with its
own channels, exactly as if it were a decode step (the batched pass equals a
token-by-token loop; tests/python/test_decode_faithful.py). The per-token
selection is computed in one batched pass per window with the dense
simulation path of :class:`qdec.nn.QDECLinear` (two GEMMs per linear), which
is what makes a full WikiText-2 pass feasible on a CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import time
from pathlib import Path

import torch

from ..benchmarking import device_name, git_commit
from ..formats.safetensors_io import write_json_atomic
from ..patch import configure, patch, set_static_rankings, static_channels_from_calibration

DEFAULT_TEXT = "../shared/data/wikitext-2-raw/wiki.test.raw"
DEFAULT_CALIB = "../shared/data/wikitext-2/valid.txt"


@dataclasses.dataclass
class Variant:
    """A base quantization: method, bits, group size, symmetric grid."""

    method: str
    bits: int
    group_size: int
    symmetric: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """``method:bits:group[:sym]``, e.g. ``awq:3:128`` or ``rtn:2:64:sym``."""
        parts = spec.split(":")
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in ("sym", "asym")):
            raise ValueError(f"variant must look like method:bits:group[:sym|asym], got {spec!r}")
        return cls(parts[0], int(parts[1]), int(parts[2]), len(parts) == 4 and parts[3] == "sym")

    @property
    def label(self) -> str:
        g = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.method.upper()} W{self.bits} {g}{' sym' if self.symmetric else ''}"


@dataclasses.dataclass
class EvalConfig:
    text: Path = Path(DEFAULT_TEXT)
    calib_text: Path = Path(DEFAULT_CALIB)
    model: Path | None = None  # GGUF file; None = the embedded SmolLM2-135M
    seq_len: int = 2048
    max_windows: int | None = None  # None = the whole text
    variants: list[Variant] = dataclasses.field(default_factory=lambda: [
        Variant("rtn", 3, 128), Variant("awq", 3, 128), Variant("awq", 2, 64)])
    fractions: list[float] = dataclasses.field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1])
    policies: list[str] = dataclasses.field(
        default_factory=lambda: ["dynamic", "static", "random", "oracle"])
    residual_bits: int = 4
    calib_samples: int = 16
    calib_len: int = 512
    seed: int = 0
    progress: bool = True
    # Matched-cost comparison (qdec.eval.costs); no ranks = not run.
    ranks: list[int] = dataclasses.field(default_factory=list)
    cost_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.02, 0.05])
    lowrank_methods: list[str] = dataclasses.field(
        default_factory=lambda: ["lorc", "lqer", "aser"])
    # k per projection type from a ``qdec tune`` config, at each of these targets
    # (None = no tuned runs; empty targets = every target in the file).
    tune_config: Path | None = None
    tune_targets: list[str] = dataclasses.field(default_factory=list)
    # Fetch budgets (qdec.budget.parse_budget: "2%" = the bytes of 2 % uniform,
    # "40000B" = bytes per token): uniform vs allocated k at equal bytes, dynamic
    # policy, the allocation measured on the calibration windows only. Empty = not run.
    budgets: list[str] = dataclasses.field(default_factory=list)
    gain_measure: str = "fisher"
    # Windows of the calibration text also scored at each budget (does the
    # calibration-only choice transfer to the evaluation text?); 0 = none.
    budget_calib_windows: int = 2
    # Also score the candidate k maps not chosen on the evaluation text (runs
    # with allocation "candidate"): does the calibration ranking transfer?
    budget_score_candidates: bool = False


def calibration_ids(tokenizer, path: Path, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` tokens from a calibration text."""
    from .perplexity import load_text

    ids = tokenizer(load_text(path), return_tensors="pt").input_ids[0]
    if ids.numel() < seq_len + 1:
        raise ValueError(f"{path}: {ids.numel()} tokens, fewer than one calibration window "
                         f"of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def environment() -> dict:
    """What a result must be read with: the CPU it ran on, threads, versions, commit."""
    return {"device": device_name("cpu"), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(), "commit": git_commit()}


def write_json(obj: dict, path: Path) -> None:
    """Write ``obj`` as JSON atomically (temp file in the same directory, then
    rename), creating the directory and replacing an earlier result."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(obj, path, overwrite=True)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically (temp file beside it, then
    rename), creating the directory, and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def gap_closed(ref: float, quant: float, compensated: float) -> float:
    """Fraction of the reference-to-quantized perplexity gap closed (1 = all)."""
    return (quant - compensated) / (quant - ref) if quant != ref else float("nan")


@torch.no_grad()
def run_eval(cfg: EvalConfig, out: Path | None = None) -> dict:
    """Run the sweep; return (and write to ``out``) the JSON-ready results."""
    from ..models.llama import load_gguf_llama
    from ..quant.pipeline import quantize_model
    from .perplexity import load_text, perplexity

    from ..phases import phase

    t_start = time.time()
    with phase(f"loading {cfg.model or 'the embedded SmolLM2-135M'}", cfg.progress):
        model, tokenizer = load_gguf_llama(cfg.model)
    with phase(f"tokenizing {cfg.text}", cfg.progress):
        ids = tokenizer(load_text(cfg.text), return_tensors="pt").input_ids[0]
    with phase(f"calibration windows from {cfg.calib_text}", cfg.progress):
        calib = calibration_ids(tokenizer, cfg.calib_text, cfg.calib_samples, cfg.calib_len,
                                cfg.seed)

    def ppl(m, label: str) -> dict:
        r = perplexity(m, ids, seq_len=cfg.seq_len, max_windows=cfg.max_windows,
                       progress=cfg.progress, desc=label)
        return {k: r[k] for k in ("ppl", "nll", "tokens", "windows", "seconds")}

    results: dict = {
        "config": {**{k: str(v) if isinstance(v, Path) else v
                      for k, v in dataclasses.asdict(cfg).items() if k != "variants"},
                   "variants": [v.label for v in cfg.variants]},
        "environment": environment(),
        "model": "SmolLM2-135M-Instruct (dequantized Q4_1 reference)" if cfg.model is None
        else str(cfg.model),
        "text_tokens": int(ids.numel()),
        "reference": ppl(model, "reference"),
        "variants": [],
    }
    ref_ppl = results["reference"]["ppl"]
    calib_windows = None  # the first windows of the calibration text, [n, seq_len]
    if cfg.budgets and cfg.budget_calib_windows:
        calib_text_ids = tokenizer(load_text(cfg.calib_text), return_tensors="pt").input_ids[0]
        n = min(cfg.budget_calib_windows, calib_text_ids.numel() // cfg.seq_len)
        calib_windows = calib_text_ids[:n * cfg.seq_len].view(n, cfg.seq_len)
        r = perplexity(model, calib_windows.reshape(-1), seq_len=cfg.seq_len,
                       progress=cfg.progress, desc="reference (calibration text)")
        results["calib_reference"] = {k: r[k] for k in ("ppl", "nll", "tokens", "windows",
                                                        "seconds")}
    for variant in cfg.variants:
        qmodel = copy.deepcopy(model)
        qres = quantize_model(qmodel, variant.method, variant.bits, variant.group_size,
                              symmetric=variant.symmetric, calib_ids=calib,
                              residual_bits=cfg.residual_bits, progress=cfg.progress)
        reference = None
        if cfg.ranks:  # the weights in the basis that was quantized (after AWQ scaling)
            from ..patch import decoder_linears

            reference = {name: m.weight.detach().float().clone()
                         for name, m in decoder_linears(qmodel)}
        patch(qmodel, qres.packed(), k=0)
        configure(qmodel, simulate_dense=True, compensate_prefill=True)
        if "static" in cfg.policies:
            # The quantization's propagated calibration run saw every linear's
            # input in this model at k = 0: rank from it rather than run the
            # calibration windows through the model again.
            if qres.input_abs_mean:
                set_static_rankings(qmodel, qres.input_abs_mean)
            else:
                static_channels_from_calibration(qmodel, calib)
        base = ppl(qmodel, variant.label)
        entry = {"variant": dataclasses.asdict(variant), "label": variant.label,
                 "quantize_seconds": round(qres.seconds, 1),
                 "layer_errors": qres.rel_errors(), "quantized": base, "compensated": []}
        for policy in cfg.policies:
            for frac in cfg.fractions:
                configure(qmodel, k=float(frac), policy=policy)
                for _, layer in _layers(qmodel):
                    layer.reset_rng(cfg.seed)
                r = ppl(qmodel, f"{variant.label} {policy} k={frac:.0%}")
                r.update(policy=policy, fraction=frac,
                         gap_closed=gap_closed(ref_ppl, base["ppl"], r["ppl"]))
                entry["compensated"].append(r)
        if cfg.budgets:
            entry["budget"] = _budget_runs(qmodel, cfg, calib, ppl, calib_windows, results,
                                           base["ppl"], out, variant.label)
        if cfg.tune_config is not None:
            entry["tuned"] = _tuned_runs(qmodel, cfg, lambda m, label: ppl(
                m, f"{variant.label} {label}"), ref_ppl, base["ppl"])
        if cfg.ranks:
            from .costs import CostConfig, compare_costs

            cost_cfg = CostConfig(ranks=list(cfg.ranks), fractions=list(cfg.cost_fractions),
                                  lowrank_methods=list(cfg.lowrank_methods),
                                  residual_bits=cfg.residual_bits)
            entry["cost_comparison"] = compare_costs(
                qmodel, reference, calib, lambda m, label: ppl(m, f"{variant.label} {label}"),
                cost_cfg, progress=cfg.progress)
            for point in entry["cost_comparison"]["points"]:
                point["gap_closed"] = gap_closed(ref_ppl, base["ppl"], point["ppl"])
            del reference
        results["variants"].append(entry)
        del qmodel
        if out is not None:  # keep partial results of long runs
            write_json({**results, "wall_seconds": time.time() - t_start}, out)
    results["wall_seconds"] = round(time.time() - t_start, 1)
    if out is not None:
        write_json(results, out)
    return results


def _budget_runs(qmodel, cfg: EvalConfig, calib: torch.Tensor, score, calib_windows,
                 results: dict, base_ppl: float, out: Path | None, label: str) -> dict:
    """Uniform vs allocated k at each of ``cfg.budgets`` (equal bytes fetched
    per token, dynamic policy). Everything the choice uses is calibration
    text: gain curves and group scales on the calibration windows ``calib``,
    the candidate k maps scored on ``calib_windows`` (the first
    ``cfg.budget_calib_windows`` windows of the calibration text; ``calib``
    when there are none), the lowest calibration NLL kept, uniform on ties
    (:func:`qdec.budget.plan_budgets`). Then uniform and the chosen map are
    scored on the evaluation text (once when uniform is chosen), and with
    ``cfg.budget_score_candidates`` the other candidates too (allocation
    ``"candidate"``; they never steer the choice). The chosen
    k maps are also written as a ``qdec tune`` config next to ``out``
    (``<stem>_<variant>_kmaps.json``) for ``qdec generate``/``qdec_infer``
    ``--tune-config``."""
    from .. import budget as qb

    if cfg.gain_measure not in qb.GAIN_MEASURES:
        raise ValueError(f"gain measure must be one of {qb.GAIN_MEASURES}, got "
                         f"{cfg.gain_measure!r}")
    t0 = time.time()
    all_curves = qb.measure_gain_curves(qmodel, calib, progress=cfg.progress)
    curves = all_curves[cfg.gain_measure]
    curve_seconds = time.time() - t0
    select = calib_windows if calib_windows is not None else calib
    plan = qb.plan_budgets(qmodel, curves, calib, select, cfg.budgets, progress=cfg.progress)
    ref_ppl = results["reference"]["ppl"]
    calib_ref = results.get("calib_reference")
    calib_base = None
    if calib_windows is not None:  # the gap closed on calibration text needs k = 0 there
        nll = qb.calibration_nll(qmodel, calib_windows, {})
        calib_base = {"ppl": math.exp(nll), "nll": nll, "windows": int(calib_windows.shape[0])}
    section = {"gain_measure": cfg.gain_measure, "curve_seconds": round(curve_seconds, 1),
               "plan_seconds": round(time.time() - t0 - curve_seconds, 1),
               "selection_windows": "calibration text" if calib_windows is not None
               else "calibration samples",
               "calib_quantized": calib_base, "group_scales": plan["group_scales"],
               "runs": [], "candidates": {},
               "curves": {m: {n: c.to_json() for n, c in cs.items()}
                          for m, cs in all_curves.items()}}
    k_maps = {}
    for spec, p in plan["budgets"].items():
        section["candidates"][spec] = {
            "chosen": p["chosen"],
            **{name: {key: v for key, v in c.items() if key != "k"}
               for name, c in p["candidates"].items()}}
        if qb.parse_budget(spec)[0] == "fraction":
            k_maps[spec] = p["k"]
        uniform = None
        scored = [("uniform", "uniform"), ("allocated", p["chosen"])]
        if cfg.budget_score_candidates:
            scored += [("candidate", name) for name in p["candidates"]
                       if name not in ("uniform", p["chosen"])]
        for kind, choice in scored:
            k_map = p["candidates"][choice]["k"]
            if kind == "allocated" and choice == "uniform":
                r = dict(uniform)  # the same map: not scored twice
            else:
                configure(qmodel, k=0, policy="dynamic")
                configure(qmodel, k=k_map)
                r = score(qmodel, f"{choice if kind == 'candidate' else kind} {spec}")
            calib_nll = p["candidates"][choice]["calib_nll"]
            r.update(budget=spec, budget_bytes=p["budget_bytes"], allocation=kind, choice=choice,
                     fetched_bytes_per_token=qb.fetched_bytes(k_map, curves),
                     estimated_gain=qb.estimated_gain(k_map, curves),
                     gap_closed=gap_closed(ref_ppl, base_ppl, r["ppl"]), k=k_map,
                     calib_nll=calib_nll, calib_ppl=math.exp(calib_nll))
            if calib_base is not None:
                r["calib_gap_closed"] = gap_closed(calib_ref["ppl"], calib_base["ppl"],
                                                   r["calib_ppl"])
            if kind == "uniform":
                uniform = r
            section["runs"].append(r)
    configure(qmodel, k=0)
    if out is not None and k_maps:
        slug = "".join(ch if ch.isalnum() else "_" for ch in label.lower())
        path = out.with_name(f"{out.stem}_{slug}_kmaps.json")
        write_json(qb.tune_config_for(k_maps, curves, {
            "variant": label, "gain_measure": cfg.gain_measure,
            "chosen": {spec: p["chosen"] for spec, p in plan["budgets"].items()}}), path)
        section["tune_config"] = str(path)
    return section


def _tuned_runs(qmodel, cfg: EvalConfig, score, ref_ppl: float, base_ppl: float) -> list[dict]:
    """Perplexity with k per projection type read from ``cfg.tune_config``,
    one run per target (dynamic selection)."""
    from ..tune import load_targets

    runs = []
    for target, fractions in load_targets(cfg.tune_config, cfg.tune_targets).items():
        configure(qmodel, k=0, policy="dynamic")
        configure(qmodel, k=fractions)
        for _, layer in _layers(qmodel):
            layer.reset_rng(cfg.seed)
        r = score(qmodel, f"tuned {target}")
        r.update(target=target, fractions=fractions,
                 fetched_bytes_per_token=sum(m.fetched_bytes_per_token for _, m in _layers(qmodel)),
                 gap_closed=gap_closed(ref_ppl, base_ppl, r["ppl"]))
        runs.append(r)
    configure(qmodel, k=0)
    return runs


def _layers(model):
    from ..patch import qdec_layers

    return qdec_layers(model)


def plot_results(results: dict, path: Path) -> None:
    """Perplexity against the fraction of channels fetched, one panel per
    variant, one line per selection policy; the reference and the plain
    quantized model as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    fig, axes = plt.subplots(1, max(1, len(variants)), figsize=(5 * max(1, len(variants)), 4),
                             squeeze=False)
    ref = results["reference"]["ppl"]
    for ax, v in zip(axes[0], variants):
        policies = sorted({c["policy"] for c in v["compensated"]})
        for policy in policies:
            pts = sorted((c["fraction"], c["ppl"]) for c in v["compensated"]
                         if c["policy"] == policy)
            ax.plot([0] + [p[0] * 100 for p in pts], [v["quantized"]["ppl"]] + [p[1] for p in pts],
                    marker="o", label=policy)
        ax.axhline(ref, color="k", ls="--", lw=1, label="reference")
        ax.set_title(v["label"])
        ax.set_xlabel("input channels compensated per token (%)")
        ax.set_ylabel("WikiText-2 perplexity")
        if v["quantized"]["ppl"] > 20 * ref:
            # 2-bit models start orders of magnitude above the reference: on a
            # linear axis every compensated point would sit on the floor.
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
