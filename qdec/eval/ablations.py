"""Ablations of dynamic compensation, behind the notebooks in ``notebooks/``.

Every notebook calls :func:`load_setup` once (load the model, quantize it,
patch it with :class:`qdec.nn.QDECLinear`, score the reference and the plain
quantized model) and then one ablation on the returned :class:`AblationSetup`:

* :func:`k_sweep`: perplexity against the fraction of input channels fetched
  per token (one selection policy, dynamic by default);
* :func:`compare_policies`: dynamic / static / random / oracle at a few k;
* :func:`residual_bits_sweep`: residual stores rebuilt at several code widths
  from ``W_ref - dequant(W_q)``, each compensated at the ``k`` that fetches
  the same bytes per token;
* :func:`layer_gain`: compensation confined to one projection type, or to one
  block of consecutive decoder layers, at a time.

Each returns a JSON-ready dict (``rows`` plus the setup's header), which
:func:`save_results` writes atomically with :func:`qdec.eval.sweep.write_json`;
``*_table`` turns it into markdown and ``plot_*`` into a matplotlib figure.
The model is left as :func:`load_setup` made it (``k = 0``, dynamic policy, the
original residual store) after every ablation, so one setup serves them all.

Semantics are those of ``qdec eval`` (:mod:`qdec.eval.sweep`): every token of
a window is compensated with its own channels, as in a decode step, simulated
with the dense path of ``QDECLinear``; the perplexity protocol is
:func:`qdec.eval.perplexity.perplexity` (non-overlapping windows).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# tqdm.auto warns once, at first import, when it runs in a Jupyter kernel
# without ipywidgets (it then falls back to the text bar, which is what we
# want): keep that warning out of the notebooks' saved outputs.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

from ..nn import POLICIES, QDECLinear  # noqa: E402
from ..patch import configure, patch, qdec_layers, static_channels_from_calibration  # noqa: E402
from ..quant.residual import (  # noqa: E402
    dequantize_residual,
    pack_residual,
    residual_scale_search,
)
from .costs import model_costs, quantization_errors  # noqa: E402
from .report import log_gap_closed  # noqa: E402
from .sweep import (  # noqa: E402
    DEFAULT_CALIB,
    DEFAULT_TEXT,
    Variant,
    calibration_ids,
    environment,
    gap_closed,
    write_json,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" / "ablations"

K_SWEEP_FRACTIONS: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
POLICY_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05)
RESIDUAL_BITS: tuple[int, ...] = (2, 3, 4, 8)
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")


# ------------------------------------------------------------------- setup
@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """What every ablation shares: model, base quantization, texts, windows.

    Attributes:
        text: perplexity text (WikiText-2 test); a relative path is taken from
            the current directory if it exists there, else from the repository
            root (so notebooks run from ``notebooks/`` find the same files).
        calib_text: calibration text (WikiText-2 validation: static channels,
            the calibration errors of the quantizer).
        model: GGUF file, or ``None`` for the embedded SmolLM2-135M (dequantized
            Q4_1 reference weights), as ``qdec eval`` without ``--model``.
        variant: base quantization as ``method:bits:group[:sym]``
            (:meth:`qdec.eval.sweep.Variant.parse`).
        seq_len, max_windows: perplexity windows (``max_windows=None``: all).
        calib_samples, calib_len: calibration windows.
        residual_bits: code width of the residual store built with the weights.
        seed: calibration offsets and the random policy's stream.
        progress: progress bars.
    """

    text: str = DEFAULT_TEXT
    calib_text: str = DEFAULT_CALIB
    model: str | None = None
    variant: str = "rtn:3:128"
    seq_len: int = 512
    max_windows: int | None = 4
    calib_samples: int = 4
    calib_len: int = 512
    residual_bits: int = 4
    seed: int = 0
    progress: bool = True

    def cache_key(self) -> tuple:
        """Everything but ``progress``: what determines the setup's contents."""
        return tuple(v for f, v in zip(dataclasses.fields(self), dataclasses.astuple(self))
                     if f.name != "progress")


