"""Matched-cost comparison: no compensation, static low-rank (LoRC, L²QER,
ASER), dynamic compensation (QDEC) and the hybrid, each with what it costs.

Two costs matter at decode time and they are different resources:

* **GPU-resident extra bytes** (device memory beyond the packed weights): the
  low-rank factors ``r (N + K)`` values, stored in ``factor_dtype`` (fp16 as
  deployed), plus QDEC's float32 per-output residual scales;
* **bytes fetched over PCIe per token**: ``k`` packed rows of the host residual
  store per linear (:attr:`qdec.nn.QDECLinear.fetched_bytes_per_token`, the one
  definition used everywhere).

So the comparison is a grid: rank ``r`` in ``{0} ∪ ranks`` against fraction
``f`` in ``{0} ∪ fractions``. ``(0, 0)`` is the plain quantized model,
``(r, 0)`` low-rank only (every method in ``lowrank_methods``), ``(0, f)``
QDEC only, ``(r, f)`` the hybrid: an ASER term fitted to the Gram of the part
of the activations dynamic compensation leaves (``gram="masked"``, see
:mod:`qdec.lowrank`) plus a residual store rebuilt from ``E - L_A L_B``.
Reading the table at one rank compares methods at equal GPU bytes; at one
fraction, at equal fetched bytes.

Every perplexity is decode-faithful (each token compensated with its own
channels), as in the rest of ``qdec eval``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import ops
from ..lowrank import ActivationStats, LowRankTerm, lowrank_compensator, residual_after_lowrank
from ..patch import configure, qdec_layers
from ..quant.residual import quantize_residual

LOWRANK_METHODS = ("lorc", "lqer", "aser")


@dataclasses.dataclass
class CostConfig:
    """What :func:`compare_costs` sweeps.

    Attributes:
        ranks: low-rank budgets, as one rank for every linear (``r (N + K)``
            ``factor_dtype`` values each).
        fractions: dynamic-compensation budgets, as a fraction of each linear's
            input channels fetched per token.
        lowrank_methods: the static baselines run at every rank.
        hybrid_method: the low-rank method of the hybrid; ``"aser"`` is fitted
            to the masked Gram (what dynamic compensation leaves).
        damp: ASER's relative Cholesky damping.
        factor_dtype: storage dtype of the factors (what the GPU would hold).
        residual_bits: code width of the hybrid's rebuilt residual store.
    """

    ranks: list[int] = dataclasses.field(default_factory=lambda: [8, 32])
    fractions: list[float] = dataclasses.field(default_factory=lambda: [0.02, 0.05])
    lowrank_methods: list[str] = dataclasses.field(default_factory=lambda: list(LOWRANK_METHODS))
    hybrid_method: str = "aser"
    damp: float = 1e-2
    factor_dtype: torch.dtype = torch.float16
    residual_bits: int = 4

    def __post_init__(self) -> None:
        bad = [m for m in [*self.lowrank_methods, self.hybrid_method] if m not in LOWRANK_METHODS]
        if bad:
            raise ValueError(f"low-rank methods must be among {LOWRANK_METHODS}, got {bad}")
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive, got {self.ranks}")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1], got {self.fractions}")


# ------------------------------------------------------------------- costs
def packed_weight_bytes(model: nn.Module) -> int:
    """Device bytes of every QDECLinear's packed weight, scales and zeros."""
    return sum(t.numel() * t.element_size() for _, m in qdec_layers(model)
               for t in (m.qweight, m.scales, m.zeros) if t is not None)


def model_costs(model: nn.Module) -> dict[str, int]:
    """Summed per-layer costs at the layers' current settings:
    ``gpu_extra_bytes`` (:attr:`QDECLinear.gpu_extra_bytes`),
    ``lowrank_bytes`` (the factors alone) and ``fetched_bytes_per_token``."""
    layers = [m for _, m in qdec_layers(model)]
    return {
        "gpu_extra_bytes": sum(m.gpu_extra_bytes for m in layers),
        "lowrank_bytes": sum(m.lowrank.gpu_bytes for m in layers if m.lowrank is not None),
        "fetched_bytes_per_token": sum(m.fetched_bytes_per_token for m in layers),
    }


