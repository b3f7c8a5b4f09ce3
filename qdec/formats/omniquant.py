"""OmniQuant checkpoints: real-quant (packed) and fake-quant (FP16 on the grid).

**Real-quant** (``--real_quant``, formats.md §4): each linear is an AutoGPTQ
``QuantLinear`` saved with the GPTQ layout (``qweight``/``qzeros``/``scales``/
``g_idx``, 3-bit straddled, ``g_idx = k // G``) but *without* any
``quantization_config``. OmniQuant depends on an AutoGPTQ snapshot from the window
in which upstream had dropped the ``zeros -= 1`` of the packer, so these files
store raw zero points: the **v2** convention. Reading them as v1 (what an
AutoGPTQ loader would do) shifts every code by one step. Bits and group size are
not recorded anywhere in the files and must be given. :func:`read_omniquant_real_checkpoint`
is the GPTQ reader with those settings stated explicitly.

**Fake-quant** (``--save_dir`` without ``--real_quant``): a plain FP16 HF checkpoint
whose linear weights already lie on the quantization grid, ``w = (q - z) * s`` per
group, rounded to float16. :func:`recover_grid` recovers integer codes, a scale
and a zero per group so that the project's dequantization reproduces the FP16
weights exactly; a layer for which that fails for any group is reported and kept
as a dense FP16 weight (the "treat the weights as given" fallback).

Grid recovery, per group of ``G`` consecutive input channels of one row:

1. The step. Every value is an integer multiple ``M * s`` of the (unknown) step,
   up to float16 rounding, so every nonzero ``|v|`` and every gap between distinct
   values is a multiple of ``s`` (differences of a few units in the last place are
   rounding noise and ignored). Starting from the smallest of them, ``base``, try
   ``s = base / j`` for ``j = 1, 2, ...`` (largest step first): round
   ``M = round(v / s)``, refine ``s`` by least squares, and accept the first ``j``
   for which every ``v / s`` is within 0.2 of an integer and the ``M`` span at most
   ``2**bits - 1`` levels.
2. The exact scale. Float16 rounds ``M * s`` to ``v`` only for ``s`` in a narrow
   interval; intersecting those intervals over the group gives the candidates. The
   float16 values nearest the middle of the intersection are tried first, then
   float32 ones, each checked exactly: the project dequantization (the float32
   product ``M * s`` cast to float16) must give back every value, ties included.
   If some group of a layer has no float16 scale, the whole layer uses float32
   scales (OmniQuant's learned scales are float32, so float16 often cannot hit
   them); the float32 product is then within float16 rounding of the weight.
3. The zero. ``q = M + z`` must lie in ``[0, 2**bits - 1]``; ``z`` is the integer
   closest to ``2**(bits-1)`` that allows it (OmniQuant does not clamp zeros, so a
   group that is all positive or all negative may get a zero outside the code
   range, which the project format, storing zeros as floats, allows).
4. Verification: the recovered weight is dequantized and compared with the input
   value by value; ``exact`` is true only if every value matches. With
   ``max_ulp > 0`` a layer may instead be accepted within that many units in the
   last place (``exact`` is then false).

Cost: about 0.5 s per million weights on one CPU core.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..packing import check_bits
from ..quant.grid import QuantizedWeight, check_group_size, effective_group_size, num_groups
from .gptq import read_gptq_checkpoint
from .qdec_checkpoint import ImportedCheckpoint, PackedWeight
from .safetensors_io import FormatError, load_state_dict_dir, read_json

# OmniQuant real-quant files store raw zero points (module docstring).
OMNIQUANT_ZERO_CONVENTION = "v2"
# How far v / s may be from an integer while the step is searched (the final
# check is exact); float16 rounding moves it by at most |M| * 2**-11.
_INTEGER_TOLERANCE = 0.2
# Elements per chunk of groups processed at once (bounds float64 temporaries).
_CHUNK_ELEMENTS = 1 << 21
# Decoder linear weights: 2-D ``...layers.<i>.<...>.weight`` tensors.
DECODER_LINEAR_PATTERN = re.compile(r"(^|\.)layers\.\d+\..+\.weight$")


def read_omniquant_real_checkpoint(directory: str | os.PathLike, bits: int, group_size: int, *,
                                   zero_convention: str = OMNIQUANT_ZERO_CONVENTION,
                                   allow_pickle: bool = False) -> ImportedCheckpoint:
    """Read an OmniQuant ``--real_quant`` checkpoint: the GPTQ layout with **v2**
    (raw) zero points by default, and the bit width and group size the run used
    (``--wbits``, ``--group_size``), which the files do not record."""
    return read_gptq_checkpoint(directory, zero_convention=zero_convention, bits=bits,
                                group_size=group_size, allow_pickle=allow_pickle,
                                format_name="omniquant-real")


@dataclasses.dataclass
class GridRecovery:
    """The outcome of :func:`recover_grid` for one weight.

    Attributes:
        weight: the recovered quantized weight, or None when some group could not be
            recovered (the caller then keeps the dense weight).
        exact: every value of the dequantized ``weight`` equals the input.
        groups: number of (row, group) pairs; failed_groups: how many failed.
        scale_dtype: dtype of the recovered scales (float16 when possible).
        max_abs_error: largest ``|(q - z) * s - w|`` with the float32 product, i.e.
            what a kernel that never rounds to float16 sees (0 when not recovered).
    """

    weight: QuantizedWeight | None
    exact: bool
    groups: int
    failed_groups: int
    scale_dtype: torch.dtype | None
    max_abs_error: float

    def __str__(self) -> str:
        if self.weight is None:
            return (f"not on a {self.groups}-group grid: {self.failed_groups} groups failed; "
                    f"kept dense")
        return (f"recovered {self.weight.bits}-bit grid ({self.groups} groups, "
                f"{self.scale_dtype} scales, exact={self.exact}, float32-product error "
                f"{self.max_abs_error:.3g})")


def _rounding_interval(v: Tensor, dtype: torch.dtype, max_ulp: int) -> tuple[Tensor, Tensor]:
    """float64 bounds of the reals that round to ``v`` in ``dtype``, widened by
    ``max_ulp`` units in the last place on each side. The bounds are the midpoints to
    the neighbours, which round-half-to-even may or may not send to ``v``; they are
    only used to find candidate scales, which are then checked exactly."""
    vt = v.to(dtype)
    up = torch.full_like(vt, float("inf"))
    down = torch.full_like(vt, float("-inf"))
    hi_n, lo_n = vt, vt
    for _ in range(max_ulp + 1):
        hi_n = torch.nextafter(hi_n, up)
        lo_n = torch.nextafter(lo_n, down)
    vd = vt.double()
    lo = vd - (vd - lo_n.double()) * (max_ulp + 0.5) / (max_ulp + 1)
    hi = vd + (hi_n.double() - vd) * (max_ulp + 0.5) / (max_ulp + 1)
    return lo, hi


def _reproduces(M: Tensor, s: Tensor, target: Tensor, valid: Tensor, dtype: torch.dtype,
                lo: Tensor | None, hi: Tensor | None) -> Tensor:
    """Per group: does the project's dequantization, the float32 product ``M * s`` cast
    to ``dtype``, give ``target`` (or, with bounds, land within ``[lo, hi]``)?"""
    d = (M.float() * s.float()[:, None]).to(dtype)
    if lo is None:
        good = d == target
    else:
        dd = d.double()
        good = (dd >= lo) & (dd <= hi)
    return (good | ~valid).all(1)


def _recover_chunk(v: Tensor, valid: Tensor, bits: int, dtype: torch.dtype, max_ulp: int,
                   scale_dtypes: tuple[torch.dtype, ...]
                   ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Recover ``M`` (int64 ``[m, G]``) per group of ``v`` (``[m, G]`` in the weight
    dtype) and, for each of ``scale_dtypes``, a scale per group and whether it
    reproduces the group."""
    m, G = v.shape
    levels = (1 << bits) - 1
    target = v
    v = v.double()
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    # Differences up to (2 * max_ulp + 1) units in the last place of the group's
    # largest value are rounding noise, not grid steps (a real step is at least
    # max / (2**bits - 1), far larger for the widths used here).
    top = torch.where(valid, v.abs(), torch.zeros_like(v)).amax(1)
    top_t = top.to(dtype)
    ulp = (torch.nextafter(top_t, torch.full_like(top_t, float("inf"))).double() - top)
    noise = (2 * max_ulp + 1) * ulp
    absv = torch.where(valid & (v.abs() > noise[:, None]), v.abs(), inf)
    min_abs = absv.amin(1)
    srt = torch.sort(torch.where(valid, v, inf), dim=1).values
    gaps = srt[:, 1:] - srt[:, :-1]
    gaps = torch.where(torch.isfinite(gaps) & (gaps > noise[:, None]), gaps, inf)
    base = torch.minimum(min_abs, gaps.amin(1) if G > 1 else inf.expand(m))
    all_zero = ~torch.isfinite(base)

    # 1. The step: the largest base / j on which every value is near an integer.
    M = torch.zeros(m, G, dtype=torch.int64)
    found = all_zero.clone()
    big = torch.tensor(float(1 << 20), dtype=torch.float64)
    for j in range(1, levels + 1):
        todo = (~found).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        vv, mask = v[todo], valid[todo]
        s = base[todo] / j
        for _ in range(2):  # least-squares refinement of the step
            Mj = torch.round(vv / s[:, None]) * mask
            den = (Mj * Mj).sum(1)
            s = torch.where(den > 0, (vv * Mj).sum(1) / den.clamp(min=1), s)
        Mj = torch.round(vv / s[:, None])
        err = ((vv / s[:, None] - Mj).abs() * mask).amax(1)
        span = torch.where(mask, Mj, -big).amax(1) - torch.where(mask, Mj, big).amin(1)
        accept = (err <= _INTEGER_TOLERANCE) & (span <= levels)
        idx = todo[accept]
        M[idx] = (Mj[accept] * mask[accept]).to(torch.int64)
        found[idx] = True

    # 2. The interval of scales for which M * s rounds to v, for every value.
    lo, hi = _rounding_interval(v, dtype, max_ulp)
    use = valid & (M != 0)
    safe = torch.where(use, M.double(), torch.ones_like(v))
    a, b = lo / safe, hi / safe
    L = torch.where(use, torch.minimum(a, b), -inf).amax(1)
    U = torch.where(use, torch.maximum(a, b), inf).amin(1)
    L = torch.where(all_zero, torch.zeros_like(L), L).clamp(min=0.0)
    U = torch.where(all_zero, torch.full_like(U, 2.0), U)
    feasible = found & (L <= U) & (U > 0)
    mid = torch.where(feasible, (L + U) / 2, torch.ones_like(L))

    # 3. Candidate scales near the middle of the interval, checked exactly.
    bounds = (None, None) if max_ulp == 0 else (lo, hi)
    scales, fits = [], []
    for sd in scale_dtypes:
        c0 = mid.to(sd)
        candidates = [c0, torch.nextafter(c0, torch.full_like(c0, float("inf"))),
                      torch.nextafter(c0, torch.full_like(c0, float("-inf")))]
        best, ok = c0, torch.zeros(m, dtype=torch.bool)
        for c in candidates:
            good = ~ok & feasible & (c > 0) & _reproduces(M, c, target, valid, dtype, *bounds)
            best = torch.where(good, c, best)
            ok = ok | good
        scales.append(best)
        fits.append(ok)
    return M, scales, fits


