"""GPTQ checkpoints (AutoGPTQ / optimum / GPTQModel / vLLM "gptq") at 2, 3, 4, 8 bits.

Per quantized linear ``<name>`` with ``K`` inputs, ``N`` outputs, ``b`` bits and group
size ``G`` (formats.md §3; ``G = -1`` means ``G = K``):

==================  =====  =====================  =========================================
tensor              dtype  shape                  content
==================  =====  =====================  =========================================
``<name>.qweight``  I32    ``[K*b/32, N]``        codes, packed along **K**
``<name>.qzeros``   I32    ``[ceil(K/G), N*b/32]``  zero points, packed along **N**
``<name>.scales``   F16    ``[ceil(K/G), N]``     scales
``<name>.g_idx``    I32    ``[K]``                group of each input channel (optional)
``<name>.bias``     F16    ``[N]``                optional
==================  =====  =====================  =========================================

**Bit packing.** Along the packed axis, each run of 32 values occupies ``b``
consecutive int32 words, value ``i`` at bit ``b*i`` of their little-endian
concatenation. For ``b`` in {2, 4, 8} this is "32/b values per word, LSB first";
for ``b = 3`` two values straddle words (value 10: bits 30-31 of word 0 and bit 0
of word 1; value 21: bit 31 of word 1 and bits 0-1 of word 2). This is exactly the
project's block layout (:mod:`qdec.packing`) applied along K (qweight) or N
(qzeros), without padding: GPTQ needs ``K*b`` and ``N*b`` to be multiples of 32.

**Zero points: the v1/v2 trap.** ``W^T[k, n] = s[g, n] * (q[k, n] - z[g, n])`` with
``g = g_idx[k]``, where the zero ``z`` is

* ``v1`` (``checkpoint_format: "gptq"``, AutoGPTQ): ``z = stored + 1``. Every v1
  consumer adds 1 back (symmetric 4-bit stores 7 = ``0x77777777``). v1 cannot
  store ``z = 0`` (the writer refuses it) and reads a stored 15 as 16, as those
  consumers do;
* ``v2`` (``checkpoint_format: "gptq_v2"``, GPTQModel; OmniQuant real-quant
  files): ``z = stored``.

The convention comes from the checkpoint's ``checkpoint_format`` (in
``quantize_config.json`` or ``config.json["quantization_config"]``), or from the
caller's ``zero_convention="v1"|"v2"``. A GPTQ config without ``checkpoint_format``
means v1 (AutoGPTQ's default, and what every loader assumes). With no config at
all (e.g. OmniQuant real-quant output) and no option, reading is refused: the two
conventions give different weights and nothing in the tensors tells them apart.
An option that contradicts the metadata is refused too.

**Act-order (``desc_act``) and ``g_idx``.** The project layout needs the groups to
be contiguous runs of ``G`` input channels. When ``g_idx[k] != k // G`` the
converter *permutes*: it sorts the channels by group (stably), so that column
``j`` of the converted weight is input channel ``perm[j]``, and returns ``perm``
(int64 ``[K]``) as the layer's ``input_permutation``. The layer then computes
``y = W' @ x[..., perm]``; the caller must gather ``x`` (and a residual store built
for this weight lives in the same permuted channel order). The permutation only
exists if each group holds exactly as many channels as the contiguous layout
would give it (``G`` each, the last ``K - (groups-1)*G``), which AutoGPTQ's
act-order always satisfies; anything else is refused.

Conversion to the project layout keeps scales (float16) and turns zeros into
float copies of the integer zero points; a layer whose every zero is
``2**(b-1)`` (GPTQ's symmetric mode) becomes a symmetric project weight
(``zeros=None``), which dequantizes identically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..packing import BLOCK, pack_codes, unpack_codes
from ..quant.grid import SCALE_DTYPES, QuantizedWeight, num_groups
from .qdec_checkpoint import ImportedCheckpoint, PackedWeight
from .safetensors_io import (
    FormatError,
    atomic_directory,
    load_state_dict_dir,
    read_json,
    save_safetensors,
    write_json_atomic,
)

GPTQ_BITS = (2, 3, 4, 8)
ZERO_CONVENTIONS = ("v1", "v2")
# checkpoint_format -> zero convention.
CHECKPOINT_FORMATS = {"gptq": "v1", "gptq_v2": "v2"}
QUANTIZE_CONFIG_FILE = "quantize_config.json"

log = logging.getLogger(__name__)


def _check_gptq_bits(bits: object, where: str = "") -> int:
    if bits not in GPTQ_BITS or isinstance(bits, bool):
        raise FormatError(f"{where + ': ' if where else ''}GPTQ bits must be one of "
                          f"{list(GPTQ_BITS)}, got {bits!r}")
    return bits  # type: ignore[return-value]


def pack_gptq_words(values: Tensor, bits: int) -> Tensor:
    """Pack ``[rows, L]`` codes along the last axis into ``int32 [rows, L*bits/32]``
    (GPTQ's bit order; ``L*bits`` must be a multiple of 32)."""
    _check_gptq_bits(bits)
    rows, L = values.shape
    if (L * bits) % 32:
        raise ValueError(f"{L} values of {bits} bits do not fill whole int32 words")
    # The project's block layout is GPTQ's bit order; only the zero padding of a
    # partial last block (which GPTQ does not have) is dropped.
    return pack_codes(values, bits)[:, : L * bits // 32].contiguous()


def unpack_gptq_words(words: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of :func:`pack_gptq_words`: ``int32 [rows, L*bits/32]`` to ``uint8 [rows, L]``."""
    _check_gptq_bits(bits)
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"words must be int32 [rows, W], got {words.dtype} {list(words.shape)}")
    if words.shape[1] * 32 != length * bits:
        raise ValueError(f"{words.shape[1]} words hold {words.shape[1] * 32 // bits} values of "
                         f"{bits} bits, not {length}")
    full = -(-length // BLOCK) * bits
    padded = torch.zeros(words.shape[0], full, dtype=torch.int32)
    padded[:, : words.shape[1]] = words
    return unpack_codes(padded, bits, length)


def pack_gptq_qweight(codes: Tensor, bits: int) -> Tensor:
    """Codes ``[N, K]`` to GPTQ ``qweight`` ``int32 [K*bits/32, N]`` (packed along K)."""
    return pack_gptq_words(codes, bits).t().contiguous()


def unpack_gptq_qweight(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """GPTQ ``qweight`` ``int32 [K*bits/32, N]`` to codes ``uint8 [N, K]``."""
    return unpack_gptq_words(qweight.t().contiguous(), bits, in_features)


def _zero_offset(zero_convention: str) -> int:
    if zero_convention not in ZERO_CONVENTIONS:
        raise ValueError(f"zero_convention must be 'v1' or 'v2', got {zero_convention!r}")
    return 1 if zero_convention == "v1" else 0


@dataclass(frozen=True)
class GPTQConfig:
    """The GPTQ quantization config (``quantize_config.json`` or
    ``config.json["quantization_config"]``)."""

    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str | None = None

    @property
    def zero_convention(self) -> str:
        """v1 or v2 from ``checkpoint_format`` (absent: v1, AutoGPTQ's default)."""
        fmt = self.checkpoint_format or "gptq"
        if fmt not in CHECKPOINT_FORMATS:
            raise FormatError(f"checkpoint_format {fmt!r} is not supported; expected one of "
                              f"{sorted(CHECKPOINT_FORMATS)} (marlin/bitblas layouts differ)")
        return CHECKPOINT_FORMATS[fmt]

    def to_dict(self) -> dict:
        d = {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
             "desc_act": self.desc_act, "sym": self.sym}
        if self.checkpoint_format is not None:
            d["checkpoint_format"] = self.checkpoint_format
        return d


def parse_gptq_config(cfg: Mapping, source: str) -> GPTQConfig:
    """Parse a GPTQ quantization config (the inner object)."""
    method = cfg.get("quant_method", "gptq")
    if str(method).lower() != "gptq":
        raise FormatError(f"{source}: quant_method is {method!r}; expected 'gptq'")
    bits = _check_gptq_bits(cfg.get("bits"), source)
    gs = cfg.get("group_size")
    if not isinstance(gs, int) or isinstance(gs, bool) or not (gs == -1 or gs > 0):
        raise FormatError(f"{source}: group_size must be -1 or a positive int, got {gs!r}")
    fmt = cfg.get("checkpoint_format")
    if fmt is not None and fmt not in CHECKPOINT_FORMATS:
        raise FormatError(f"{source}: checkpoint_format {fmt!r} is not supported; expected one "
                          f"of {sorted(CHECKPOINT_FORMATS)}")
    return GPTQConfig(bits, gs, bool(cfg.get("desc_act", False)), bool(cfg.get("sym", True)),
                      fmt)


def resolve_zero_convention(config: GPTQConfig | None, option: str | None, source: str) -> str:
    """The zero convention from the checkpoint config and/or the caller's option.

    Raises:
        FormatError: neither decides, or they disagree.
    """
    if option is not None:
        _zero_offset(option)
    meta = None if config is None else config.zero_convention
    if option is not None and meta is not None and option != meta:
        raise FormatError(f"{source}: zero_convention={option!r} contradicts the checkpoint "
                          f"metadata (checkpoint_format={config.checkpoint_format!r} means "
                          f"{meta!r})")
    chosen = option or meta
    if chosen is None:
        raise FormatError(f"{source}: no GPTQ quantization config says how zero points are "
                          f"stored; pass zero_convention='v1' (AutoGPTQ 'gptq': stored z-1) or "
                          f"'v2' (GPTQModel 'gptq_v2', OmniQuant real-quant: raw z). Guessing "
                          f"wrong dequantizes every weight wrongly")
    return chosen


def act_order_permutation(g_idx: Tensor | None, K: int, G: int, *, where: str = "g_idx"
                          ) -> Tensor | None:
    """The input permutation that makes an act-order ``g_idx`` contiguous.

    ``g_idx[k]`` is the group of input channel ``k``. Returns None when it is the
    natural ``k // G``; otherwise int64 ``[K]``, the channels stably sorted by group,
    so that column ``j`` of the converted weight is input channel ``perm[j]``.

    Raises:
        FormatError: wrong dtype/shape, values outside ``[0, ceil(K/G))``, or groups
            that do not hold exactly the channel counts of the contiguous layout.
    """
    if g_idx is None:
        return None
    groups = -(-K // G)
    if g_idx.dtype not in (torch.int32, torch.int64) or list(g_idx.shape) != [K]:
        raise FormatError(f"{where} is {g_idx.dtype} {list(g_idx.shape)}; expected int32 [{K}]")
    gi = g_idx.long()
    if K and (int(gi.min()) < 0 or int(gi.max()) >= groups):
        raise FormatError(f"{where} values span [{int(gi.min())}, {int(gi.max())}]; expected "
                          f"[0, {groups - 1}]")
    natural = torch.arange(K) // G
    if torch.equal(gi, natural):
        return None
    counts = torch.bincount(gi, minlength=groups)
    expected = torch.bincount(natural, minlength=groups)
    if not torch.equal(counts, expected):
        bad = int((counts != expected).nonzero()[0])
        raise FormatError(
            f"{where} puts {int(counts[bad])} channels in group {bad}; the QDEC layout needs "
            f"contiguous groups of G={G} ({int(expected[bad])} here), so this g_idx cannot be "
            f"turned into an input permutation")
    return torch.sort(gi, stable=True).indices


def gptq_to_quantized_weight(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None, bits: int,
    group_size: int, zero_convention: str, *, in_features: int | None = None,
    detect_symmetric: bool = True, name: str = "layer", source: str = "",
) -> tuple[QuantizedWeight, Tensor | None]:
    """Convert one GPTQ linear to the project layout.

    Returns:
        ``(weight, input_permutation)``; the permutation (int64 ``[K]``) is None unless
        ``g_idx`` is not ``k // G`` (act-order; module docstring).
    """
    where = f"{source}: tensor {name}" if source else f"tensor {name}"
    _check_gptq_bits(bits, where)
    offset = _zero_offset(zero_convention)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise FormatError(f"{where}.qweight must be int32 [K*b/32, N], got {qweight.dtype} "
                          f"{list(qweight.shape)}")
    rows, N = qweight.shape
    if (rows * 32) % bits:
        raise FormatError(f"{where}.qweight has {rows} rows, not a whole number of {bits}-bit "
                          f"values per column")
    K = rows * 32 // bits
    if g_idx is not None and g_idx.dim() == 1 and in_features is None:
        in_features = g_idx.shape[0]
    if in_features is not None and in_features != K:
        raise FormatError(f"{where}.qweight has shape {list(qweight.shape)}, i.e. K={K} at "
                          f"{bits} bits; expected K={in_features} "
                          f"({in_features * bits // 32} rows)")
    G = K if group_size == -1 else group_size
    if not isinstance(G, int) or G <= 0:
        raise FormatError(f"{where}: invalid group size {group_size!r}")
    groups = -(-K // G)
    if scales.dtype not in SCALE_DTYPES or list(scales.shape) != [groups, N]:
        raise FormatError(f"{where}.scales is {scales.dtype} {list(scales.shape)}; expected a "
                          f"float tensor {[groups, N]} (K={K}, N={N}, G={G})")
    if (N * bits) % 32:
        raise FormatError(f"{where}: N={N} outputs at {bits} bits do not fill whole qzeros words")
    if qzeros.dtype != torch.int32 or list(qzeros.shape) != [groups, N * bits // 32]:
        raise FormatError(f"{where}.qzeros is {qzeros.dtype} {list(qzeros.shape)}; expected "
                          f"int32 {[groups, N * bits // 32]}")
    codes = unpack_gptq_qweight(qweight, bits, K)  # [N, K], input channels in file order
    stored = unpack_gptq_words(qzeros.contiguous(), bits, N)  # [groups, N]
    zeros = (stored.to(torch.int32) + offset).t().to(scales.dtype).contiguous()

    perm = act_order_permutation(g_idx, K, G, where=f"{where}.g_idx")
    if perm is not None:
        codes = codes[:, perm].contiguous()
    if groups == 1:
        project_gs = -1
    elif G % 32:
        raise FormatError(f"{where}: group size {G} is not supported by the QDEC packed layout "
                          f"(a multiple of 32, or one group per row)")
    else:
        project_gs = G
    if detect_symmetric and bool((zeros.float() == float(1 << (bits - 1))).all()):
        zeros = None
    return QuantizedWeight(codes, scales.t().contiguous(), zeros, bits, project_gs, K), perm


def quantized_weight_to_gptq(weight: QuantizedWeight, zero_convention: str, *,
                             input_permutation: Tensor | None = None, name: str = "layer"
                             ) -> dict[str, Tensor]:
    """Pack a project weight as GPTQ tensors ``{qweight, qzeros, scales, g_idx}``.

    With ``input_permutation`` (column ``j`` multiplies input ``perm[j]``) the result is
    an act-order layout: qweight rows in the original input order, ``g_idx[perm[j]] =
    j // G``. Zeros must be integers: 0..2^b-1 for v2, 1..2^b for v1 (v1 stores z-1).
    """
    bits = _check_gptq_bits(weight.bits, f"layer {name!r}")
    offset = _zero_offset(zero_convention)
    N, K = weight.codes.shape
    if (K * bits) % 32 or (N * bits) % 32:
        raise FormatError(f"layer {name!r}: GPTQ needs K*bits and N*bits to be multiples of 32, "
                          f"got K={K}, N={N}, bits={bits}")
    G = K if weight.group_size == -1 else weight.group_size
    groups = num_groups(K, weight.group_size)
    if weight.zeros is None:
        z = torch.full((N, groups), float(1 << (bits - 1)))
    else:
        z = weight.zeros.float()
    lo, hi = offset, (1 << bits) - 1 + offset
    if not torch.equal(z, z.round()) or z.min() < lo or z.max() > hi:
        raise FormatError(
            f"layer {name!r}: GPTQ {zero_convention} can store integer zero points in "
            f"[{lo}, {hi}] only, got range [{z.min().item()}, {z.max().item()}]"
            + (" (v1 stores z-1, so z=0 is impossible; use v2)" if zero_convention == "v1"
               else ""))
    stored = (z - offset).to(torch.int64).t()  # [groups, N]
    g_idx = torch.arange(K) // G
    codes = weight.codes
    if input_permutation is not None:
        perm = input_permutation.long()
        if list(perm.shape) != [K] or not torch.equal(torch.sort(perm).values, torch.arange(K)):
            raise FormatError(f"layer {name!r}: input_permutation must be a permutation of "
                              f"0..{K - 1}")
        original = torch.empty_like(codes)
        original[:, perm] = codes
        codes = original
        g_idx = torch.empty(K, dtype=torch.int64)
        g_idx[perm] = torch.arange(K) // G
    return {"qweight": pack_gptq_qweight(codes, bits),
            "qzeros": pack_gptq_words(stored, bits),
            "scales": weight.scales.t().contiguous(),
            "g_idx": g_idx.to(torch.int32)}


def dequantize_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None,
                    bits: int, zero_convention: str, group_size: int | None = None) -> Tensor:
    """GPTQ's own dequantization, ``W [N, K]`` in ``scales.dtype``:
    ``W^T[k, n] = s[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])`` with ``(q - z)`` an
    integer and one multiply in the scale dtype, as AutoGPTQ's torch path does.
    Without ``g_idx``, ``group_size`` gives ``g_idx[k] = k // G``."""
    K = qweight.shape[0] * 32 // bits
    N = qweight.shape[1]
    q = unpack_gptq_qweight(qweight, bits, K).t().to(torch.int32)  # [K, N]
    z = unpack_gptq_words(qzeros.contiguous(), bits, N).to(torch.int32) + _zero_offset(
        zero_convention)
    if g_idx is None:
        if group_size is None:
            raise ValueError("dequantize_gptq needs g_idx or group_size")
        gi = torch.arange(K) // (K if group_size == -1 else group_size)
    else:
        gi = g_idx.long()
    return ((q - z[gi]).to(scales.dtype) * scales[gi]).t().contiguous()


def _read_gptq_config(directory: Path, hf_config: dict) -> tuple[GPTQConfig | None, str]:
    found: list[tuple[GPTQConfig, str]] = []
    if "quantization_config" in hf_config:
        src = str(directory / "config.json")
        qc = hf_config["quantization_config"]
        if not isinstance(qc, dict):
            raise FormatError(f"{src}: quantization_config must be an object")
        found.append((parse_gptq_config(qc, src), src))
    qpath = directory / QUANTIZE_CONFIG_FILE
    if qpath.is_file():
        found.append((parse_gptq_config(read_json(qpath, "quantize config"), str(qpath)),
                      str(qpath)))
    if not found:
        return None, str(directory)
    if len(found) == 2:
        (a, sa), (b, sb) = found
        for key in ("bits", "group_size", "zero_convention"):
            if getattr(a, key) != getattr(b, key):
                raise FormatError(f"{sa} and {sb} disagree on {key}: {getattr(a, key)!r} vs "
                                  f"{getattr(b, key)!r}")
    return found[0]


def read_gptq_checkpoint(
    directory: str | os.PathLike, *, zero_convention: str | None = None,
    bits: int | None = None, group_size: int | None = None, allow_pickle: bool = False,
    format_name: str | None = None,
) -> ImportedCheckpoint:
    """Read a GPTQ checkpoint directory and convert every quantized linear.

    Args:
        zero_convention: ``"v1"`` / ``"v2"``; needed when the checkpoint has no GPTQ
            config, and must agree with it otherwise.
        bits, group_size: needed when there is no GPTQ config; checked against it if
            there is one.
        format_name: recorded in the result (default ``"gptq-<convention>"``).
    """
    directory = Path(os.fspath(directory))
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    cfg_path = directory / "config.json"
    hf_config = read_json(cfg_path, "config") if cfg_path.is_file() else {}
    config, cfg_source = _read_gptq_config(directory, hf_config)
    if config is not None:
        for key, given in (("bits", bits), ("group_size", group_size)):
            if given is not None and given != getattr(config, key):
                raise FormatError(f"{cfg_source}: {key} is {getattr(config, key)!r}; the caller "
                                  f"passed {given!r}")
        bits, group_size = config.bits, config.group_size
    elif bits is None or group_size is None:
        raise FormatError(f"{directory}: no GPTQ quantization config (quantize_config.json or "
                          f"config.json quantization_config); pass bits= and group_size=")
    _check_gptq_bits(bits, str(directory))
    convention = resolve_zero_convention(config, zero_convention, cfg_source)
    if config is not None and config.checkpoint_format is None and zero_convention is None:
        log.warning("%s: the GPTQ config has no checkpoint_format; reading zero points as v1 "
                    "(AutoGPTQ's 'gptq': stored z - 1), as every GPTQ loader does", cfg_source)

    state = load_state_dict_dir(directory, allow_pickle=allow_pickle)
    names = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not names:
        raise FormatError(f"{directory}: no '<name>.qweight' tensors found")
    linears: dict[str, PackedWeight] = {}
    used: set[str] = set()
    for name in names:
        for suffix in ("qzeros", "scales"):
            if f"{name}.{suffix}" not in state:
                raise FormatError(f"{directory}: missing tensor {name}.{suffix!s}")
        keys = [f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")]
        used.update(k for k in keys if k in state)
        w, perm = gptq_to_quantized_weight(
            state[keys[0]], state[keys[1]], state[keys[2]], state.get(keys[3]), bits,
            group_size, convention, name=name, source=str(directory))
        linears[name] = PackedWeight.from_quantized_weight(w, perm)
    tensors = {k: v for k, v in state.items() if k not in used}
    quant = {"bits": bits, "group_size": group_size, "zero_convention": convention,
             "quantization_config": None if config is None else config.to_dict()}
    return ImportedCheckpoint(format_name or f"gptq-{convention}", hf_config, linears, tensors,
                              quant)


def write_gptq_checkpoint(
    directory: str | os.PathLike, linears: Mapping[str, QuantizedWeight | PackedWeight],
    tensors: Mapping[str, Tensor], hf_config: Mapping, *, zero_convention: str = "v1",
    write_quantization_config: bool = True, overwrite: bool = False,
) -> Path:
    """Write a GPTQ checkpoint (``config.json`` + ``model.safetensors``).

    All layers share one bit width and group size. ``write_quantization_config=False``
    leaves ``quantization_config`` out of ``config.json``, as OmniQuant's real-quant
    output does. Layers with an input permutation are written in act-order form.
    """
    directory = Path(os.fspath(directory))
    _zero_offset(zero_convention)
    if not linears:
        raise FormatError(f"{directory}: no quantized linears to write")
    out: dict[str, Tensor] = dict(tensors)
    bit_set, sizes, sym, desc_act = set(), set(), True, False
    for name, w in linears.items():
        perm = None
        if isinstance(w, PackedWeight):
            perm = w.input_permutation
            w = w.to_quantized_weight()
        bit_set.add(w.bits)
        sizes.add(w.group_size if w.group_size != -1 else ("row", w.in_features))
        sym = sym and w.zeros is None
        desc_act = desc_act or perm is not None
        for suffix, t in quantized_weight_to_gptq(w, zero_convention, input_permutation=perm,
                                                  name=name).items():
            out[f"{name}.{suffix}"] = t
    ints = {s for s in sizes if isinstance(s, int)}
    rows = {s[1] for s in sizes if not isinstance(s, int)}
    if len(bit_set) != 1 or len(ints) > 1 or (ints and rows and rows != ints):
        raise FormatError(f"{directory}: a GPTQ config holds one bit width and group size; the "
                          f"layers use bits {sorted(bit_set)}, group sizes {sorted(ints)} "
                          f"(+ one group per row for K in {sorted(rows)})")
    group_size = ints.pop() if ints else -1
    config = dict(hf_config)
    config.pop("quantization_config", None)
    if write_quantization_config:
        fmt = "gptq" if zero_convention == "v1" else "gptq_v2"
        config["quantization_config"] = GPTQConfig(bit_set.pop(), group_size, desc_act, sym,
                                                   fmt).to_dict()
    with atomic_directory(directory, overwrite) as tmp:
        save_safetensors(out, tmp / "model.safetensors", {"format": "pt"})
        write_json_atomic(config, tmp / "config.json")
    return directory


__all__ = [
    "GPTQConfig", "GPTQ_BITS", "act_order_permutation", "dequantize_gptq",
    "gptq_to_quantized_weight",
    "pack_gptq_qweight", "pack_gptq_words", "parse_gptq_config", "quantized_weight_to_gptq",
    "read_gptq_checkpoint", "resolve_zero_convention", "unpack_gptq_qweight",
    "unpack_gptq_words", "write_gptq_checkpoint",
]