# --------------------------------------------------------------- statistics
@torch.no_grad()
def collect_stats(model: nn.Module, calib_ids: Tensor, masked_fraction: float | None = None,
                  progress: bool = False) -> dict[str, ActivationStats]:
    """Calibration statistics of every QDECLinear's input (in the packed
    weight's column order), from the model run without compensation.

    ``masked_fraction=None`` keeps the full Gram (LoRC, L²QER, ASER);
    a fraction ``f`` keeps only the masked Gram of each layer's
    ``round(f K)`` per-token top-|x| channels (the hybrid's ASER)."""
    stats: dict[str, ActivationStats] = {}
    hooks = []
    for name, layer in qdec_layers(model):
        K = layer.in_features
        masked = 0 if masked_fraction is None else round(masked_fraction * K)
        stats[name] = ActivationStats(K, masked_topk=masked, keep_gram=masked_fraction is None)

        def hook(mod, args, s=stats[name]):
            s.add_batch(mod.layer_input(args[0]))
        hooks.append(layer.register_forward_pre_hook(hook))
    saved = {name: layer.k for name, layer in qdec_layers(model)}
    try:
        configure(model, k=0)
        for row in tqdm(calib_ids, desc="calibration statistics", disable=not progress,
                        leave=False):
            model(row.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
        for name, layer in qdec_layers(model):
            layer.k = saved[name]
    return stats


def quantization_errors(model: nn.Module, reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """``E = W_ref - W_hat`` (float32 ``[N, K]``, packed column order) per layer.

    ``reference`` maps each QDECLinear's name to its full-precision weight in
    the basis that was quantized (after AWQ scaling)."""
    errors = {}
    for name, layer in qdec_layers(model):
        if name not in reference:
            raise KeyError(f"no reference weight for {name}")
        w_ref = reference[name].float()
        if layer.input_permutation is not None:
            w_ref = w_ref[:, layer.input_permutation.cpu()]
        w_hat = ops.dequantize(layer.qweight, layer.scales.float(),
                               None if layer.zeros is None else layer.zeros.float(),
                               layer.bits, layer.group_size, layer.in_features).cpu()
        if tuple(w_ref.shape) != tuple(w_hat.shape):
            raise ValueError(f"{name}: reference weight is {tuple(w_ref.shape)}, the packed "
                             f"weight {tuple(w_hat.shape)}")
        errors[name] = w_ref - w_hat
    return errors


def fit_factors(errors: dict[str, Tensor], stats: dict[str, ActivationStats], method: str,
                rank: int, gram: str = "full", damp: float = 1e-2,
                progress: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """Rank-``rank`` factors (float32) of every layer's error. The exact SVD
    makes the rank-``r`` factors the leading ``r`` columns/rows of these, so
    one fit at the largest rank serves every smaller budget (:func:`truncate`)."""
    out = {}
    for name, E in tqdm(errors.items(), desc=f"{method} rank {rank}", disable=not progress,
                        leave=False):
        r = min(rank, *E.shape)
        out[name] = lowrank_compensator(E, method, r, stats.get(name), damp, gram=gram,
                                        name=name)
    return out


def truncate(factors: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    L_A, L_B = factors
    return L_A[:, :rank], L_B[:rank]


# ------------------------------------------------------------------- driver
def _set_terms(model: nn.Module, terms: dict[str, tuple[Tensor, Tensor]] | None,
               cfg: CostConfig, residual_from: dict[str, Tensor] | None = None) -> None:
    """Attach (or with ``None`` remove) every layer's low-rank term; with
    ``residual_from`` (the errors ``E``), also rebuild each residual store from
    ``E - L_A L_B``."""
    for name, layer in qdec_layers(model):
        if terms is None:
            layer.set_lowrank(None)
            continue
        L_A, L_B = terms[name]
        residual = scales = None
        if residual_from is not None:
            layer.residual_bits = cfg.residual_bits
            residual, scales = quantize_residual(
                residual_after_lowrank(residual_from[name], L_A, L_B, name=name),
                bits=cfg.residual_bits)
        layer.set_lowrank(LowRankTerm(L_A, L_B, dtype=cfg.factor_dtype), residual, scales)


def compare_costs(model: nn.Module, reference: dict[str, Tensor], calib_ids: Tensor,
                  score: Callable[[nn.Module, str], dict], cfg: CostConfig,
                  progress: bool = True) -> dict:
    """Run the matched-cost grid on a patched model (module docstring).

    Args:
        model: patched with QDECLinear layers holding the plain residual store
            ``E`` (as :func:`qdec.patch.patch` leaves it); restored on return
            except for dense caches.
        reference: name -> full-precision weight (see :func:`quantization_errors`).
        calib_ids: int64 ``[n, L]`` calibration windows.
        score: ``score(model, label) -> {"ppl": ..., ...}``, e.g. a perplexity run.
        cfg: the budgets.

    Returns:
        ``{"packed_weight_bytes", "points": [...]}``, one point per grid cell and
        method: ``method`` (none / lowrank / qdec / hybrid), ``lowrank_method``,
        ``rank``, ``fraction``, the costs of :func:`model_costs`, and the score.
    """
    layers = dict(qdec_layers(model))
    originals = {n: (m.residual, m.residual_scales, m.residual_bits, m.k, m.policy)
                 for n, m in layers.items()}
    errors = quantization_errors(model, reference)
    points: list[dict] = []

    def run(method: str, lowrank_method: str | None, rank: int, fraction: float) -> None:
        configure(model, k=float(fraction), policy="dynamic")
        label = (f"{method}" + (f" {lowrank_method} r={rank}" if rank else "")
                 + (f" k={fraction:.0%}" if fraction else ""))
        result = dict(score(model, label))
        result.update(method=method, lowrank_method=lowrank_method, rank=rank,
                      fraction=fraction, **model_costs(model))
        points.append(result)

    try:
        run("none", None, 0, 0.0)
        for f in cfg.fractions:
            run("qdec", None, 0, f)
        max_rank = max(cfg.ranks)
        if cfg.lowrank_methods:
            full = collect_stats(model, calib_ids, None, progress)
            for method in cfg.lowrank_methods:
                fitted = fit_factors(errors, full, method, max_rank, "full", cfg.damp, progress)
                for r in cfg.ranks:
                    _set_terms(model, {n: truncate(fitted[n], r) for n in fitted}, cfg)
                    run("lowrank", method, r, 0.0)
                _set_terms(model, None, cfg)
            del full
        for f in cfg.fractions:
            gram = "masked" if cfg.hybrid_method == "aser" else "full"
            stats = collect_stats(model, calib_ids, f if gram == "masked" else None, progress)
            fitted = fit_factors(errors, stats, cfg.hybrid_method, max_rank, gram, cfg.damp,
                                 progress)
            del stats
            for r in cfg.ranks:
                _set_terms(model, {n: truncate(fitted[n], r) for n in fitted}, cfg,
                           residual_from=errors)
                run("hybrid", cfg.hybrid_method, r, f)
    finally:
        for name, layer in layers.items():
            residual, scales, bits, k, policy = originals[name]
            layer.residual_bits = bits
            layer.set_lowrank(None, residual, scales)
            layer.k, layer.policy = k, policy
    return {"packed_weight_bytes": packed_weight_bytes(model), "config": {
        **dataclasses.asdict(cfg), "factor_dtype": str(cfg.factor_dtype)}, "points": points}


# ------------------------------------------------------------------ reports
def cost_table(entry: dict, reference_ppl: float) -> str:
    """A markdown table of one variant's comparison, sorted by method then cost."""
    from .report import log_gap_closed

    base = next(p["ppl"] for p in entry["points"] if p["method"] == "none")
    weights = entry["packed_weight_bytes"]
    rows = ["| method | low-rank | rank | k | GPU extra MiB (% of weights) | fetched KiB/token "
            "| ppl | gap closed (ppl; NLL) |", "|---|---|---|---|---|---|---|---|"]
    for p in entry["points"]:
        gap = (base - p["ppl"]) / (base - reference_ppl) if base != reference_ppl else float("nan")
        rows.append(
            f"| {p['method']} | {p['lowrank_method'] or '-'} | {p['rank']} | "
            f"{p['fraction']:.0%} | {p['gpu_extra_bytes'] / 2**20:.2f} "
            f"({100 * p['gpu_extra_bytes'] / weights:.1f}%) | "
            f"{p['fetched_bytes_per_token'] / 1024:.1f} | {p['ppl']:.2f} | "
            f"{gap:.0%}; {log_gap_closed(reference_ppl, base, p['ppl']):.0%} |")
    return "\n".join(rows)


def plot_costs(variants: Iterable[dict], reference_ppl: float, path) -> None:
    """Two panels per variant: perplexity against GPU-resident extra bytes
    (one line per fetched-bytes budget) and against bytes fetched per token
    (one line per rank), so equal-cost comparisons are vertical slices."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in variants if v.get("cost_comparison")]
    fig, axes = plt.subplots(len(variants), 2, figsize=(11, 4 * len(variants)), squeeze=False)
    for row, v in zip(axes, variants):
        pts = v["cost_comparison"]["points"]
        ax_gpu, ax_pcie = row
        def curve(keep) -> list[tuple[float, float]]:
            return sorted((x(p), p["ppl"]) for p in pts if keep(p))

        def aser_only(p) -> bool:
            return p["method"] == "lowrank" and p["lowrank_method"] == "aser"

        def x(p) -> float:
            return p["gpu_extra_bytes"] / 2**20

        # Equal fetched bytes: fix k, grow the rank (k = 0 is low-rank only).
        for f in sorted({p["fraction"] for p in pts}):
            line = curve(lambda p: p["fraction"] == f and (
                p["method"] in ("none", "qdec", "hybrid") or (f == 0 and aser_only(p))))
            ax_gpu.plot(*zip(*line), marker="o",
                        label="low-rank (ASER) only" if f == 0 else f"hybrid, k={f:.0%}")
        for method in ("lorc", "lqer"):
            line = curve(lambda p: p["method"] == "lowrank" and p["lowrank_method"] == method)
            if line:
                ax_gpu.plot(*zip(*line), marker="x", ls=":", label=f"{method.upper()} only")

        def x(p) -> float:  # noqa: F811 (the second panel's axis)
            return p["fetched_bytes_per_token"] / 1024

        # Equal GPU bytes: fix the rank, grow k (rank 0 is QDEC only).
        for r in sorted({p["rank"] for p in pts}):
            line = curve(lambda p: p["rank"] == r and (
                p["method"] in ("none", "qdec", "hybrid") or aser_only(p)))
            ax_pcie.plot(*zip(*line), marker="o",
                         label="QDEC only" if r == 0 else f"hybrid, ASER r={r}")
        for ax, xlabel in ((ax_gpu, "GPU-resident extra MiB"),
                           (ax_pcie, "KiB fetched over PCIe per token")):
            ax.axhline(reference_ppl, color="k", ls="--", lw=1, label="reference")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("WikiText-2 perplexity")
            ax.set_title(v["label"])
            if max(p["ppl"] for p in pts) > 20 * reference_ppl:
                ax.set_yscale("log")  # 2-bit: spans orders of magnitude
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
