"""Spend a fetch budget where it pays: k per linear from calibration data.

Every decoder linear of a patched model (:func:`qdec.patch.patch`) fetches
``k`` rows of its residual store per token, ``fetched_bytes_per_channel``
bytes each. Given a budget in bytes fetched per token (or the bytes that one
uniform fraction of channels costs), this module picks ``k`` per linear to
maximize the estimated reduction in model loss:

1. :func:`measure_gain_curves` runs the quantized model (no compensation) on
   calibration tokens, forward and backward, and for each linear measures how
   much of its output error the dynamic policy removes at a grid of k. The
   error the compensation leaves at k is ``e_t(k) = sum_{j not in S_k(t)}
   x_t[j] R[:, j]`` (the residual of the channels not fetched; ``S_k(t)`` is
   the k largest ``|x_t[j]|``, as the dynamic policy selects them). Output
   errors of different linears are made comparable by weighting them with the
   loss gradient ``g_t`` at the linear's output: ``1/2 sum_t sum_i g_ti^2
   e_ti^2`` is the diagonal empirical-Fisher estimate of the loss increase
   the error causes (``fisher``, the default); ``fisher_full`` keeps the
   correlations between a linear's outputs, ``1/2 sum_t (g_t . e_t)^2`` (the
   squared first-order loss change per token); ``output`` is the unweighted
   ``sum_t ||e_t||^2``, comparable only within one linear.
2. :func:`allocate` spends the budget on the upper concave hull of each curve
   by decreasing gain per byte (the Lagrangian solution of the relaxed
   problem), and fills what the hull steps leave with whole channels, so the
   chosen k map never exceeds the budget and leaves less than one channel's
   bytes unspent on any linear that could still grow.

The k map (full linear name -> channel count) is stored in a checkpoint's
``quantization_config.k`` (:func:`qdec.formats.qdec_checkpoint.write_k_map`)
and in a ``qdec tune`` config (:func:`tune_config_for`), which every loader
reads: the patch path, ``qdec generate``/``eval``, ``qdec_infer`` and the vLLM
plugin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .patch import configure, qdec_layers

# k grid of the gain curves, as fractions of a linear's input channels: fine
# near the budgets that matter (1-5 % uniform) and up to 25 % so the
# allocation can give the linears that pay most several times the average.
DEFAULT_GRID = (0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1,
                0.125, 0.15, 0.2, 0.25)
GAIN_MEASURES = ("fisher", "fisher_full", "output")


@dataclasses.dataclass
class GainCurve:
    """Estimated gain of compensating ``k[i]`` channels per token of one linear.

    ``gain[i]`` is the reduction of the chosen error measure at ``k[i]``
    against ``k = 0`` (``k[0] == 0``, ``gain[0] == 0``), per calibration token.
    """

    k: list[int]
    gain: list[float]
    bytes_per_channel: int
    in_features: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "GainCurve":
        return cls([int(v) for v in d["k"]], [float(v) for v in d["gain"]],
                   int(d["bytes_per_channel"]), int(d["in_features"]))


def k_grid(in_features: int, fractions: Sequence[float] = DEFAULT_GRID) -> list[int]:
    """Distinct ascending channel counts of the grid, starting at 0."""
    return sorted({0} | {min(in_features, max(1, round(f * in_features))) for f in fractions})


@torch.no_grad()
def _accumulate(x: Tensor, g: Tensor, rt: Tensor, ks: Sequence[int],
                sums: dict[str, Tensor]) -> None:
    """Add one batch of tokens' error measures at each k of ``ks`` to ``sums``.

    ``x`` [T, K] the linear's inputs, ``g`` [T, N] the loss gradient at its
    output, ``rt`` [K, N] the decoded residual (row j = ``R[:, j]``)."""
    order = x.abs().topk(ks[-1], dim=1).indices if ks[-1] > 0 else None
    err = x @ rt  # the error left at k = 0 (as the residual estimates it)
    g2 = g.square()
    fisher = torch.empty(len(ks), dtype=torch.float64)
    fisher_full = torch.empty(len(ks), dtype=torch.float64)
    output = torch.empty(len(ks), dtype=torch.float64)
    prev = 0
    for i, k in enumerate(ks):
        if k > prev:
            chans = order[:, prev:k]
            err -= F.embedding_bag(chans, rt, per_sample_weights=x.gather(1, chans), mode="sum")
            prev = k
        e2 = err.square()
        fisher[i] = 0.5 * float((g2 * e2).sum(dtype=torch.float64))
        fisher_full[i] = 0.5 * float((g * err).sum(1).square().sum(dtype=torch.float64))
        output[i] = float(e2.sum(dtype=torch.float64))
    sums["fisher"] = sums.get("fisher", 0) + fisher
    sums["fisher_full"] = sums.get("fisher_full", 0) + fisher_full
    sums["output"] = sums.get("output", 0) + output
    sums["tokens"] = sums.get("tokens", 0) + x.shape[0]


def measure_gain_curves(model: nn.Module, calib_ids: Tensor,
                        fractions: Sequence[float] = DEFAULT_GRID, progress: bool = True
                        ) -> dict[str, dict[str, GainCurve]]:
    """Gain curves of every compensable ``QDECLinear`` of ``model`` on
    calibration tokens (module docstring), for each measure of
    :data:`GAIN_MEASURES`.

    Args:
        model: a patched transformers causal LM (:func:`qdec.patch.patch`).
        calib_ids: int64 ``[samples, length]`` calibration windows (never the
            evaluation text).
        fractions: the k grid as fractions of each linear's input channels.

    Returns:
        ``{measure: {linear name: GainCurve}}``; linears without a residual
        store are left out (they cannot be compensated).

    Raises:
        ValueError: ``calib_ids`` is not a 2-D integer tensor, or the model
            has no linear with a residual store.
    """
    from tqdm.auto import tqdm

    if calib_ids.dim() != 2 or calib_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"calib_ids must be an int64 [samples, length] tensor, got "
                         f"{calib_ids.dtype} {tuple(calib_ids.shape)}")
    layers = {n: m for n, m in qdec_layers(model) if m.residual is not None}
    if not layers:
        raise ValueError("the model has no QDECLinear with a residual store: nothing to allocate")
    grids = {n: k_grid(m.in_features, fractions) for n, m in layers.items()}
    saved = {n: (m.k, m.simulate_dense) for n, m in layers.items()}
    sums: dict[str, dict[str, Tensor]] = {n: {} for n in layers}
    inputs: dict[str, Tensor] = {}
    hooks = []

    def make_hooks(name: str, layer):
        def pre(mod, args):
            inputs[name] = mod.layer_input(args[0].detach()).reshape(-1, mod.in_features).float()

        def post(mod, args, out):
            def on_grad(g, name=name, mod=mod):
                _accumulate(inputs.pop(name), g.detach().reshape(-1, mod.out_features).float(),
                            mod.dense_weights()[1], grids[name], sums[name])
            out.register_hook(on_grad)

        return [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]

    requires = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        configure(model, k=0, simulate_dense=True)
        for name, layer in layers.items():
            hooks += make_hooks(name, layer)
        embed = model.get_input_embeddings()
        for row in tqdm(calib_ids, desc="gain curves", disable=not progress, unit="window"):
            ids = row.long().unsqueeze(0)
            with torch.enable_grad():
                h = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=h, use_cache=False).logits
                # Summed (not mean) NLL: g_t is then each token's own loss gradient.
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
                loss.backward()
            inputs.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
        for n, m in layers.items():
            m.k, m.simulate_dense = saved[n]
    curves: dict[str, dict[str, GainCurve]] = {m: {} for m in GAIN_MEASURES}
    for name, layer in layers.items():
        s = sums[name]
        for measure in GAIN_MEASURES:
            per_token = s[measure] / s["tokens"]
            curves[measure][name] = GainCurve(grids[name], (per_token[0] - per_token).tolist(),
                                              layer.fetched_bytes_per_channel, layer.in_features)
    return curves


def uniform_bytes(curves: Mapping[str, GainCurve], fraction: float) -> int:
    """Bytes fetched per token when every linear compensates ``fraction`` of
    its input channels (k rounded as :attr:`qdec.nn.QDECLinear.k` rounds)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return sum(round(fraction * c.in_features) * c.bytes_per_channel for c in curves.values())