@dataclasses.dataclass
class AblationSetup:
    """A quantized, patched model ready for ablations (:func:`load_setup`).

    Attributes:
        config: how it was made.
        model: the transformers model with every decoder linear a ``QDECLinear``
            (dense simulation, prefill compensated), ``k = 0``.
        tokenizer: its tokenizer.
        quantization: the :class:`qdec.quant.pipeline.QuantizationResult`.
        text_ids: the tokenized perplexity text, int64 ``[T]``.
        calib_ids: calibration windows, int64 ``[n, calib_len]``.
        reference_weights: qualified linear name -> ``W_ref`` (float32
            ``[N, K]``), the weights that were quantized.
        reference: perplexity result of the reference model.
        quantized: perplexity result of the quantized model without compensation.
        seconds: wall time of loading, quantizing and the two baseline scores.
    """

    config: AblationConfig
    model: nn.Module
    tokenizer: Any
    quantization: Any
    text_ids: Tensor
    calib_ids: Tensor
    reference_weights: dict[str, Tensor]
    reference: dict
    quantized: dict
    seconds: dict[str, float]
    static_ready: bool = False

    @property
    def variant(self) -> Variant:
        return Variant.parse(self.config.variant)

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    def layers(self) -> Iterator[tuple[str, QDECLinear]]:
        """``(qualified name, QDECLinear)`` of every patched linear."""
        return qdec_layers(self.model)

    def perplexity(self, desc: str = "perplexity") -> dict:
        """Perplexity of the model at its current settings (per-window bar
        only when ``progress``; the ablations show one bar over their points)."""
        from .perplexity import perplexity

        r = perplexity(self.model, self.text_ids, seq_len=self.config.seq_len,
                       max_windows=self.config.max_windows, progress=False, desc=desc)
        return {k: r[k] for k in ("ppl", "nll", "tokens", "windows", "seconds")}

    def header(self, ablation: str, **params: Any) -> dict:
        """The JSON fields every ablation result starts with."""
        return {
            "ablation": ablation,
            "params": params,
            "config": dataclasses.asdict(self.config),
            "environment": environment(),
            "model": ("SmolLM2-135M-Instruct (dequantized Q4_1 reference)"
                      if self.config.model is None else str(self.config.model)),
            "variant": self.variant.label,
            "text_tokens": int(self.text_ids.numel()),
            "reference": self.reference,
            "quantized": self.quantized,
            "setup_seconds": self.seconds,
        }

    def summary(self) -> str:
        """One paragraph: model, quantization, windows, the two baseline perplexities."""
        r, q = self.reference, self.quantized
        return (f"{self.header('summary')['model']}, {self.num_layers} decoder layers, "
                f"{sum(1 for _ in self.layers())} linears quantized with {self.variant.label} "
                f"(residual store {self.config.residual_bits}-bit). Perplexity on "
                f"{r['windows']} windows x {self.config.seq_len} tokens of "
                f"{Path(self.config.text).name}: reference {r['ppl']:.3f}, quantized "
                f"{q['ppl']:.3f} (gap {q['ppl'] - r['ppl']:.3f}). Setup took "
                f"{sum(self.seconds.values()):.0f} s.")


_SETUPS: dict[tuple, AblationSetup] = {}


