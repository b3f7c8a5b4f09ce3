"""AutoAWQ ``gemm`` checkpoints (``WQLinear_GEMM``): read, write, convert.

Per quantized linear ``<name>`` with ``K`` inputs, ``N`` outputs and group size ``G``
(formats.md §2.1; ``G = -1`` in the config means ``G = K``):

=====================  =====  ==================  =======================================
tensor                 dtype  shape               content
=====================  =====  ==================  =======================================
``<name>.qweight``     I32    ``[K, N/8]``        4-bit codes of ``W^T``, 8 per word along N
``<name>.qzeros``      I32    ``[K/G, N/8]``      4-bit zero points, packed like qweight
``<name>.scales``      F16    ``[K/G, N]``        scales
``<name>.bias``        F16    ``[N]``             optional
=====================  =====  ==================  =======================================

Nibble ``i`` (bits ``4i..4i+3``) of word ``c`` holds column ``8c + AWQ_ORDER[i]``,
``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``; zeros are raw integers 0..15, and
``W^T[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]``.

``config.json`` carries ``"quantization_config": {"quant_method": "awq",
"zero_point": true, "group_size": 128, "bits": 4, "version": "gemm", ...}``
(``w_bit`` / ``q_group_size`` are accepted as synonyms). Only 4-bit ``gemm`` is
supported; anything else is refused with the reason.

Conversion to the project layout (:class:`qdec.quant.QuantizedWeight`) is
lossless: codes are transposed to ``[N, K]``, scales stay float16 (``[N, K/G]``),
zeros become float16 copies of the integer zero points, and one group per row
(``G >= K``) becomes ``group_size = -1``. The project dequantization
(float32 ``(q - z) * s`` cast to float16) is bit-identical to AutoAWQ's float16
``(q - z) * s``: ``q - z`` is an exact small integer, so both round the exact
product once. Writing a symmetric project weight stores zero point 8 in every
group (the same ``W``; it reads back as asymmetric with zeros 8).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..quant.grid import QuantizedWeight, num_groups
from .qdec_checkpoint import ImportedCheckpoint, PackedWeight
from .safetensors_io import (
    FormatError,
    atomic_directory,
    load_state_dict_dir,
    read_json,
    save_safetensors,
    write_json_atomic,
)

AWQ_BITS = 4
PACK_FACTOR = 8  # 4-bit values per int32 word
# Nibble i of a word holds column 8c + AWQ_ORDER[i] (the interleave of AutoAWQ's
# GEMM kernel, which dequantizes pairs of nibbles at once).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Column 8c + j sits in nibble AWQ_NIBBLE_OF_COLUMN[j] (the inverse permutation).
AWQ_NIBBLE_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)


def pack_awq(values: Tensor) -> Tensor:
    """Pack 4-bit values ``[rows, N]`` (``N % 8 == 0``) into ``int32 [rows, N/8]`` in
    AWQ nibble order."""
    if values.dim() != 2 or values.shape[1] % PACK_FACTOR:
        raise ValueError(f"values must be [rows, N] with N % 8 == 0, got {list(values.shape)}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 15):
        raise ValueError(f"4-bit values must lie in [0, 15], got [{int(v.min())}, {int(v.max())}]")
    v = v.reshape(v.shape[0], -1, PACK_FACTOR)[:, :, list(AWQ_ORDER)]  # [rows, N/8, nibble]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32)


def unpack_awq(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_awq`: ``int32 [rows, N/8]`` to ``uint8 [rows, N]``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed must be int32 [rows, words], got {packed.dtype} "
                         f"{list(packed.shape)}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = (words.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF
    cols = nibbles[:, :, list(AWQ_NIBBLE_OF_COLUMN)]
    return cols.reshape(packed.shape[0], -1).to(torch.uint8)


@dataclass(frozen=True)
class AWQConfig:
    """The ``quantization_config`` of an AutoAWQ checkpoint."""

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: list[str] | None = None

    def to_dict(self) -> dict:
        return {"quant_method": "awq", "zero_point": self.zero_point,
                "group_size": self.group_size, "bits": self.bits, "version": self.version,
                "modules_to_not_convert": self.modules_to_not_convert}


def _pick(cfg: Mapping, keys: tuple[str, ...], source: str, default=None):
    found = {k: cfg[k] for k in keys if k in cfg}
    if len(set(map(repr, found.values()))) > 1:
        raise FormatError(f"{source}: quantization_config gives conflicting {found}")
    return next(iter(found.values())) if found else default


def parse_awq_config(config: Mapping, source: str = "config.json") -> AWQConfig:
    """Parse an AutoAWQ quantization config.

    Args:
        config: a whole ``config.json`` (with ``quantization_config``) or the
            quantization config itself.
        source: file name used in error messages.

    Raises:
        FormatError: not AWQ, not 4-bit, not ``gemm``, or malformed values.
    """
    cfg = config.get("quantization_config", config)
    if not isinstance(cfg, Mapping):
        raise FormatError(f"{source}: quantization_config must be an object")
    method = str(cfg.get("quant_method", "")).lower()
    if method != "awq":
        raise FormatError(f"{source}: quant_method is {cfg.get('quant_method')!r}; expected 'awq'")
    bits = _pick(cfg, ("bits", "w_bit"), source)
    group_size = _pick(cfg, ("group_size", "q_group_size"), source)
    version = str(_pick(cfg, ("version",), source, "gemm")).lower()
    zero_point = _pick(cfg, ("zero_point",), source, True)
    if bits != AWQ_BITS:
        raise FormatError(f"{source}: AutoAWQ checkpoints are 4-bit only (bits/w_bit), got "
                          f"{bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (
            group_size == -1 or group_size > 0):
        raise FormatError(f"{source}: group_size/q_group_size must be -1 or a positive int, "
                          f"got {group_size!r}")
    if version != "gemm":
        raise FormatError(f"{source}: AutoAWQ version {version!r} is not supported; only "
                          f"'gemm' (qweight [K, N/8]) is (gemv/gemv_fast/marlin/exllama use "
                          f"other layouts)")
    if not isinstance(zero_point, bool):
        raise FormatError(f"{source}: zero_point must be a bool, got {zero_point!r}")
    skip = cfg.get("modules_to_not_convert")
    return AWQConfig(bits, group_size, zero_point, version,
                     None if skip is None else list(skip))


def _project_group_size(G: int, K: int, where: str) -> int:
    if G >= K:
        return -1
    if G % 32:
        raise FormatError(f"{where}: group size {G} is not supported by the QDEC packed layout "
                          f"(a multiple of 32, or one group per row)")
    return G


def awq_to_quantized_weight(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int,
                            *, name: str = "layer", source: str = "") -> QuantizedWeight:
    """Convert one AutoAWQ gemm linear to the project layout (lossless).

    Args:
        qweight: int32 ``[K, N/8]``; qzeros: int32 ``[ceil(K/G), N/8]``;
        scales: float16 ``[ceil(K/G), N]``; group_size: ``G`` (``-1``: ``K``).
    """
    where = f"{source}: tensor {name}" if source else f"tensor {name}"
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise FormatError(f"{where}.qweight must be int32 [K, N/8], got {qweight.dtype} "
                          f"{list(qweight.shape)}")
    K, N = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    G = K if group_size == -1 else group_size
    if not isinstance(G, int) or G <= 0:
        raise FormatError(f"{where}: invalid group size {group_size!r}")
    groups = -(-K // G)
    if qzeros.dtype != torch.int32 or list(qzeros.shape) != [groups, N // PACK_FACTOR]:
        raise FormatError(f"{where}.qzeros is {qzeros.dtype} {list(qzeros.shape)}; expected "
                          f"int32 {[groups, N // PACK_FACTOR]} (K={K}, N={N}, G={G})")
    if scales.dtype != torch.float16 or list(scales.shape) != [groups, N]:
        raise FormatError(f"{where}.scales is {scales.dtype} {list(scales.shape)}; expected "
                          f"float16 {[groups, N]} (K={K}, N={N}, G={G})")
    codes = unpack_awq(qweight).t().contiguous()  # [N, K]
    zeros = unpack_awq(qzeros).t().to(torch.float16).contiguous()  # [N, groups]
    return QuantizedWeight(codes, scales.t().contiguous(), zeros, AWQ_BITS,
                           _project_group_size(G, K, where), K)


def quantized_weight_to_awq(weight: QuantizedWeight, *, name: str = "layer"
                            ) -> dict[str, Tensor]:
    """Pack a project weight as AutoAWQ gemm tensors ``{qweight, qzeros, scales}``.

    Requires 4 bits, ``N % 8 == 0``, scales exactly representable in float16, integer
    zeros in 0..15, and ``K`` a multiple of the group size (AutoAWQ has no ragged
    groups). A symmetric weight is stored with zero point 8.
    """
    if weight.bits != AWQ_BITS:
        raise FormatError(f"layer {name!r}: AutoAWQ stores 4-bit weights only, got "
                          f"bits={weight.bits}")
    N, K = weight.codes.shape
    if N % PACK_FACTOR:
        raise FormatError(f"layer {name!r}: AutoAWQ needs out_features % 8 == 0, got N={N}")
    G = K if weight.group_size == -1 else weight.group_size
    if K % G:
        raise FormatError(f"layer {name!r}: AutoAWQ needs in_features % group_size == 0, got "
                          f"K={K}, G={G}")
    scales = weight.scales.to(torch.float16)
    if not torch.equal(scales.float(), weight.scales.float()):
        raise FormatError(f"layer {name!r}: scales ({weight.scales.dtype}) are not exactly "
                          f"representable in float16, which AutoAWQ stores")
    if weight.zeros is None:
        zeros = torch.full((N, num_groups(K, weight.group_size)), 1 << (AWQ_BITS - 1),
                           dtype=torch.int64)
    else:
        z = weight.zeros.float()
        if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > 15:
            raise FormatError(f"layer {name!r}: AutoAWQ zero points must be integers in 0..15, "
                              f"got range [{z.min().item()}, {z.max().item()}]")
        zeros = z.to(torch.int64)
    return {"qweight": pack_awq(weight.codes.t()),
            "qzeros": pack_awq(zeros.t()),
            "scales": scales.t().contiguous()}


def dequantize_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """AutoAWQ's own dequantization, ``W [N, K]`` in float16: ``(q - z) * s`` with
    float16 arithmetic, as ``WQLinear_GEMM`` does (used to check conversions)."""
    K = qweight.shape[0]
    G = K if group_size == -1 else group_size
    q = unpack_awq(qweight).to(torch.int32)  # [K, N]
    z = unpack_awq(qzeros).to(torch.int32).repeat_interleave(G, 0)[:K]
    s = scales.repeat_interleave(G, 0)[:K]
    return ((q - z).to(torch.float16) * s).t().contiguous()


def read_autoawq_checkpoint(directory: str | os.PathLike, *, allow_pickle: bool = False
                            ) -> ImportedCheckpoint:
    """Read an AutoAWQ gemm checkpoint directory (``config.json`` + safetensors,
    sharded or not) and convert every quantized linear to the project layout."""
    directory = Path(os.fspath(directory))
    cfg_path = str(directory / "config.json")
    hf_config = read_json(cfg_path, "config")
    if "quantization_config" not in hf_config:
        raise FormatError(f"{cfg_path}: no quantization_config; not an AutoAWQ checkpoint")
    cfg = parse_awq_config(hf_config, cfg_path)
    state = load_state_dict_dir(directory, allow_pickle=allow_pickle)
    names = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not names:
        raise FormatError(f"{directory}: no '<name>.qweight' tensors found")
    linears: dict[str, PackedWeight] = {}
    used: set[str] = set()
    for name in names:
        parts = {}
        for suffix in ("qweight", "qzeros", "scales"):
            key = f"{name}.{suffix}"
            if key not in state:
                if suffix == "qzeros" and not cfg.zero_point:
                    raise FormatError(f"{directory}: tensor {key!r} missing; AutoAWQ gemm with "
                                      f"zero_point=false has no defined code offset")
                raise FormatError(f"{directory}: missing tensor {key!r}")
            parts[suffix] = state[key]
            used.add(key)
        w = awq_to_quantized_weight(parts["qweight"], parts["qzeros"], parts["scales"],
                                    cfg.group_size, name=name, source=str(directory))
        linears[name] = PackedWeight.from_quantized_weight(w)
    tensors = {k: v for k, v in state.items() if k not in used}
    return ImportedCheckpoint("autoawq-gemm", hf_config, linears, tensors,
                              {"quantization_config": cfg.to_dict()})


def write_autoawq_checkpoint(directory: str | os.PathLike,
                             linears: Mapping[str, QuantizedWeight | PackedWeight],
                             tensors: Mapping[str, Tensor], hf_config: Mapping, *,
                             overwrite: bool = False) -> Path:
    """Write an AutoAWQ gemm checkpoint (``config.json`` + ``model.safetensors``).

    All layers must share one group size (a layer with ``group_size=-1`` counts as
    ``G = K``). ``tensors`` holds every non-quantized tensor (biases included).
    """
    directory = Path(os.fspath(directory))
    out: dict[str, Tensor] = dict(tensors)
    if not linears:
        raise FormatError(f"{directory}: no quantized linears to write")
    per_layer: dict[str, int] = {}
    for name, w in linears.items():
        if isinstance(w, PackedWeight):
            if w.input_permutation is not None:
                raise FormatError(f"layer {name!r}: AutoAWQ has no input permutation")
            w = w.to_quantized_weight()
        per_layer[name] = w.group_size
        for suffix, t in quantized_weight_to_awq(w, name=name).items():
            out[f"{name}.{suffix}"] = t
    # One group size in the config: -1 if every layer has one group per row;
    # otherwise the common G, which a one-group layer matches only if K == G.
    sizes = {g for g in per_layer.values() if g != -1}
    if len(sizes) > 1:
        raise FormatError(f"{directory}: an AutoAWQ config holds one group size; the layers use "
                          f"{sorted(sizes)}")
    group_size = sizes.pop() if sizes else -1
    for name, g in per_layer.items():
        K = linears[name].in_features
        if g == -1 and group_size != -1 and K != group_size:
            raise FormatError(f"layer {name!r} has one group per row (K={K}) but the other "
                              f"layers use group_size={group_size}")
    config = dict(hf_config)
    config["quantization_config"] = AWQConfig(group_size=group_size).to_dict()
    with atomic_directory(directory, overwrite) as tmp:
        save_safetensors(out, tmp / "model.safetensors", {"format": "pt"})
        write_json_atomic(config, tmp / "config.json")
    return directory


__all__ = [
    "AWQConfig", "AWQ_ORDER", "awq_to_quantized_weight", "dequantize_awq", "pack_awq",
    "parse_awq_config", "quantized_weight_to_awq", "read_autoawq_checkpoint", "unpack_awq",
    "write_autoawq_checkpoint",
]
