"""``qdec tune``: choose k per projection type for a target decode slowdown.

Two halves, kept apart so the choice can be tested without a GPU:

- :func:`measure` times, on the present device, the base GEMV
  (``quantized_matmul``) and ``compensated_linear`` at a grid of k for each
  projection type of a decoder layer (random weights at the shapes of a preset
  model: Llama-3-8B by default), batch 1, as one decode step runs them.
- :func:`choose_k` (pure) spends a time budget — ``target`` x the summed GEMV
  time of one decoder layer's projections — on k, greedily buying the most
  input channels per microsecond of measured compensation overhead, so that
  GEMV + compensation summed over the projections stays within
  ``(1 + target)`` x the GEMVs alone (as measured).

The chosen k are saved as a fraction of each projection's input channels in a
config file (``configs/*.json``) that ``qdec eval --tune-config`` and
``qdec generate --tune-config`` read, so a config tuned at Llama-3-8B shapes
can drive another Llama-family model; tune at that model's own shapes
(``--shapes``) when its layers are much smaller, since fixed per-launch costs
then dominate.

The SM budget of the compensation (``compensated_linear``'s ``sm_budget``,
a cap on the thread blocks its kernel occupies beside the GEMV) is tuned with
k: each k is timed at every budget of a small grid, the fastest is kept, and
the config records it per projection for ``qdec generate`` to apply.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .benchmarking import (
    SHAPE_PRESETS,
    packed_layer,
    residual_store,
    run_metadata,
    time_op,
)
from .formats.safetensors_io import write_json_atomic

CONFIG_FORMAT = "qdec-tune/1"
DEFAULT_TARGETS = (0.025, 0.05, 0.10)
# k as channels per 1024 input channels: 0 to 6.25 %, doubling (decode-time
# compensation beyond a few percent is bandwidth-bound on PCIe anyway).
DEFAULT_K_PER_1024 = (0, 1, 2, 4, 8, 16, 32, 64)
# Thread-block caps of the compensation kernel tried at each k (0 = the
# kernel's own choice, up to 32 splits of k per 4096 outputs).
DEFAULT_SM_BUDGETS = (0, 4, 8, 16)


def k_grid(K: int, per_1024: Sequence[int] = DEFAULT_K_PER_1024) -> list[int]:
    """The k values timed for a projection with ``K`` input channels: distinct,
    ascending, starting at 0, each at least 1 when its share is nonzero."""
    ks = sorted({0 if p == 0 else max(1, round(p * K / 1024)) for p in per_1024})
    if any(k > K for k in ks):
        raise ValueError(f"k grid {ks} exceeds K = {K} input channels")
    return ks


@torch.inference_mode()
def measure(device: str = "cuda", bits: int = 3, group_size: int = 128, residual_bits: int = 4,
            shapes: str | Mapping[str, tuple[int, int]] = "llama3-8b",
            per_1024: Sequence[int] = DEFAULT_K_PER_1024,
            sm_budgets: Sequence[int] = DEFAULT_SM_BUDGETS, iters: int | None = None,
            warmup: int | None = None, progress: bool = True) -> dict:
    """Time each projection type's GEMV and compensated GEMV over the k grid.

    Args:
        device: ``cuda`` (what the result is for) or ``cpu`` (the same logic,
            CPU kernels; useful to try the tool, not to deploy its numbers).
        bits, group_size, residual_bits: the packed format being tuned.
        shapes: a preset name (``llama3-8b``, ``smollm2-135m``) or a mapping
            projection name -> (out_features N, in_features K).
        per_1024: the k grid, as channels per 1024 input channels.
        sm_budgets: the ``sm_budget`` values timed at each k > 0; the fastest
            is kept (``compensated_us``, ``sm_budget``), all are recorded
            (``by_sm_budget``).
        iters, warmup: timed and untimed calls per point (device defaults).

    Returns:
        JSON-ready ``{"meta", "format", "shapes", "projections": {name:
        {"N", "K", "base_us", "k", "compensated_us", "sm_budget",
        "by_sm_budget"}}}``.
    """
    sm_budgets = list(dict.fromkeys(int(b) for b in sm_budgets)) or [0]
    if any(b < 0 for b in sm_budgets):
        raise ValueError(f"SM budgets must be >= 0 (0 = automatic), got {sm_budgets}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if isinstance(shapes, str):
        if shapes not in SHAPE_PRESETS:
            raise ValueError(f"unknown shape preset {shapes!r}; have {sorted(SHAPE_PRESETS)}")
        preset, shapes = shapes, SHAPE_PRESETS[shapes]
    else:
        preset = "custom"
    from . import ops  # registers the ops

    dtype = torch.float16 if device == "cuda" else torch.float32
    iters = iters or (200 if device == "cuda" else 10)
    warmup = warmup if warmup is not None else (20 if device == "cuda" else 2)
    gen = torch.Generator().manual_seed(0)
    by_shape: dict[tuple[int, int], dict] = {}
    unique = list(dict.fromkeys(shapes.values()))
    bar = _progress(len(unique) * (1 + len(per_1024) * len(sm_budgets)), progress, "tune")
    for N, K in unique:
        wargs, _ = packed_layer(N, K, bits, group_size, dtype, device, gen)
        residual, rscales = residual_store(N, K, residual_bits, device, gen)
        x = torch.randn(1, K, generator=gen).to(device, dtype)
        base = time_op(lambda: ops.quantized_matmul(x, *wargs), device, iters, warmup)
        bar.update(1)
        ks = k_grid(K, per_1024)
        by_budget: dict[str, list[float]] = {}
        for b in sm_budgets:
            by_budget[str(b)] = []
            for k in ks:
                t = time_op(lambda: ops.compensated_linear(
                    x, *wargs, residual, rscales, residual_bits, k, None, b),
                    device, iters, warmup)
                by_budget[str(b)].append(t * 1e6)
                bar.update(1)
        best = [min(sm_budgets, key=lambda b: by_budget[str(b)][i]) for i in range(len(ks))]
        by_shape[(N, K)] = {"N": N, "K": K, "base_us": base * 1e6, "k": ks,
                            "compensated_us": [by_budget[str(b)][i] for i, b in enumerate(best)],
                            "sm_budget": [0 if k == 0 else b for k, b in zip(ks, best)],
                            "by_sm_budget": by_budget}
    bar.close()
    return {"meta": run_metadata(device), "iters": iters, "warmup": warmup,
            "format": {"bits": bits, "group_size": group_size, "residual_bits": residual_bits},
            "shapes": preset,
            "projections": {name: dict(by_shape[shape]) for name, shape in shapes.items()}}


def overhead_curve(projection: Mapping) -> list[tuple[int, float]]:
    """(k, overhead in µs over the GEMV alone), made non-decreasing in k and
    non-negative: timing noise must not make a larger k look cheaper, and k = 0
    costs nothing (``compensated_linear`` with k = 0 is the GEMV itself)."""
    curve, worst = [], 0.0
    for k, t in sorted(zip(projection["k"], projection["compensated_us"])):
        worst = 0.0 if k == 0 else max(worst, t - projection["base_us"], 0.0)
        curve.append((k, worst))
    if not curve or curve[0][0] != 0:
        curve.insert(0, (0, 0.0))
    return curve


def choose_k(projections: Mapping[str, Mapping], target: float,
             weights: Mapping[str, float] | None = None) -> dict:
    """Spend ``target`` x the summed GEMV time on compensation overhead.

    Greedy over the measured grids: repeatedly take the next k step of the
    projection that buys the most (weighted) share of its input channels per
    µs of extra time, while the summed overhead stays within the budget; ties
    go to the projection with more input channels (the large projections carry
    most of a layer's error). A step that costs no measurable time is always
    taken first.

    Args:
        projections: ``measure(...)["projections"]``.
        target: allowed slowdown of the summed GEMVs, e.g. 0.025 for 2.5 %.
        weights: optional value of a channel share per projection (default 1
            each; 0 = never compensate it). notebooks/04_layer_gain.ipynb found
            ``down_proj`` and ``k_proj`` gain most per channel and ``v_proj``
            nothing on SmolLM2, e.g. ``{"down_proj": 2, "k_proj": 2, "v_proj": 0}``.

    Returns:
        ``{"target", "k": {name: k}, "fraction": {name: k / K}, "sm_budget":
        {name: thread-block cap measured fastest at that k}, "budget_us",
        "overhead_us", "base_us", "predicted_slowdown"}``.
    """
    if not (target >= 0 and math.isfinite(target)):
        raise ValueError(f"target slowdown must be a finite number >= 0, got {target}")
    curves = {name: overhead_curve(p) for name, p in projections.items()}
    base = sum(p["base_us"] for p in projections.values())
    budget = target * base
    step = {name: 0 for name in projections}
    spent = 0.0
    while True:
        best, best_key = None, None
        for name, curve in curves.items():
            i = step[name]
            if i + 1 >= len(curve):
                continue
            (k0, t0), (k1, t1) = curve[i], curve[i + 1]
            cost = t1 - t0
            if spent + cost > budget:
                continue
            gain = (weights or {}).get(name, 1.0) * (k1 - k0) / projections[name]["K"]
            if gain <= 0:  # weight 0: never compensate this projection
                continue
            key = (math.inf if cost <= 0 else gain / cost, projections[name]["K"])
            if best_key is None or key > best_key:
                best, best_key = name, key
        if best is None:
            break
        i = step[best]
        spent += curves[best][i + 1][1] - curves[best][i][1]
        step[best] = i + 1
    ks = {name: curves[name][step[name]][0] for name in projections}
    return {"target": target, "k": ks,
            "fraction": {name: ks[name] / projections[name]["K"] for name in projections},
            "sm_budget": {name: _sm_budget_at(projections[name], ks[name]) for name in projections},
            "budget_us": budget, "overhead_us": spent, "base_us": base,
            "predicted_slowdown": (base + spent) / base if base > 0 else 1.0}


def _sm_budget_at(projection: Mapping, k: int) -> int:
    """The measured-fastest sm_budget at ``k`` (0, automatic, for k = 0 or a
    measurement without budgets)."""
    budgets = projection.get("sm_budget")
    if k == 0 or not budgets:
        return 0
    return int(dict(zip(projection["k"], budgets)).get(k, 0))


def tune(measurement: dict, targets: Sequence[float] = DEFAULT_TARGETS,
         weights: Mapping[str, float] | None = None) -> dict:
    """The config file's content: the measurement plus a choice per target."""
    return {"format_version": CONFIG_FORMAT, **measurement,
            "weights": dict(weights or {}),
            "targets": {_target_key(t): choose_k(measurement["projections"], t, weights)
                        for t in targets}}


def default_config_path(config: Mapping) -> Path:
    """``configs/<device>_<shapes>_w<bits>g<group>r<rbits>.json``."""
    from .benchmarking import REPO_ROOT

    slug = "".join(c if c.isalnum() else "-" for c in config["meta"]["device"].lower())
    slug = "-".join(p for p in slug.split("-") if p)
    f = config["format"]
    return (REPO_ROOT / "configs" / f"{slug}_{config['shapes']}_w{f['bits']}g{f['group_size']}"
            f"r{f['residual_bits']}.json")


def write_config(config: Mapping, path: str | Path, overwrite: bool = False) -> Path:
    """Write a tune config atomically; refuse to replace one unless ``overwrite``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(dict(config), path, overwrite=overwrite)
    return path


def load_config(path: str | Path, target: float | str | None = None) -> dict[str, float]:
    """k per projection type, as fractions of input channels, from a tune
    config, for ``target`` (a slowdown such as 0.025 or ``"2.5%"``; default:
    the smallest target in the file). The mapping suits
    :func:`qdec.patch.configure`'s ``k``.

    Raises:
        FileNotFoundError / ValueError naming the file and what is wrong.
    """
    path = Path(path)
    targets = _read_targets(path)
    return _fractions(path, targets, _chosen_key(targets, target))


def load_sm_budgets(path: str | Path, target: float | str | None = None) -> dict[str, int]:
    """The ``sm_budget`` per projection type for ``target`` (as
    :func:`load_config`), for :func:`qdec.patch.configure`'s ``sm_budget``;
    empty for a config written before budgets were tuned."""
    path = Path(path)
    targets = _read_targets(path)
    key = _chosen_key(targets, target)
    budgets = _target(path, targets, key).get("sm_budget") or {}
    if not isinstance(budgets, dict) or not all(
            isinstance(v, int) and v >= 0 for v in budgets.values()):
        raise ValueError(f"{path}: target {key} has an invalid 'sm_budget' mapping "
                         f"(projection -> integer >= 0)")
    return dict(budgets)


def load_targets(path: str | Path, targets: Sequence[float | str] | None = None
                 ) -> dict[str, dict[str, float]]:
    """:func:`load_config` for each of ``targets`` (default: every target in
    the file, smallest first), reading the file once; keys as in the file
    (``"2.5%"``)."""
    path = Path(path)
    stored = _read_targets(path)
    keys = (sorted(stored, key=_parse_target) if not targets
            else [_target_key(_parse_target(t)) for t in targets])
    return {key: _fractions(path, stored, key) for key in keys}


def _read_targets(path: Path) -> dict:
    """The ``targets`` object of a tune config, with the file's format checked."""
    if not path.is_file():
        raise FileNotFoundError(f"tune config {path} does not exist (write one with qdec tune)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format_version") != CONFIG_FORMAT:
        raise ValueError(f"{path}: not a qdec tune config (format_version "
                         f"{config.get('format_version') if isinstance(config, dict) else None!r}"
                         f", expected {CONFIG_FORMAT!r})")
    targets = config.get("targets") or {}
    if not targets:
        raise ValueError(f"{path}: has no targets")
    return targets


def _chosen_key(targets: dict, target: float | str | None) -> str:
    """The key of ``target`` in a config's targets (default: the smallest)."""
    if target is None:
        return min(targets, key=_parse_target)
    return _target_key(_parse_target(target))


def _target(path: Path, targets: dict, key: str) -> dict:
    """Target ``key``'s entry, or an error naming the targets the file has."""
    if key not in targets:
        raise ValueError(f"{path}: no target {key}; the file has {sorted(targets, key=_parse_target)}")
    return targets[key]


def _fractions(path: Path, targets: dict, key: str) -> dict[str, float]:
    """The validated ``fraction`` mapping of target ``key``."""
    fractions = _target(path, targets, key).get("fraction")
    if not isinstance(fractions, dict) or not all(
            isinstance(v, (int, float)) and 0 <= v <= 1 for v in fractions.values()):
        raise ValueError(f"{path}: target {key} has no valid 'fraction' mapping "
                         f"(projection -> share of input channels in [0, 1])")
    return {name: float(v) for name, v in fractions.items()}


def parse_weights(text: str) -> dict[str, float]:
    """``"down_proj=2,v_proj=0"`` -> ``{"down_proj": 2.0, "v_proj": 0.0}``."""
    weights: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or weights.get(name.strip(), 0) < 0:
            raise ValueError(f"weights must look like proj=value,... with value >= 0, "
                             f"got {item!r}")
    return weights


def _target_key(target: float) -> str:
    return f"{100 * target:g}%"


def _parse_target(target: float | str) -> float:
    """0.025, "0.025" or "2.5%" -> 0.025."""
    if isinstance(target, str):
        text = target.strip()
        try:
            return float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"target {target!r} is not a number or percentage") from None
    return float(target)


def summary_table(config: Mapping) -> str:
    """Markdown: per target, k (and % of channels, and the SM budget when not
    automatic) per projection and the predicted slowdown of the summed GEMVs."""
    names = list(config["projections"])
    lines = ["| target | " + " | ".join(names) + " | predicted slowdown |",
             "|---|" + "---|" * (len(names) + 1)]
    for key, choice in config["targets"].items():
        budgets = choice.get("sm_budget", {})
        cells = [f"{choice['k'][n]} ({choice['fraction'][n]:.2%})"
                 + (f", {budgets[n]} CTAs" if budgets.get(n) else "") for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) +
                     f" | {choice['predicted_slowdown']:.4f}x |")
    return "\n".join(lines)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="point")