def resolve_path(path: str | Path) -> Path:
    """``path`` as given if absolute or present relative to the current
    directory, else relative to the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


@torch.no_grad()
def load_setup(config: AblationConfig | None = None, cache: bool = True) -> AblationSetup:
    """Load, score, quantize and patch the model once (cached per config in
    this process, so repeated calls are free).

    Steps: the model (:func:`qdec.cli.load_model`, the embedded SmolLM2-135M by
    default) and the texts are loaded, the reference perplexity measured, the
    decoder linears quantized with the residual store
    (:func:`qdec.quant.pipeline.quantize_model`, calibrated on
    ``calib_samples`` windows), the model patched with ``QDECLinear`` at
    ``k = 0`` in dense simulation, and the quantized perplexity measured.

    Raises:
        FileNotFoundError: a text or the model is missing.
        ValueError: the variant spec is malformed or not a Llama-family model.
    """
    from ..cli import load_model
    from ..quant.pipeline import quantize_model
    from .perplexity import load_text

    config = config or AblationConfig()
    if cache and config.cache_key() in _SETUPS:
        return _SETUPS[config.cache_key()]
    variant = Variant.parse(config.variant)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tokenizer = load_model(None if config.model is None else str(resolve_path(config.model)))
    # Tokenized as qdec eval does (run_eval), so the perplexities are comparable.
    text_ids = tokenizer(load_text(resolve_path(config.text)),
                         return_tensors="pt").input_ids[0]
    calib = calibration_ids(tokenizer, resolve_path(config.calib_text), config.calib_samples,
                            config.calib_len, config.seed)
    seconds["load"] = time.perf_counter() - t0
    setup = AblationSetup(config, model, tokenizer, None, text_ids, calib, {}, {}, {}, seconds)
    t0 = time.perf_counter()
    setup.reference = setup.perplexity("reference")
    seconds["reference_ppl"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    setup.quantization = quantize_model(model, variant.method, variant.bits, variant.group_size,
                                        symmetric=variant.symmetric, calib_ids=calib,
                                        residual_bits=config.residual_bits,
                                        progress=config.progress)
    # The weights that were quantized (after AWQ's scaling, if any): the model's
    # linears are W_ref now; patch() drops them, these references keep them.
    from ..patch import decoder_linears

    setup.reference_weights = {name: m.weight.detach().float()
                               for name, m in decoder_linears(model)}
    patch(model, setup.quantization.packed(), k=0)
    configure(model, simulate_dense=True, compensate_prefill=True)
    seconds["quantize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    setup.quantized = setup.perplexity(variant.label)
    seconds["quantized_ppl"] = time.perf_counter() - t0
    setup.seconds = {k: round(v, 1) for k, v in seconds.items()}
    if cache:
        _SETUPS[config.cache_key()] = setup
    return setup


# ---------------------------------------------------------------- scoring
def _reset(setup: AblationSetup) -> None:
    """Back to the setup's state: no compensation, dynamic policy."""
    configure(setup.model, k=0, policy="dynamic")