def recover_grid(weight: Tensor, bits: int, group_size: int, *, max_ulp: int = 0,
                 prefer_scale_dtype: torch.dtype = torch.float16) -> GridRecovery:
    """Recover integer codes, scales and zeros of a fake-quantized weight.

    Args:
        weight: ``[N, K]`` float16 (or bfloat16/float32) weight on a per-group grid.
        bits: grid width (2..8); group_size: ``-1`` or a multiple of 32, ragged last
            group allowed.
        max_ulp: accept values within this many units in the last place of the input
            dtype (0: exact).
        prefer_scale_dtype: scale dtype to use when every group admits one; the
            fallback is float32.

    Returns:
        A :class:`GridRecovery`; ``weight`` is None when any group failed.
    """
    check_bits(bits)
    check_group_size(group_size)
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating [N, K] tensor, got {weight.dtype} "
                         f"{list(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite values")
    N, K = weight.shape
    G = effective_group_size(group_size, K)
    groups = num_groups(K, group_size)
    dtype = weight.dtype
    padded = torch.zeros(N, groups * G, dtype=dtype)
    padded[:, :K] = weight
    valid = torch.zeros(N, groups * G, dtype=torch.bool)
    valid[:, :K] = True
    v_all = padded.reshape(N * groups, G)
    valid_all = valid.reshape(N * groups, G)
    scale_dtypes = tuple(dict.fromkeys((prefer_scale_dtype, torch.float32)))

    rows = max(1, _CHUNK_ELEMENTS // G)
    Ms: list[Tensor] = []
    per_dtype: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in scale_dtypes]
    for r0 in range(0, N * groups, rows):
        M, scales, fits = _recover_chunk(v_all[r0:r0 + rows], valid_all[r0:r0 + rows], bits,
                                         dtype, max_ulp, scale_dtypes)
        Ms.append(M)
        for i in range(len(scale_dtypes)):
            per_dtype[i][0].append(scales[i])
            per_dtype[i][1].append(fits[i])
    M = torch.cat(Ms)
    chosen = None
    failed = N * groups
    for sd, (s_parts, f_parts) in zip(scale_dtypes, per_dtype):
        fits = torch.cat(f_parts)
        failed = min(failed, int((~fits).sum()))
        if bool(fits.all()):
            chosen = (sd, torch.cat(s_parts))
            break
    if chosen is None:
        return GridRecovery(None, False, N * groups, failed, None, 0.0)
    scale_dtype, s = chosen

    levels = (1 << bits) - 1
    big = 1 << 20
    Mmin = torch.where(valid_all, M, big).amin(1)
    Mmax = torch.where(valid_all, M, -big).amax(1)
    z = torch.clamp(torch.full_like(Mmin, 1 << (bits - 1)), min=-Mmin)
    z = torch.minimum(z, levels - Mmax)
    codes = (M + z[:, None]).reshape(N, groups * G)[:, :K]
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > levels):
        raise AssertionError("recovered codes out of range")  # spans were checked above
    recovered = QuantizedWeight(codes.to(torch.uint8).contiguous(),
                                s.to(scale_dtype).reshape(N, groups),
                                z.to(scale_dtype).reshape(N, groups), bits, group_size, K)
    # 4. Verify the whole weight through QuantizedWeight's own dequantization.
    deq = recovered.dequantize(dtype)
    exact = bool(torch.equal(deq, weight))
    if not exact:
        if max_ulp == 0:
            raise AssertionError("recovered grid does not reproduce the weight")  # checked above
        lo, hi = _rounding_interval(weight.double(), dtype, max_ulp)
        if not bool(((deq.double() >= lo) & (deq.double() <= hi)).all()):
            bad = torch.zeros(N, groups * G, dtype=torch.bool)
            bad[:, :K] = (deq.double() < lo) | (deq.double() > hi)
            failed = int(bad.reshape(N * groups, G).any(1).sum())
            return GridRecovery(None, False, N * groups, failed, None, 0.0)
    product = recovered.dequantize(torch.float32).double()
    err = float((product - weight.double()).abs().max()) if weight.numel() else 0.0
    return GridRecovery(recovered, exact, N * groups, 0, scale_dtype, err)


