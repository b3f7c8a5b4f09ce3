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
3. :func:`fit_group_scales` measures, with a few forward passes on calibration
   tokens, how far the curves' predicted gains are from real loss drops per
   projection type and depth group, and :func:`rescale_curves` corrects them.
4. :func:`plan_budgets` scores candidate k maps (uniform, allocated on the raw
   and on the rescaled curves, a blend) on calibration loss and keeps the
   best, uniform on ties, so an allocation is used only where calibration
   says it beats uniform.

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


def gain_at(curve: GainCurve, k: int) -> float:
    """The curve's gain at ``k`` channels, linearly interpolated on its grid
    (held at the last grid point beyond it)."""
    i = next((i for i, kk in enumerate(curve.k) if kk >= k), len(curve.k) - 1)
    if curve.k[i] == k or i == 0 or k > curve.k[i]:
        return curve.gain[i]
    k0, k1, g0, g1 = curve.k[i - 1], curve.k[i], curve.gain[i - 1], curve.gain[i]
    return g0 + (g1 - g0) * (k - k0) / (k1 - k0)


def _hull(curve: GainCurve, start: int = 0) -> list[tuple[int, float]]:
    """Upper concave hull of (k, gain) from k = ``start`` (interpolated there);
    points where the gain does not rise are dropped (a noisy curve must not
    buy channels that lose)."""
    points = [(start, gain_at(curve, start))] + [(k, g) for k, g in zip(curve.k, curve.gain)
                                                 if k > start]
    pts: list[tuple[int, float]] = []
    for k, g in points:
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


def allocate(curves: Mapping[str, GainCurve], budget_bytes: int,
             floor: Mapping[str, int] | None = None) -> dict[str, int]:
    """k per linear maximizing the summed (hull-interpolated) gain within
    ``budget_bytes`` fetched per token.

    Hull segments of all linears are taken by decreasing gain per byte (the
    Lagrangian solution); a segment that does not fit whole is taken in as
    many whole channels as fit, and its linear grows no further (its next
    segments pay less). So the result's bytes never exceed the budget, and
    every linear below its largest useful k would need more bytes than are
    left. ``floor`` (linear -> k) is given first and the rest of the budget
    is allocated above it (a blend of a fixed map, e.g. half the uniform one,
    with the allocation).

    Raises:
        ValueError: a negative budget, a floor above the budget, or a curve
            that does not start at k = 0 or has a non-positive
            ``bytes_per_channel``.
    """
    if budget_bytes < 0:
        raise ValueError(f"budget must be >= 0 bytes per token, got {budget_bytes}")
    start = {name: int((floor or {}).get(name, 0)) for name in curves}
    left = int(budget_bytes) - fetched_bytes(start, curves)
    if left < 0:
        raise ValueError(f"the floor fetches {budget_bytes - left} bytes per token, more than "
                         f"the budget of {budget_bytes}")
    segments = []
    for name, c in curves.items():
        if not c.k or c.k[0] != 0 or c.bytes_per_channel <= 0:
            raise ValueError(f"gain curve of {name} must start at k = 0 and have positive "
                             f"bytes per channel, got k={c.k[:3]}..., {c.bytes_per_channel} B")
        hull = _hull(c, start[name])
        for (k0, g0), (k1, g1) in zip(hull, hull[1:]):
            slope = (g1 - g0) / ((k1 - k0) * c.bytes_per_channel)
            segments.append((-slope, -c.in_features, name, k0, k1))
    segments.sort()
    k_map = dict(start)
    closed: set[str] = set()
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
    total = sum(gain_at(curves[name], k) for name, k in k_map.items())
    return total if math.isfinite(total) else float("nan")


# ------------------------------------------------ loss-calibrated allocation
#
# The gain curves estimate each linear's loss change from its own output
# error at k = 0. Measured against real loss changes they are biased by depth
# and projection type (the first estimate spent ~60 % of the bytes on layers
# 0-9 and lost to uniform on RTN W3 at 5 %): an error's effect on the loss is
# not additive through the remaining layers. So the curves are rescaled per
# group of linears with a few forward passes at the operating point
# (fit_group_scales), and every allocation is checked against uniform on
# calibration loss before it is used (select_k_map).