def fetched_bytes(k_map: Mapping[str, int], curves: Mapping[str, GainCurve]) -> int:
    """Bytes fetched per token by a k map."""
    return sum(int(k) * curves[name].bytes_per_channel for name, k in k_map.items())


def _hull(curve: GainCurve) -> list[tuple[int, float]]:
    """Upper concave hull of (k, gain), from k = 0; points where the gain does
    not rise are dropped (a noisy curve must not buy channels that lose)."""
    pts: list[tuple[int, float]] = []
    for k, g in zip(curve.k, curve.gain):
        if pts and g <= pts[-1][1]:
            continue
        while len(pts) >= 2:
            (k0, g0), (k1, g1) = pts[-2], pts[-1]
            # drop the middle point when it lies on or below the chord
            if (g1 - g0) * (k - k0) <= (g - g0) * (k1 - k0):
                pts.pop()
            else:
                break
        pts.append((k, g))
    return pts


def allocate(curves: Mapping[str, GainCurve], budget_bytes: int) -> dict[str, int]:
    """k per linear maximizing the summed (hull-interpolated) gain within
    ``budget_bytes`` fetched per token.

    Hull segments of all linears are taken by decreasing gain per byte (the
    Lagrangian solution); a segment that does not fit whole is taken in as
    many whole channels as fit, and its linear grows no further (its next
    segments pay less). So the result's bytes never exceed the budget, and
    every linear below its largest useful k would need more bytes than are
    left.

    Raises:
        ValueError: a negative budget, or a curve that does not start at k = 0
            or has a non-positive ``bytes_per_channel``.
    """
    if budget_bytes < 0:
        raise ValueError(f"budget must be >= 0 bytes per token, got {budget_bytes}")
    segments = []
    for name, c in curves.items():
        if not c.k or c.k[0] != 0 or c.bytes_per_channel <= 0:
            raise ValueError(f"gain curve of {name} must start at k = 0 and have positive "
                             f"bytes per channel, got k={c.k[:3]}..., {c.bytes_per_channel} B")
        hull = _hull(c)
        for (k0, g0), (k1, g1) in zip(hull, hull[1:]):
            slope = (g1 - g0) / ((k1 - k0) * c.bytes_per_channel)
            segments.append((-slope, -c.in_features, name, k0, k1))
    segments.sort()
    k_map = {name: 0 for name in curves}
    closed: set[str] = set()
    left = int(budget_bytes)
    for _, _, name, k0, k1 in segments:
        if name in closed or k_map[name] != k0:
            continue
        per = curves[name].bytes_per_channel
        take = min(k1 - k0, left // per)
        k_map[name] += take
        left -= take * per
        if k_map[name] < k1:
            closed.add(name)
    return k_map


def parse_budget(text: str) -> tuple[str, float]:
    """``"2%"`` or ``"0.02"`` -> ``("fraction", 0.02)`` (the bytes of that
    uniform fraction); ``"40000B"`` -> ``("bytes", 40000)`` per token."""
    t = text.strip()
    try:
        if t.upper().endswith("B"):
            value = float(t[:-1])
            if value < 0 or value != int(value):
                raise ValueError
            return "bytes", int(value)
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"budget {text!r} must be a fraction (0.02 or 2%) or bytes per token "
                         f"(40000B)") from None
    if not 0 <= value <= 1:
        raise ValueError(f"budget fraction must be in [0, 1], got {text!r}")
    return "fraction", value