def recover_fake_quant_state_dict(
    state: Mapping[str, Tensor], bits: int, group_size: int, *,
    modules: Iterable[str] | None = None, max_ulp: int = 0,
) -> tuple[dict[str, PackedWeight], dict[str, Tensor], dict[str, GridRecovery]]:
    """Recover the grid of every decoder linear of a fake-quant state dict.

    Args:
        modules: qualified linear names to try (default: every 2-D
            ``...layers.<i>....weight``).

    Returns:
        ``(linears, tensors, report)``: recovered layers in the project layout; every
        other tensor (including the dense weights of layers that failed, under
        ``<name>.weight``); and the per-layer :class:`GridRecovery`.
    """
    if modules is None:
        names = [k[: -len(".weight")] for k, t in state.items()
                 if DECODER_LINEAR_PATTERN.search(k) and t.dim() == 2
                 and t.dtype.is_floating_point]
    else:
        names = list(modules)
    linears: dict[str, PackedWeight] = {}
    report: dict[str, GridRecovery] = {}
    consumed: set[str] = set()
    for name in names:
        key = f"{name}.weight"
        if key not in state:
            raise FormatError(f"missing tensor {key!r}")
        rec = recover_grid(state[key], bits, group_size, max_ulp=max_ulp)
        report[name] = rec
        if rec.weight is not None:
            linears[name] = PackedWeight.from_quantized_weight(rec.weight)
            consumed.add(key)
    tensors = {k: v for k, v in state.items() if k not in consumed}
    return linears, tensors, report