def _layer_index(name: str) -> int | None:
    """``model.layers.<i>.…`` -> i (None for a name outside the decoder layers)."""
    return int(name.split("layers.")[1].split(".")[0]) if "layers." in name else None


def depth_groups_of(names: Sequence[str], groups: int = 3) -> dict[str, str]:
    """Each linear's depth group label (``layers 0-9``…: ``groups`` equal runs
    of decoder layers; ``other`` outside them)."""
    layer_of = {n: _layer_index(n) for n in names}
    n_layers = max((i for i in layer_of.values() if i is not None), default=-1) + 1
    size = -(-n_layers // groups) if n_layers else 1
    out = {}
    for name, i in layer_of.items():
        if i is None:
            out[name] = "other"
        else:
            g = i // size
            out[name] = f"layers {g * size}-{min(n_layers, (g + 1) * size) - 1}"
    return out


def linear_groups(names: Sequence[str], depth_groups: int = 3) -> dict[str, list[str]]:
    """The groups :func:`fit_group_scales` measures: one per projection type
    (``proj:down_proj``…) and one per depth group (``depth:layers 0-9``…);
    every linear is in exactly one group of each kind."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(f"proj:{name.rsplit('.', 1)[-1]}", []).append(name)
    for name, g in depth_groups_of(names, depth_groups).items():
        groups.setdefault(f"depth:{g}", []).append(name)
    return groups


@torch.no_grad()
def calibration_nll(model: nn.Module, windows: Tensor, k_map: Mapping[str, int]) -> float:
    """Mean next-token NLL (nats per predicted token) of ``model`` on
    calibration ``windows`` (int64 ``[n, length]``) with ``k_map`` applied,
    dynamic policy, every token compensated as at decode (dense simulation);
    the layers' settings are restored afterwards. Linears not in ``k_map``
    run at k = 0."""
    from .eval.perplexity import window_nll

    layers = dict(qdec_layers(model))
    saved = {n: (m.k, m.policy, m.simulate_dense, m.compensate_prefill)
             for n, m in layers.items()}
    try:
        for name, m in layers.items():
            m.k, m.policy = int(k_map.get(name, 0)), "dynamic"
            m.simulate_dense = m.compensate_prefill = True
        total = 0.0
        for row in windows:
            ids = row.long().unsqueeze(0)
            total += float(window_nll(model(ids, use_cache=False).logits, ids).sum())
    finally:
        for name, m in layers.items():
            m.k, m.policy, m.simulate_dense, m.compensate_prefill = saved[name]
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def fit_group_scales(model: nn.Module, curves: Mapping[str, GainCurve], calib_ids: Tensor,
                     fraction: float = 0.02, depth_groups: int = 3, min_scale: float = 0.05,
                     progress: bool = True) -> dict:
    """Measure how far the curves' gains are from real loss changes, per group
    of linears (:func:`linear_groups`), at the operating point ``fraction``
    uniform: for each group, the calibration loss drop of doubling its
    linears' k (at least one more channel) against the gain its curves
    predict for the same step. ``1 + 7 + depth_groups`` forward passes over
    ``calib_ids``.

    A linear's scale is ``s_proj * s_depth / s_all`` (``s_all``: all groups'
    measured over predicted drop), so the rescaled curves (:func:`rescale_curves`)
    estimate loss changes. A group whose measured drop is below ``min_scale``
    times ``s_all`` (noise, or a real zero) keeps that floor, so one
    measurement cannot shut a whole projection type or depth out.

    Returns:
        ``{"fraction", "base_nll", "overall_scale", "groups": {group:
        {"measured", "predicted", "scale", "bytes"}}, "scales": {linear: s}}``.
    """
    from tqdm.auto import tqdm

    base = {n: round(fraction * c.in_features) for n, c in curves.items()}
    groups = linear_groups(list(curves), depth_groups)
    bar = tqdm(total=1 + len(groups), desc="group scales", disable=not progress, unit="pass")
    base_nll = calibration_nll(model, calib_ids, base)
    bar.update()
    rows = {}
    for group, names in groups.items():
        step = dict(base)
        for n in names:
            step[n] = min(curves[n].in_features, max(base[n] + 1, 2 * base[n]))
        measured = base_nll - calibration_nll(model, calib_ids, step)
        predicted = sum(gain_at(curves[n], step[n]) - gain_at(curves[n], base[n]) for n in names)
        rows[group] = {"measured": measured, "predicted": predicted,
                       "bytes": fetched_bytes(step, curves) - fetched_bytes(base, curves)}
        bar.update()
    bar.close()
    proj = [r for g, r in rows.items() if g.startswith("proj:")]
    predicted_all = sum(r["predicted"] for r in proj)
    overall = max(sum(r["measured"] for r in proj), 0.0) / predicted_all if predicted_all > 0 \
        else 1.0
    floor = min_scale * overall if overall > 0 else min_scale
    for r in rows.values():
        r["scale"] = max(r["measured"] / r["predicted"] if r["predicted"] > 0 else 0.0, floor)
    depth = depth_groups_of(list(curves), depth_groups)
    scales = {n: rows[f"proj:{n.rsplit('.', 1)[-1]}"]["scale"] * rows[f"depth:{depth[n]}"]["scale"]
              / (overall or 1.0) for n in curves}
    return {"fraction": fraction, "base_nll": base_nll, "overall_scale": overall,
            "groups": rows, "scales": scales}


def rescale_curves(curves: Mapping[str, GainCurve], scales: Mapping[str, float]
                   ) -> dict[str, GainCurve]:
    """The curves with each linear's gains multiplied by its scale."""
    return {n: dataclasses.replace(c, gain=[g * scales[n] for g in c.gain])
            for n, c in curves.items()}