def budget_bytes(curves: Mapping[str, GainCurve], budget: tuple[str, float]) -> int:
    """The bytes per token of a budget from :func:`parse_budget`."""
    kind, value = budget
    return int(value) if kind == "bytes" else uniform_bytes(curves, value)


def uniform_k_map(curves: Mapping[str, GainCurve], budget: tuple[str, float]) -> dict[str, int]:
    """The uniform allocation a budget is compared with: the fraction's own
    k per linear (rounded as QDECLinear rounds; exactly the budget's bytes),
    or for a bytes budget the largest common fraction ``B / all bytes``
    rounded down per linear (never above the budget)."""
    kind, value = budget
    if kind == "fraction":
        return {n: round(value * c.in_features) for n, c in curves.items()}
    full = sum(c.in_features * c.bytes_per_channel for c in curves.values())
    f = min(1.0, value / full) if full else 0.0
    return {n: math.floor(f * c.in_features) for n, c in curves.items()}


def tune_config_for(k_maps: Mapping[str, Mapping[str, int]],
                    curves: Mapping[str, GainCurve], meta: Mapping | None = None) -> dict:
    """A ``qdec tune`` config (format ``qdec-tune/1``) whose targets are k maps:
    ``{key: {"k": {linear: k}, "fraction": {linear: k / K}, "sm_budget": {},
    "fetched_bytes_per_token"}}``, read by ``qdec eval/generate
    --tune-config``, ``qdec_infer --tune-config`` and ``QDEC_TUNE_CONFIG``
    (full linear names match before projection names everywhere). ``key``
    must be a target as the tune format spells it (``"2%"``: here the budget
    as the uniform fraction whose bytes it equals)."""
    from .tune import CONFIG_FORMAT, _parse_target, _target_key

    targets = {}
    for key, k_map in k_maps.items():
        targets[_target_key(_parse_target(key))] = {
            "k": dict(k_map),
            "fraction": {n: k / curves[n].in_features for n, k in k_map.items()},
            "sm_budget": {},
            "fetched_bytes_per_token": fetched_bytes(k_map, curves)}
    return {"format_version": CONFIG_FORMAT, "source": "qdec.budget", **dict(meta or {}),
            "targets": targets}