def set_compensation(setup: AblationSetup, k: float | dict[str, int | float],
                     policy: str = "dynamic") -> None:
    """Set ``k`` (a fraction of each layer's input channels, or a mapping from
    a full layer name or projection suffix to a fraction / channel count, every
    other layer 0) and the selection policy on every layer."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "static" and not setup.static_ready:
        static_channels_from_calibration(setup.model, setup.calib_ids)
        setup.static_ready = True
    if isinstance(k, dict):
        configure(setup.model, k=0)
    configure(setup.model, k=k, policy=policy)


def evaluate(setup: AblationSetup, desc: str = "perplexity") -> dict:
    """Score the model at its current settings: the perplexity result plus
    the gap closed (in perplexity and in NLL), the bytes fetched per token
    (summed over all linears, :attr:`QDECLinear.fetched_bytes_per_token`),
    and the channels compensated per token (summed ``k`` and its share of the
    summed input channels)."""
    for _, layer in setup.layers():
        layer.reset_rng(setup.config.seed)
    r = setup.perplexity(desc)
    ref, base = setup.reference["ppl"], setup.quantized["ppl"]
    layers = [m for _, m in setup.layers()]
    channels = sum(m.channels_per_token for m in layers)
    r.update(gap_closed=gap_closed(ref, base, r["ppl"]),
             log_gap_closed=log_gap_closed(ref, base, r["ppl"]),
             fetched_bytes_per_token=model_costs(setup.model)["fetched_bytes_per_token"],
             channels_per_token=channels,
             channel_share=channels / sum(m.in_features for m in layers))
    return r


def _points(points: Sequence[Any], progress: bool, desc: str) -> Any:
    return tqdm(points, desc=desc, disable=not progress, unit="run")


# ------------------------------------------------------------------ k sweep
def k_sweep(setup: AblationSetup, fractions: Sequence[float] = K_SWEEP_FRACTIONS,
            policy: str = "dynamic") -> dict:
    """Perplexity against ``k``, the fraction of each linear's input
    channels compensated per token, with one selection policy.

    Returns:
        the header plus ``rows``: one per fraction with ``fraction``,
        ``policy`` and the fields of :func:`evaluate`.
    """
    start = time.perf_counter()
    rows = []
    try:
        for f in _points(list(fractions), setup.config.progress, f"k sweep ({policy})"):
            set_compensation(setup, float(f), policy)
            rows.append({"fraction": float(f), "policy": policy,
                         **evaluate(setup, f"{policy} k={f:.1%}")})
    finally:
        _reset(setup)
    return {**setup.header("k_sweep", fractions=list(map(float, fractions)), policy=policy),
            "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


def compare_policies(setup: AblationSetup, fractions: Sequence[float] = POLICY_FRACTIONS,
                     policies: Sequence[str] = POLICIES) -> dict:
    """Every selection policy at every fraction (see :class:`qdec.nn.QDECLinear`):
    ``dynamic`` (top-|x| per token), ``static`` (top mean-|x| channels on the
    calibration windows, fixed), ``random`` (uniform per token, seeded),
    ``oracle`` (top ``|x_j| * ||R[:, j]||`` per token, the channels whose
    stored residual contributes most to this token's output error).

    Returns:
        the header plus ``rows`` (``policy``, ``fraction``, :func:`evaluate`).
    """
    start = time.perf_counter()
    grid = [(p, float(f)) for p in policies for f in fractions]
    rows = []
    try:
        for policy, f in _points(grid, setup.config.progress, "policies"):
            set_compensation(setup, f, policy)
            rows.append({"policy": policy, "fraction": f,
                         **evaluate(setup, f"{policy} k={f:.1%}")})
    finally:
        _reset(setup)
    return {**setup.header("policies", fractions=[float(f) for f in fractions],
                           policies=list(policies)),
            "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------- residual width
def residual_row_bytes(out_features: int, bits: int) -> int:
    """Bytes of one packed residual row (one input channel): ``ceil(N/32) * bits``
    int32 words, the unit :attr:`QDECLinear.fetched_bytes_per_token` counts."""
    return -(-out_features // 32) * bits * 4


def k_for_budget(in_features: int, out_features: int, bits: int, budget_bytes: int) -> int:
    """The most channels of a ``bits``-wide residual store that fit in
    ``budget_bytes`` per token (never more than ``in_features``)."""
    return min(in_features, budget_bytes // residual_row_bytes(out_features, bits))


def residual_bits_sweep(setup: AblationSetup, bits: Sequence[int] = RESIDUAL_BITS,
                        budget_fractions: Sequence[float] = (0.02,), budget_bits: int = 4,
                        include_full: bool = True, grid_points: int = 32) -> dict:
    """Residual code width at equal bytes fetched per token.

    For each width ``b`` the residual store of every linear is rebuilt from
    ``E = W_ref - dequant(W_q)`` (:func:`qdec.quant.residual.residual_scale_search`,
    the quantizer of the pipeline). A budget is the bytes that
    ``round(f * K)`` rows of a ``budget_bits``-wide store take, per linear;
    at width ``b`` that linear then fetches
    ``k_b = floor(budget / row_bytes(b))`` rows (:func:`k_for_budget`): narrower
    codes buy more channels for the same bytes. With ``include_full`` each
    width is also scored with every channel compensated (``k = K``): the
    error floor of the residual quantizer itself.

    Returns:
        the header plus ``rows``: ``bits``, ``budget_fraction`` (``None`` for the
        full store), ``budget_bytes_per_token`` (summed over linears), the
        residual's relative Frobenius error ``||E - R_b|| / ||E||`` over all
        linears (``residual_rel_error``), its host size (``store_bytes``), and
        the fields of :func:`evaluate`.
    """
    start = time.perf_counter()
    layers = dict(setup.layers())
    originals = {n: (m.residual, m.residual_scales, m.residual_bits) for n, m in layers.items()}
    budgets = {f: {n: round(f * m.in_features) * residual_row_bytes(m.out_features, budget_bits)
                   for n, m in layers.items()} for f in budget_fractions}
    errors = quantization_errors(setup.model, setup.reference_weights)
    rows = []
    steps = len(bits) * (len(budget_fractions) + int(include_full))
    bar = tqdm(total=steps, desc="residual widths", disable=not setup.config.progress,
               unit="run")
    try:
        for b in bits:
            err_sq = ref_sq = 0.0
            store_bytes = 0
            for name, layer in layers.items():
                q, scales = residual_scale_search(errors[name], b, grid_points)
                err_sq += (errors[name] - dequantize_residual(q, scales)).square().sum().item()
                ref_sq += errors[name].square().sum().item()
                packed = pack_residual(q, b)
                store_bytes += packed.numel() * packed.element_size()
                layer.residual_bits = b
                layer.set_lowrank(None, packed, scales)
                layer.clear_dense_cache()
            rel = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else float("nan")
            plans: list[tuple[float | None, dict[str, int]]] = [
                (f, {n: k_for_budget(m.in_features, m.out_features, b, budgets[f][n])
                     for n, m in layers.items()}) for f in budget_fractions]
            if include_full:
                plans.append((None, {n: m.in_features for n, m in layers.items()}))
            for f, ks in plans:
                set_compensation(setup, ks, "dynamic")
                label = f"{b}-bit " + ("all channels" if f is None
                                       else f"budget {f:.1%}@{budget_bits}b")
                r = evaluate(setup, label)
                rows.append({"bits": b, "budget_fraction": f,
                             "budget_bytes_per_token": None if f is None
                             else sum(budgets[f].values()),
                             "residual_rel_error": rel, "store_bytes": store_bytes, **r})
                bar.update()
            for layer in layers.values():  # free this width's dense copies
                layer.clear_dense_cache()
    finally:
        bar.close()
        for name, layer in layers.items():
            residual, scales, rbits = originals[name]
            layer.residual_bits = rbits
            layer.set_lowrank(None, residual, scales)
        _reset(setup)
    return {**setup.header("residual_bits", bits=list(bits),
                           budget_fractions=[float(f) for f in budget_fractions],
                           budget_bits=budget_bits, include_full=include_full,
                           grid_points=grid_points),
            "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


# --------------------------------------------------------------- layer gain
def layer_groups(setup: AblationSetup, blocks: int = 3
                 ) -> list[tuple[str, str, Callable[[str], bool]]]:
    """``(kind, group, predicate on qualified layer name)``: every linear
    (``all``), each projection type, and ``blocks`` contiguous blocks of
    decoder layers (as equal as possible, shallow first)."""
    n = setup.num_layers
    if not 1 <= blocks <= n:
        raise ValueError(f"blocks must be in [1, {n}], got {blocks}")
    groups: list[tuple[str, str, Callable[[str], bool]]] = [("all", "all", lambda name: True)]
    for proj in PROJECTIONS:
        groups.append(("projection", proj, lambda name, p=proj: name.endswith("." + p)))
    bounds = [round(i * n / blocks) for i in range(blocks + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        groups.append(("block", f"layers {lo}-{hi - 1}",
                       lambda name, lo=lo, hi=hi: lo <= _layer_index(name) < hi))
    return groups


def _layer_index(name: str) -> int:
    return int(name.split("model.layers.", 1)[1].split(".", 1)[0])


def layer_gain(setup: AblationSetup, fraction: float = 0.05, blocks: int = 3,
               policy: str = "dynamic") -> dict:
    """Which layers gain most: compensate (at ``fraction`` of input channels)
    only the linears of one group at a time, the others left at ``k = 0``;
    groups from :func:`layer_groups`.

    Returns:
        the header plus ``rows``: ``kind`` (all / projection / block),
        ``group``, ``linears`` (how many are compensated), the fields of
        :func:`evaluate`, and ``gap_closed_per_kib`` (gap closed per KiB
        fetched per token: the groups fetch different amounts at one fraction).
    """
    start = time.perf_counter()
    rows = []
    try:
        for kind, group, keep in _points(layer_groups(setup, blocks), setup.config.progress,
                                         "layer groups"):
            ks = {name: float(fraction) for name, _ in setup.layers() if keep(name)}
            set_compensation(setup, ks, policy)
            r = evaluate(setup, f"{group} k={fraction:.1%}")
            kib = r["fetched_bytes_per_token"] / 1024
            rows.append({"kind": kind, "group": group, "linears": len(ks), **r,
                         "gap_closed_per_kib": r["gap_closed"] / kib if kib else float("nan")})
    finally:
        _reset(setup)
    return {**setup.header("layer_gain", fraction=float(fraction), blocks=blocks, policy=policy),
            "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


# ------------------------------------------------------- tensor parallelism
ROW_PARALLEL: tuple[str, ...] = ("o_proj", "down_proj")


def tp_selection(setup: AblationSetup, fractions: Sequence[float] = (0.02, 0.05),
                 degrees: Sequence[int] = (1, 2, 4)) -> dict:
    """Local against global top-k under tensor parallelism, simulated in one process.

    Under tensor parallelism of degree ``tp`` a row-parallel linear (o_proj,
    down_proj) is split by input channel, and each rank sees only its slice of
    ``x``; without communication it can only take the top ``ceil(k/tp)`` of its
    slice (:attr:`QDECLinear.selection_shards`). Column-parallel linears see all
    of ``x`` and select exactly as at ``tp = 1``. This scores each degree at
    each fraction with the row-parallel layers so split.

    Returns:
        the header plus ``rows``: ``fraction``, ``tp`` and the fields of
        :func:`evaluate` (``channels_per_token`` counts ``tp * ceil(k/tp)`` on
        the split layers).
    """
    start = time.perf_counter()
    rows = []
    split = [m for name, m in setup.layers() if name.rsplit(".", 1)[-1] in ROW_PARALLEL]
    try:
        for f, tp in _points([(f, t) for f in fractions for t in degrees],
                             setup.config.progress, "tp selection"):
            set_compensation(setup, float(f))
            for m in split:
                m.selection_shards = tp
            rows.append({"fraction": float(f), "tp": int(tp),
                         **evaluate(setup, f"k={f:.1%} tp={tp}")})
    finally:
        for m in split:
            m.selection_shards = 1
        _reset(setup)
    return {**setup.header("tp_selection", fractions=list(map(float, fractions)),
                           degrees=list(map(int, degrees)), row_parallel=list(ROW_PARALLEL)),
            "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


def tp_selection_table(results: dict) -> str:
    """Markdown: perplexity and gap closed per fraction and degree."""
    rows = [[_pct(r["fraction"]), str(r["tp"]), f"{r['ppl']:.3f}", _pct(r["gap_closed"]),
             _pct(r["log_gap_closed"]), str(r["channels_per_token"])]
            for r in results["rows"]]
    return _baseline_line(results) + "\n\n" + _markdown(
        ["k", "tp", "ppl", "gap closed", "log gap closed", "channels/token"], rows)


# ------------------------------------------------------------------ output
def save_results(results: dict, name: str, directory: str | Path = RESULTS_DIR) -> Path:
    """Write ``results`` to ``<directory>/<name>.json`` atomically; returns the path."""
    path = Path(directory) / f"{name}.json"
    write_json(results, path)
    return path


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.{digits}f}%"


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _baseline_line(results: dict) -> str:
    return (f"{results['variant']}: reference {results['reference']['ppl']:.3f}, quantized "
            f"{results['quantized']['ppl']:.3f} ({results['reference']['windows']} windows x "
            f"{results['config']['seq_len']} tokens)\n\n")


def k_sweep_table(results: dict) -> str:
    """Markdown: k, channels and KiB fetched per token, ppl, gap closed (ppl, NLL)."""
    return _baseline_line(results) + _markdown(
        ["k (% of input channels)", "channels / token (all linears)", "KiB fetched / token", "ppl",
         "gap closed", "gap closed (NLL)"],
        [[_pct(r["fraction"]), str(r["channels_per_token"]), _kib(r["fetched_bytes_per_token"]),
          f"{r['ppl']:.3f}", _pct(r["gap_closed"]), _pct(r["log_gap_closed"])]
         for r in results["rows"]])


def policy_table(results: dict) -> str:
    """Markdown: one row per policy, ``ppl (gap closed)`` per fraction."""
    fractions = results["params"]["fractions"]
    cells = []
    for policy in results["params"]["policies"]:
        row = [policy]
        for f in fractions:
            r = next(r for r in results["rows"] if r["policy"] == policy and r["fraction"] == f)
            row.append(f"{r['ppl']:.3f} ({_pct(r['gap_closed'], 0)})")
        cells.append(row)
    return _baseline_line(results) + _markdown(
        ["policy"] + [f"k = {_pct(f)}" for f in fractions], cells)


def residual_bits_table(results: dict) -> str:
    """Markdown: one row per width and budget (and the full store)."""
    p = results["params"]
    return _baseline_line(results) + _markdown(
        ["residual bits", "budget", "channels / token (all linears)", "KiB fetched / token",
         "residual rel. error", "host store MiB", "ppl", "gap closed"],
        [[str(r["bits"]),
          "all channels" if r["budget_fraction"] is None
          else f"{_pct(r['budget_fraction'])} @ {p['budget_bits']}-bit",
          f"{r['channels_per_token']} ({_pct(r['channel_share'])})",
          _kib(r["fetched_bytes_per_token"]), f"{r['residual_rel_error']:.3f}",
          f"{r['store_bytes'] / 2**20:.1f}", f"{r['ppl']:.3f}", _pct(r["gap_closed"])]
         for r in results["rows"]])


def layer_gain_table(results: dict) -> str:
    """Markdown: one row per group."""
    return _baseline_line(results) + _markdown(
        ["group", "linears", "KiB fetched / token", "ppl", "gap closed",
         "gap closed per 100 KiB"],
        [[r["group"], str(r["linears"]), _kib(r["fetched_bytes_per_token"]), f"{r['ppl']:.3f}",
          _pct(r["gap_closed"]), _pct(100 * r["gap_closed_per_kib"])] for r in results["rows"]])


# ------------------------------------------------------------------- plots
def _save(fig: Any, path: str | Path | None) -> None:
    if path is None:
        return
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def _baselines(ax: Any, results: dict, quantized: bool = True) -> None:
    ax.axhline(results["reference"]["ppl"], color="k", ls="--", lw=1, label="reference")
    if quantized:
        ax.axhline(results["quantized"]["ppl"], color="gray", ls=":", lw=1,
                   label=f"{results['variant']}, no compensation")


def plot_k_sweep(results: dict, path: str | Path | None = None) -> Any:
    """Perplexity (log axis) and gap closed against k > 0 (% of input channels,
    log axis; ``k = 0`` is the dotted "no compensation" line); returns the
    figure (saved to ``path`` if given)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = sorted((r for r in results["rows"] if r["fraction"] > 0), key=lambda r: r["fraction"])
    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [100 * r["fraction"] for r in rows]
    ax.plot(xs, [r["ppl"] for r in rows], marker="o", label=results["params"]["policy"])
    _baselines(ax, results)
    ax.set_ylabel("WikiText-2 perplexity")
    ax_gap.plot(xs, [100 * r["gap_closed"] for r in rows], marker="o", label="perplexity gap")
    ax_gap.plot(xs, [100 * r["log_gap_closed"] for r in rows], marker="s", ls="--",
                label="NLL gap")
    ax_gap.set_ylabel("gap closed (%)")
    ax_gap.set_ylim(0, 100)
    for a in (ax, ax_gap):
        a.set_xscale("log")
        a.set_xticks(xs, [f"{x:g}" for x in xs])
        a.xaxis.set_minor_formatter(NullFormatter())
        a.set_xlabel("input channels compensated per token (%)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    fig.suptitle(f"{results['variant']}: compensation with {results['params']['policy']} "
                 "selection")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_policies(results: dict, path: str | Path | None = None) -> Any:
    """Perplexity against k, one line per policy."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for policy in results["params"]["policies"]:
        rows = sorted((r for r in results["rows"] if r["policy"] == policy),
                      key=lambda r: r["fraction"])
        ax.plot([0] + [100 * r["fraction"] for r in rows],
                [results["quantized"]["ppl"]] + [r["ppl"] for r in rows], marker="o",
                label=policy)
    _baselines(ax, results)
    ax.set_xlabel("input channels compensated per token (%)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(f"{results['variant']}: selection policies")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_residual_bits(results: dict, path: str | Path | None = None) -> Any:
    """Perplexity against the residual width, one line per byte budget (and
    one for the full store), each point labelled with the share of input
    channels that width affords within the budget."""
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for f in dict.fromkeys(r["budget_fraction"] for r in rows):
        pts = sorted((r for r in rows if r["budget_fraction"] == f), key=lambda r: r["bits"])
        label = ("all channels (no budget)" if f is None else
                 f"budget: {100 * f:g}% of channels at {results['params']['budget_bits']}-bit "
                 f"({pts[0]['budget_bytes_per_token'] / 1024:.1f} KiB/token)")
        ax.plot([r["bits"] for r in pts], [r["ppl"] for r in pts], marker="o",
                ls=":" if f is None else "-", label=label)
        if f is not None:
            for r in pts:
                ax.annotate(f"k={100 * r['channel_share']:.1f}%", (r["bits"], r["ppl"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    _baselines(ax, results, quantized=False)  # far above: would squash the curves
    ax.set_xticks(results["params"]["bits"])
    ax.margins(x=0.1)
    ax.set_xlabel("residual code width (bits)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(f"{results['variant']} (uncompensated ppl {results['quantized']['ppl']:.1f}):\n"
                 "residual width at equal bytes fetched per token", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_layer_gain(results: dict, path: str | Path | None = None) -> Any:
    """Per group: gap closed (top row; bar labels: perplexity) and gap closed
    per 100 KiB fetched per token (bottom row), projection types and depth
    blocks side by side."""
    import matplotlib.pyplot as plt

    titles = {"projection": "one projection type (all layers)",
              "block": "one block of layers (all projections)"}
    kinds = [k for k in titles if any(r["kind"] == k for r in results["rows"])]
    fig, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 7), squeeze=False,
                             sharey="row")
    everything = next((r for r in results["rows"] if r["kind"] == "all"), None)
    for col, kind in enumerate(kinds):
        rows = [r for r in results["rows"] if r["kind"] == kind]
        names = [r["group"] for r in rows]
        ax, ax_eff = axes[0, col], axes[1, col]
        bars = ax.bar(names, [100 * r["gap_closed"] for r in rows], color="C0")
        ax.bar_label(bars, [f"ppl {r['ppl']:.1f}" for r in rows], fontsize=7, padding=2)
        if everything is not None:
            ax.axhline(100 * everything["gap_closed"], color="C0", ls="--", lw=1,
                       label=f"all linears (ppl {everything['ppl']:.1f})")
            ax_eff.axhline(100 * 100 * everything["gap_closed_per_kib"], color="C1", ls="--",
                           lw=1, label="all linears")
            ax.legend(fontsize=8)
            ax_eff.legend(fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"k = {100 * results['params']['fraction']:g}% in {titles[kind]}",
                     fontsize=10)
        ax_eff.bar(names, [100 * 100 * r["gap_closed_per_kib"] for r in rows], color="C1")
        ax_eff.axhline(0, color="k", lw=0.5)
        ax_eff.tick_params(axis="x", labelrotation=30)
        ax.tick_params(axis="x", labelbottom=False)
        if col == 0:
            ax.set_ylabel("perplexity gap closed (%)")
            ax_eff.set_ylabel("gap closed (%) per 100 KiB\nfetched per token")
    fig.suptitle(f"{results['variant']}: which linears gain most from compensation")
    fig.tight_layout()
    _save(fig, path)
    return fig


__all__ = [
    "AblationConfig", "AblationSetup", "K_SWEEP_FRACTIONS", "POLICY_FRACTIONS", "PROJECTIONS",
    "RESIDUAL_BITS", "RESULTS_DIR", "compare_policies", "evaluate", "k_for_budget", "k_sweep",
    "k_sweep_table", "layer_gain", "layer_gain_table", "layer_groups", "load_setup",
    "plot_k_sweep", "plot_layer_gain", "plot_policies", "plot_residual_bits", "policy_table",
    "residual_bits_sweep", "residual_bits_table", "residual_row_bytes", "resolve_path",
    "save_results", "set_compensation",
]