def candidate_k_maps(curves: Mapping[str, GainCurve], calibrated: Mapping[str, GainCurve],
                     budget: tuple[str, float]) -> dict[str, dict[str, int]]:
    """The k maps :func:`select_k_map` chooses among, all within the budget
    (:func:`parse_budget`): ``uniform``; ``allocated`` (the gain curves as
    measured); ``calibrated`` (the curves rescaled by :func:`fit_group_scales`);
    ``blend`` (half the uniform k of every linear, the rest allocated on the
    calibrated curves: a hedge between the two)."""
    total = budget_bytes(curves, budget)
    uniform = uniform_k_map(curves, budget)
    return {"uniform": uniform,
            "allocated": allocate(curves, total),
            "calibrated": allocate(calibrated, total),
            "blend": allocate(calibrated, total, floor={n: k // 2 for n, k in uniform.items()})}


def select_k_map(model: nn.Module, candidates: Mapping[str, Mapping[str, int]],
                 windows: Tensor, progress: bool = True) -> tuple[str, dict[str, float]]:
    """The candidate with the lowest calibration NLL on ``windows`` (calibration
    text only, never the evaluation text) and every candidate's NLL. Ties go
    to the earlier candidate, so put ``uniform`` first: an allocation is used
    only when calibration says it beats uniform. Identical maps are scored once.
    """
    from tqdm.auto import tqdm

    scores: dict[str, float] = {}
    seen: list[tuple[Mapping[str, int], float]] = []
    for name, k_map in tqdm(candidates.items(), desc="candidates", disable=not progress,
                            unit="map"):
        known = next((nll for m, nll in seen if m == k_map), None)
        scores[name] = known if known is not None else calibration_nll(model, windows, k_map)
        seen.append((k_map, scores[name]))
    best = min(scores.values())
    return next(n for n, v in scores.items() if v == best), scores


def plan_budgets(model: nn.Module, curves: Mapping[str, GainCurve], calib_ids: Tensor,
                 select_windows: Tensor, budgets: Sequence[str], progress: bool = True) -> dict:
    """The whole allocation for each budget of ``budgets`` (:func:`parse_budget`):
    fit the group scales on ``calib_ids`` once, at the median budget as a
    uniform fraction (:func:`fit_group_scales`), build the candidate k maps
    (:func:`candidate_k_maps`) and keep the one with the lowest NLL on
    ``select_windows`` (:func:`select_k_map`). Both inputs are calibration
    text; the evaluation text must never be passed here.

    Returns:
        ``{"group_scales": fit_group_scales(...), "budgets": {budget: {"chosen",
        "k", "budget_bytes", "candidates": {name: {"k", "calib_nll",
        "fetched_bytes_per_token", "estimated_gain", "calibrated_estimated_gain"}}}}}``.
    """
    parsed = {b: parse_budget(b) for b in budgets}
    full = sum(c.in_features * c.bytes_per_channel for c in curves.values())
    operating = sorted(budget_bytes(curves, p) / full for p in parsed.values())
    scales = fit_group_scales(model, curves, calib_ids, operating[len(operating) // 2],
                              progress=progress)
    calibrated = rescale_curves(curves, scales["scales"])
    plans = {}
    for spec, p in parsed.items():
        candidates = candidate_k_maps(curves, calibrated, p)
        chosen, scores = select_k_map(model, candidates, select_windows, progress)
        plans[spec] = {
            "chosen": chosen, "k": candidates[chosen], "budget_bytes": budget_bytes(curves, p),
            "candidates": {name: {"k": m, "calib_nll": scores[name],
                                  "fetched_bytes_per_token": fetched_bytes(m, curves),
                                  "estimated_gain": estimated_gain(m, curves),
                                  "calibrated_estimated_gain": estimated_gain(m, calibrated)}
                           for name, m in candidates.items()}}
    return {"group_scales": scales, "budgets": plans}


def allocate_checkpoint(path: str, calib_ids: Tensor, budget: str, gain_measure: str = "fisher",
                        fractions: Sequence[float] = DEFAULT_GRID, progress: bool = True) -> dict:
    """Measure a QDEC checkpoint's gain curves on ``calib_ids``, choose the k
    map for ``budget`` (:func:`parse_budget`) as :func:`plan_budgets` does,
    scoring the candidates on ``calib_ids`` too, and store it in the
    checkpoint (:func:`qdec.formats.qdec_checkpoint.write_k_map`), where every
    loader finds it. What ``qdec allocate`` runs.

    Returns:
        ``{"k": {linear: k}, "budget", "budget_bytes", "fetched_bytes_per_token",
        "gain_measure", "calibration_tokens", "chosen", "candidates": {name:
        {"calib_nll", "fetched_bytes_per_token", "estimated_gain"}},
        "estimated_gain", "uniform_estimated_gain"}`` (all but ``k`` also
        recorded in the checkpoint's ``qdec.k_allocation``).

    Raises:
        ValueError: a malformed budget or gain measure, or a checkpoint
            without a residual store.
    """
    from .formats.qdec_checkpoint import write_k_map
    from .patch import load_patched_checkpoint

    parse_budget(budget)
    if gain_measure not in GAIN_MEASURES:
        raise ValueError(f"gain measure must be one of {GAIN_MEASURES}, got {gain_measure!r}")
    model = load_patched_checkpoint(str(path), k=0)
    curves = measure_gain_curves(model, calib_ids, fractions, progress)[gain_measure]
    plan = plan_budgets(model, curves, calib_ids, calib_ids, [budget], progress)["budgets"][budget]
    k_map = plan["k"]
    candidates = {name: {key: v for key, v in c.items() if key != "k"}
                  for name, c in plan["candidates"].items()}
    allocation = {"budget": budget, "budget_bytes": plan["budget_bytes"],
                  "fetched_bytes_per_token": fetched_bytes(k_map, curves),
                  "gain_measure": gain_measure, "calibration_tokens": int(calib_ids.numel()),
                  "chosen": plan["chosen"], "candidates": candidates,
                  "estimated_gain": estimated_gain(k_map, curves),
                  "uniform_estimated_gain": candidates["uniform"]["estimated_gain"]}
    write_k_map(path, k_map, allocation)
    return {"k": k_map, **allocation}


def allocation_summary(k_map: Mapping[str, int], curves: Mapping[str, GainCurve],
                       depth_groups: int = 3) -> dict[str, dict[str, float]]:
    """Where a k map spends its bytes: the share of the fetched bytes and the
    mean k / K per projection type (``q_proj``...) and per depth group
    (``layers 0-9``...; names ``model.layers.<i>.<...>``)."""
    total = fetched_bytes(k_map, curves) or 1
    depth = depth_groups_of(list(k_map), depth_groups)
    out: dict[str, dict[str, float]] = {}
    for key_of, label in ((lambda n: n.rsplit(".", 1)[-1], "projection"), (depth.get, "depth")):
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