def estimated_gain(k_map: Mapping[str, int], curves: Mapping[str, GainCurve]) -> float:
    """Summed gain of a k map, linearly interpolated on each curve's grid."""
    total = 0.0
    for name, k in k_map.items():
        c = curves[name]
        i = next((i for i, kk in enumerate(c.k) if kk >= k), len(c.k) - 1)
        if c.k[i] == k or i == 0:
            total += c.gain[i]
        else:
            k0, k1, g0, g1 = c.k[i - 1], c.k[i], c.gain[i - 1], c.gain[i]
            total += g0 + (g1 - g0) * (min(k, k1) - k0) / (k1 - k0)
    return total if math.isfinite(total) else float("nan")


def allocate_checkpoint(path: str, calib_ids: Tensor, budget: str, gain_measure: str = "fisher",
                        fractions: Sequence[float] = DEFAULT_GRID, progress: bool = True) -> dict:
    """Measure a QDEC checkpoint's gain curves on ``calib_ids``, allocate
    ``budget`` (:func:`parse_budget`) and store the k map in the checkpoint
    (:func:`qdec.formats.qdec_checkpoint.write_k_map`), where every loader
    finds it. What ``qdec allocate`` runs.

    Returns:
        ``{"k": {linear: k}, "budget", "budget_bytes", "fetched_bytes_per_token",
        "gain_measure", "calibration_tokens", "estimated_gain",
        "uniform_estimated_gain"}`` (all but ``k`` also recorded in the
        checkpoint's ``qdec.k_allocation``).

    Raises:
        ValueError: a malformed budget or gain measure, or a checkpoint
            without a residual store.
    """
    from .formats.qdec_checkpoint import write_k_map
    from .patch import load_patched_checkpoint

    parsed = parse_budget(budget)
    if gain_measure not in GAIN_MEASURES:
        raise ValueError(f"gain measure must be one of {GAIN_MEASURES}, got {gain_measure!r}")
    model = load_patched_checkpoint(str(path), k=0)
    curves = measure_gain_curves(model, calib_ids, fractions, progress)[gain_measure]
    total = budget_bytes(curves, parsed)
    k_map = allocate(curves, total)
    allocation = {"budget": budget, "budget_bytes": total,
                  "fetched_bytes_per_token": fetched_bytes(k_map, curves),
                  "gain_measure": gain_measure, "calibration_tokens": int(calib_ids.numel()),
                  "estimated_gain": estimated_gain(k_map, curves),
                  "uniform_estimated_gain": estimated_gain(uniform_k_map(curves, parsed), curves)}
    write_k_map(path, k_map, allocation)
    return {"k": k_map, **allocation}


def allocation_summary(k_map: Mapping[str, int], curves: Mapping[str, GainCurve],
                       depth_groups: int = 3) -> dict[str, dict[str, float]]:
    """Where a k map spends its bytes: the share of the fetched bytes and the
    mean k / K per projection type (``q_proj``...) and per depth group
    (``layers 0-9``...; names ``model.layers.<i>.<...>``)."""
    total = fetched_bytes(k_map, curves) or 1
    layer_of = {n: int(n.split("layers.")[1].split(".")[0]) for n in k_map if "layers." in n}
    n_layers = max(layer_of.values(), default=-1) + 1
    size = -(-n_layers // depth_groups) if n_layers else 1

    def group(name: str) -> str:
        if name not in layer_of:
            return "other"
        g = layer_of[name] // size
        return f"layers {g * size}-{min(n_layers, (g + 1) * size) - 1}"

    out: dict[str, dict[str, float]] = {}
    for key_of, label in ((lambda n: n.rsplit(".", 1)[-1], "projection"), (group, "depth")):
        acc: dict[str, list[float]] = {}
        for name, k in k_map.items():
            c = curves[name]
            a = acc.setdefault(key_of(name), [0.0, 0.0, 0.0])
            a[0] += k * c.bytes_per_channel
            a[1] += k / c.in_features
            a[2] += 1
        out[label] = {key: {"byte_share": a[0] / total, "mean_fraction": a[1] / a[2]}
                      for key, a in acc.items()}
    return out
