"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor's output).

llm-compressor (AutoAWQ's successor) writes ``config.json`` with
``"quantization_config": {"quant_method": "compressed-tensors", "format":
"pack-quantized", "config_groups": {...}, "ignore": [...]}``; vLLM and transformers
load it natively. Per quantized linear ``<name>`` with ``N`` outputs, ``K`` inputs,
``b`` bits and group size ``G`` (channel strategy: one group per row):

=============================  =====  ========================  ==========================
tensor                         dtype  shape                     content
=============================  =====  ========================  ==========================
``<name>.weight_packed``       I32    ``[N, ceil(K*b/32)]``     codes ``q + 2**(b-1)``
``<name>.weight_scale``        float  ``[N, ceil(K/G)]``        scales
``<name>.weight_zero_point``   I32    ``[ceil(N*b/32), groups]``  zeros, packed along N
                                                                (asymmetric only)
``<name>.weight_shape``        int    ``[2]``                   ``[N, K]``
``<name>.weight_g_idx``        I32    ``[K]``                   act-order group of each
                                                                input (optional)
=============================  =====  ========================  ==========================

with ``W[n, k] = (q[n, k] - zp[n, g]) * s[n, g]``, ``q`` and ``zp`` signed
(``zp = 0`` when symmetric), ``g = g_idx[k]`` or ``k // G``, computed in the scale
dtype. Unpacking and the scheme (``QuantizationConfig``) come from the
``compressed-tensors`` library itself; this module only maps the result onto the
project layout: codes ``c = q + 2**(b-1)`` and zeros ``z = zp + 2**(b-1)`` give the
same ``(c - z) * s`` (a symmetric layer keeps ``zeros=None``, i.e. ``z = 2**(b-1)``),
and a non-natural ``g_idx`` becomes an input permutation as for act-order GPTQ
(:func:`qdec.formats.gptq.act_order_permutation`). The conversion is lossless.

Supported: integer weight-only schemes (no activation quantization) of 2, 3, 4 or 8
bits with ``group`` (``G`` a multiple of 32, or ``G >= K``) or ``channel`` strategy,
symmetric or not. Everything else is refused with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..quant.grid import SCALE_DTYPES, QuantizedWeight
from .gptq import act_order_permutation
from .qdec_checkpoint import ImportedCheckpoint, PackedWeight
from .safetensors_io import FormatError, load_state_dict_dir, read_json

QUANT_METHOD = "compressed-tensors"
PACKED_FORMAT = "pack-quantized"
SUPPORTED_BITS = (2, 3, 4, 8)
# Per-linear tensor suffixes that the conversion consumes (all else is kept).
LAYER_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                  "weight_g_idx")