def read_omniquant_fake_checkpoint(
    directory: str | os.PathLike, bits: int, group_size: int, *,
    modules: Iterable[str] | None = None, max_ulp: int = 0, allow_pickle: bool = False,
) -> tuple[ImportedCheckpoint, dict[str, GridRecovery]]:
    """Read an OmniQuant fake-quant FP16 checkpoint and recover each linear's grid.

    Returns the converted checkpoint (layers whose grid could not be recovered stay
    dense in ``tensors``) and the per-layer report.
    """
    directory = Path(os.fspath(directory))
    cfg_path = directory / "config.json"
    hf_config = read_json(cfg_path, "config") if cfg_path.is_file() else {}
    state = load_state_dict_dir(directory, allow_pickle=allow_pickle)
    linears, tensors, report = recover_fake_quant_state_dict(
        state, bits, group_size, modules=modules, max_ulp=max_ulp)
    dense = sorted(n for n, r in report.items() if r.weight is None)
    quant = {"bits": bits, "group_size": group_size, "recovered": len(linears),
             "kept_dense": dense}
    return ImportedCheckpoint("omniquant-fake", hf_config, linears, tensors, quant), report


__all__ = [
    "GridRecovery", "OMNIQUANT_ZERO_CONVENTION", "read_omniquant_fake_checkpoint",
    "read_omniquant_real_checkpoint", "recover_fake_quant_state_dict", "recover_grid",
]