def _library():
    """The compressed-tensors pieces used here (a project dependency)."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as e:  # pragma: no cover - installed with the project
        raise ImportError("reading compressed-tensors checkpoints needs the 'compressed-tensors' "
                          "package (pip install compressed-tensors)") from e
    return QuantizationConfig, unpack_from_int32


def parse_compressed_tensors_config(config: dict, source: str = "config.json"):
    """The weight ``QuantizationArgs`` shared by every config group, validated.

    Args:
        config: a whole ``config.json`` (with ``quantization_config``) or the
            quantization config itself.

    Raises:
        FormatError: not compressed-tensors, not ``pack-quantized``, activation
            quantization, groups with different weight schemes, or unsupported args.
    """
    QuantizationConfig, _ = _library()
    qc = config.get("quantization_config", config)
    if not isinstance(qc, dict):
        raise FormatError(f"{source}: quantization_config must be an object")
    if qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{source}: quant_method is {qc.get('quant_method')!r}; expected "
                          f"{QUANT_METHOD!r}")
    try:
        parsed = QuantizationConfig.model_validate(qc)
    except Exception as e:  # pydantic's ValidationError, with the field named
        raise FormatError(f"{source}: quantization_config is not a valid compressed-tensors "
                          f"config: {e}") from None
    weights, formats = [], {str(parsed.format)}
    for gname, scheme in parsed.config_groups.items():
        if scheme.input_activations is not None or scheme.output_activations is not None:
            raise FormatError(f"{source}: config group {gname!r} quantizes activations; only "
                              f"weight-only schemes (e.g. W4A16) can be read")
        if scheme.weights is None:
            raise FormatError(f"{source}: config group {gname!r} has no weight scheme")
        if getattr(scheme, "format", None):
            formats.add(str(scheme.format))
        weights.append((gname, scheme.weights))
    if not weights:
        raise FormatError(f"{source}: quantization_config has no config_groups")
    bad_format = sorted(f for f in formats if f != PACKED_FORMAT)
    if bad_format:
        raise FormatError(f"{source}: format {bad_format[0]!r} is not supported; only "
                          f"{PACKED_FORMAT!r} (int weights packed in int32) is")
    first_name, args = weights[0]
    for gname, other in weights[1:]:
        if other != args:
            raise FormatError(f"{source}: config groups {first_name!r} and {gname!r} use "
                              f"different weight schemes; mixed schemes are not supported")
    where = f"{source}: config group {first_name!r} weights"
    if str(args.type) != "int":
        raise FormatError(f"{where}: type {args.type!r} is not supported; expected 'int'")
    if args.num_bits not in SUPPORTED_BITS:
        raise FormatError(f"{where}: num_bits {args.num_bits} is not supported; expected one "
                          f"of {list(SUPPORTED_BITS)}")
    if str(args.strategy) not in ("group", "channel"):
        raise FormatError(f"{where}: strategy {args.strategy!r} is not supported; expected "
                          f"'group' or 'channel'")
    if args.dynamic:
        raise FormatError(f"{where}: dynamic weight quantization has no stored scales")
    return args


def compressed_tensors_to_quantized_weight(
    tensors: dict[str, Tensor], args, *, name: str = "layer", source: str = ""
) -> tuple[QuantizedWeight, Tensor | None]:
    """Convert one pack-quantized linear (its ``weight_*`` tensors, keyed by suffix)
    to the project layout.

    Returns:
        ``(weight, input_permutation)``; the permutation is None unless a
        ``weight_g_idx`` that is not ``k // G`` is present.
    """
    _, unpack_from_int32 = _library()
    where = f"{source}: tensor {name}" if source else f"tensor {name}"
    bits = int(args.num_bits)
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        if suffix not in tensors:
            raise FormatError(f"{where}.{suffix} missing")
    packed, scale, shape = (tensors["weight_packed"], tensors["weight_scale"],
                            tensors["weight_shape"])
    if shape.dim() != 1 or shape.numel() != 2 or shape.is_floating_point():
        raise FormatError(f"{where}.weight_shape is {shape.dtype} {list(shape.shape)}; expected "
                          f"an integer [2] = [N, K]")
    N, K = (int(v) for v in shape.tolist())
    words = -(-K * bits // 32)
    if packed.dtype != torch.int32 or list(packed.shape) != [N, words]:
        raise FormatError(f"{where}.weight_packed is {packed.dtype} {list(packed.shape)}; "
                          f"expected int32 {[N, words]} (N={N}, K={K}, {bits} bits)")
    if str(args.strategy) == "channel":
        G = K
    else:
        G = int(args.group_size)
        if G <= 0:
            raise FormatError(f"{where}: group strategy with group_size {G}")
    groups = -(-K // G)
    if scale.dtype not in SCALE_DTYPES or list(scale.shape) != [N, groups]:
        raise FormatError(f"{where}.weight_scale is {scale.dtype} {list(scale.shape)}; "
                          f"expected a float tensor {[N, groups]} (N={N}, K={K}, G={G})")
    if groups > 1 and G % 32:
        raise FormatError(f"{where}: group size {G} is not supported by the QDEC packed layout "
                          f"(a multiple of 32, or one group per row)")
    half = 1 << (bits - 1)
    codes = (unpack_from_int32(packed, bits, torch.Size([N, K])).to(torch.int16) + half
             ).to(torch.uint8)
    zeros = None
    if not args.symmetric:
        zp = tensors.get("weight_zero_point")
        zwords = -(-N * bits // 32)
        if zp is None:
            raise FormatError(f"{where}.weight_zero_point missing (the scheme is asymmetric)")
        if zp.dtype != torch.int32 or list(zp.shape) != [zwords, groups]:
            raise FormatError(f"{where}.weight_zero_point is {zp.dtype} {list(zp.shape)}; "
                              f"expected int32 {[zwords, groups]} (packed along N)")
        signed = unpack_from_int32(zp, bits, torch.Size([N, groups]), packed_dim=0)
        zeros = (signed.to(torch.int16) + half).to(scale.dtype).contiguous()
    elif "weight_zero_point" in tensors and tensors["weight_zero_point"].any():
        raise FormatError(f"{where}.weight_zero_point is nonzero but the scheme is symmetric")
    perm = act_order_permutation(tensors.get("weight_g_idx"), K, G,
                                 where=f"{where}.weight_g_idx")
    if perm is not None:
        codes = codes[:, perm].contiguous()
    return QuantizedWeight(codes, scale.contiguous(), zeros, bits, -1 if groups == 1 else G,
                           K), perm


def read_compressed_tensors_checkpoint(directory: str | os.PathLike, *,
                                       allow_pickle: bool = False) -> ImportedCheckpoint:
    """Read a compressed-tensors ``pack-quantized`` checkpoint directory (``config.json``
    + safetensors, sharded or not) and convert every quantized linear.

    Every tensor that is not one of a quantized linear's ``weight_*`` tensors (norms,
    embeddings, ``lm_head``, ``<linear>.bias``) is kept as is.
    """
    directory = Path(os.fspath(directory))
    cfg_path = directory / "config.json"
    hf_config = read_json(cfg_path, "config")
    if "quantization_config" not in hf_config:
        raise FormatError(f"{cfg_path}: no quantization_config; not a compressed-tensors "
                          f"checkpoint")
    args = parse_compressed_tensors_config(hf_config, str(cfg_path))
    state = load_state_dict_dir(directory, allow_pickle=allow_pickle)
    names = sorted(k[: -len(".weight_packed")] for k in state if k.endswith(".weight_packed"))
    if not names:
        raise FormatError(f"{directory}: no '<name>.weight_packed' tensors found")
    linears: dict[str, PackedWeight] = {}
    used: set[str] = set()
    for name in names:
        parts = {s: state[f"{name}.{s}"] for s in LAYER_SUFFIXES if f"{name}.{s}" in state}
        used.update(f"{name}.{s}" for s in parts)
        w, perm = compressed_tensors_to_quantized_weight(parts, args, name=name,
                                                         source=str(directory))
        linears[name] = PackedWeight.from_quantized_weight(w, perm)
    tensors = {k: v for k, v in state.items() if k not in used}
    return ImportedCheckpoint("compressed-tensors", hf_config, linears, tensors,
                              {"quantization_config": hf_config["quantization_config"]})


__all__ = [
    "compressed_tensors_to_quantized_weight", "parse_compressed_tensors_config",
    "read_compressed_tensors_checkpoint",
]
