"""The QDEC checkpoint: a directory a Python or C++ loader can read without transformers.

Layout (format version 1)::

    <dir>/config.json           the model's Hugging Face config, plus a "qdec" section
    <dir>/model.safetensors     every tensor of the model, quantized linears packed
    <dir>/residual.safetensors  the residual store (optional; qdec.residual_store)
    <dir>/<extra files>         e.g. tokenizer files, copied verbatim (optional)

``config.json`` is the HF config with its original ``quantization_config`` (if any)
moved to ``qdec.source.quantization_config`` (so transformers does not try to load
the directory as an AWQ/GPTQ model), a new ``quantization_config`` block
``{"quant_method": "qdec", ...}`` (:func:`quantization_config_block`; how vLLM and
other servers recognise the checkpoint, transformers ignores an unknown method),
and::

    "qdec": {
      "format_version": 1,
      "method": "gptq",              # free text: rtn | awq | gptq | omniquant | autoawq | ...
      "bits": 3,                     # common value over the layers, null if they differ
      "group_size": 128,             # likewise (-1: one group per row)
      "symmetric": false,            # likewise
      "residual_bits": 4,            # null when there is no residual.safetensors
      "quantized_modules": ["model.layers.0.self_attn.q_proj", ...],
      "source": {...}                # optional provenance, never needed to load
    }

``model.safetensors`` holds every non-quantized tensor under its HF name (norms,
embeddings, biases ``<name>.bias`` of quantized linears, ...) and, for each
quantized linear ``<name>`` with ``N`` outputs, ``K`` inputs, ``b`` bits and group
size ``G`` (``-1``: ``G = K``):

======================  ==============  ======================================
tensor                  dtype           shape
======================  ==============  ======================================
``<name>.qweight``      I32             ``[N, ceil(K/32) * b]`` (:mod:`qdec.packing`)
``<name>.scales``       F16, BF16, F32  ``[N, ceil(K/G)]``
``<name>.zeros``        = scales        ``[N, ceil(K/G)]``, only if asymmetric
``<name>.input_perm``   I32             ``[K]``, only if the layer has one
======================  ==============  ======================================

with ``W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]`` (``z = 2**(b-1)`` when
symmetric; zeros are floats in code units). No ``<name>.weight`` is stored. With
``input_perm`` (act-order GPTQ), column ``j`` of ``W`` multiplies input channel
``input_perm[j]``: the layer computes ``y = W @ x[..., input_perm]``.

Its ``__metadata__`` has ``"format": "pt"`` and ``"qdec"``, a JSON string::

    {"format_version": 1,
     "layers": {"<name>": {"bits": 3, "group_size": 128, "in_features": K,
                           "out_features": N, "symmetric": false,
                           "scale_dtype": "F16", "input_permutation": false}, ...}}

which is authoritative per layer (mixed bit widths are allowed); the config's
``bits``/``group_size``/``symmetric`` must agree with it where not null.

The writer validates everything first, then builds the directory under a
temporary name and renames it into place (:func:`atomic_directory`). The reader
checks every tensor against the metadata and names file, tensor, expected and
found values on any mismatch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..packing import check_bits, packed_words
from ..quant.grid import SCALE_DTYPES, QuantizedWeight, check_group_size, num_groups
from .residual_store import (
    RESIDUAL_FILE,
    ResidualStore,
    check_residual_pair,
    load_residual_store,
    read_residual_file,
    save_residual_file,
)
from .safetensors_io import (
    DTYPES,
    FormatError,
    SafetensorsFile,
    atomic_directory,
    dtype_name,
    read_json,
    save_safetensors,
    write_json_atomic,
)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
METADATA_KEY = "qdec"
# Per-layer tensor suffixes of a quantized linear (bias is an ordinary tensor).
QUANT_SUFFIXES = ("qweight", "scales", "zeros", "input_perm")


@dataclasses.dataclass
class PackedWeight:
    """A quantized linear in the project layout, codes packed.

    Attributes:
        qweight: int32 ``[N, ceil(K/32) * bits]``.
        scales: ``[N, ceil(K/G)]``, float16 / bfloat16 / float32.
        zeros: like ``scales``, or None (symmetric, ``z = 2**(bits-1)``).
        bits, group_size, in_features: as in :class:`qdec.quant.QuantizedWeight`.
        input_permutation: int64 ``[K]`` or None. When set, column ``j`` of the
            weight multiplies input channel ``input_permutation[j]``; the caller
            must feed ``x[..., input_permutation]`` (act-order GPTQ, see
            :mod:`qdec.formats.gptq`).
    """

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group_size: int
    in_features: int
    input_permutation: Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @classmethod
    def from_quantized_weight(cls, weight: QuantizedWeight,
                              input_permutation: Tensor | None = None) -> "PackedWeight":
        return cls(weight.pack(), weight.scales, weight.zeros, weight.bits, weight.group_size,
                   weight.in_features, input_permutation)

    def to_quantized_weight(self) -> QuantizedWeight:
        """Unpacked codes (the permutation, if any, is not applied)."""
        return QuantizedWeight.from_packed(self.qweight, self.scales, self.zeros, self.bits,
                                           self.group_size, self.in_features)

    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales, self.zeros, self.input_permutation]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def layer_metadata(self) -> dict[str, object]:
        """This layer's entry of the ``model.safetensors`` metadata."""
        return {"bits": self.bits, "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features,
                "symmetric": self.symmetric, "scale_dtype": dtype_name(self.scales.dtype),
                "input_permutation": self.input_permutation is not None}

    def validate(self, name: str, where: str = "") -> None:
        """Raise :class:`FormatError` (naming ``where``, the tensor, expected and found
        values) unless every tensor matches the declared sizes."""
        at = f"{where}: " if where else ""
        try:
            check_bits(self.bits)
            check_group_size(self.group_size)
        except ValueError as e:
            raise FormatError(f"{at}layer {name!r}: {e}") from None
        K = self.in_features
        if not isinstance(K, int) or K <= 0:
            raise FormatError(f"{at}layer {name!r}: in_features must be a positive int, got {K!r}")
        q = self.qweight
        if q.dtype != torch.int32 or q.dim() != 2 or q.shape[0] == 0:
            raise FormatError(f"{at}tensor {name}.qweight must be non-empty int32 [N, words], "
                              f"got {q.dtype} {list(q.shape)}")
        N, groups = q.shape[0], num_groups(K, self.group_size)
        expected = [N, packed_words(K, self.bits)]
        if list(q.shape) != expected:
            raise FormatError(f"{at}tensor {name}.qweight has shape {list(q.shape)}; expected "
                              f"{expected} (N={N}, K={K}, bits={self.bits})")
        if self.scales.dtype not in SCALE_DTYPES:
            raise FormatError(f"{at}tensor {name}.scales has dtype {self.scales.dtype}; expected "
                              f"one of {[dtype_name(d) for d in SCALE_DTYPES]}")
        for suffix, t in (("scales", self.scales), ("zeros", self.zeros)):
            if t is None:
                continue
            if list(t.shape) != [N, groups] or t.dtype != self.scales.dtype:
                raise FormatError(f"{at}tensor {name}.{suffix} is {t.dtype} {list(t.shape)}; "
                                  f"expected {self.scales.dtype} {[N, groups]} (K={K}, "
                                  f"group_size={self.group_size})")
        p = self.input_permutation
        if p is not None:
            if p.dtype not in (torch.int32, torch.int64) or list(p.shape) != [K]:
                raise FormatError(f"{at}tensor {name}.input_perm must be an int [{K}] tensor, "
                                  f"got {p.dtype} {list(p.shape)}")
            if not torch.equal(torch.sort(p.long()).values, torch.arange(K)):
                raise FormatError(f"{at}tensor {name}.input_perm is not a permutation of "
                                  f"0..{K - 1}")


def _as_packed(name: str, w: PackedWeight | QuantizedWeight) -> PackedWeight:
    if isinstance(w, PackedWeight):
        return w
    if isinstance(w, QuantizedWeight):
        return PackedWeight.from_quantized_weight(w)
    raise FormatError(f"layer {name!r}: expected a PackedWeight or QuantizedWeight, got "
                      f"{type(w).__name__}")


@dataclasses.dataclass
class ImportedCheckpoint:
    """A foreign quantized checkpoint (AutoAWQ, GPTQ, OmniQuant) converted to the
    project layout, ready for :func:`write_qdec_checkpoint`.

    Attributes:
        format: what was read, e.g. ``"autoawq-gemm"``, ``"gptq-v1"``, ``"omniquant-real"``.
        hf_config: the model's ``config.json`` as read (``{}`` if there was none).
        linears: qualified linear name -> weight in the project layout.
        tensors: every other tensor (norms, embeddings, biases ``<name>.bias``, ...).
        quantization: the quantization settings that were applied (bits, group size,
            zero convention, ...), kept as provenance.
    """

    format: str
    hf_config: dict
    linears: dict[str, PackedWeight]
    tensors: dict[str, Tensor]
    quantization: dict

    def write(self, path: str | os.PathLike, *, method: str | None = None,
              overwrite: bool = False,
              extra_files: Mapping[str, str | os.PathLike] | None = None) -> Path:
        """Save as a QDEC checkpoint without a residual store (a residual needs the
        original weights; add it with :func:`write_qdec_checkpoint`)."""
        return write_qdec_checkpoint(path, hf_config=self.hf_config, linears=self.linears,
                                     tensors=self.tensors, method=method or self.format,
                                     source={"format": self.format, **self.quantization},
                                     extra_files=extra_files, overwrite=overwrite)


@dataclasses.dataclass
class QDECCheckpoint:
    """A QDEC checkpoint read by :func:`read_qdec_checkpoint`.

    ``linears`` and ``tensors`` are memory-mapped from ``model.safetensors``;
    ``residual`` (if loaded) lives in host memory, pinned when a GPU is present.
    """

    path: str
    config: dict
    linears: dict[str, PackedWeight]
    tensors: dict[str, Tensor]
    residual: ResidualStore | None

    @property
    def qdec(self) -> dict:
        """The ``qdec`` section of ``config.json``."""
        return self.config[METADATA_KEY]

    def hf_config(self) -> dict:
        """``config.json`` without the ``qdec`` section."""
        return {k: v for k, v in self.config.items() if k != METADATA_KEY}

    def packed_linears(self) -> dict:
        """``{name: qdec.patch.PackedLinear}`` for :func:`qdec.patch.patch`.

        A layer's input permutation (act-order GPTQ) travels with it:
        ``QDECLinear`` gathers its input in that order, and the residual store
        of such a layer is in the same permuted channel order.
        """
        from ..patch import PackedLinear

        out = {}
        for name, w in self.linears.items():
            r = None if self.residual is None else self.residual.layers.get(name)
            out[name] = PackedLinear(w.qweight, w.scales, w.zeros, w.bits, w.group_size,
                                     w.in_features,
                                     None if r is None else r.residual,
                                     None if r is None else r.scales,
                                     self.residual.residual_bits if r is not None else 4,
                                     w.input_permutation)
        return out


def _common(values: list) -> object:
    return values[0] if values and all(v == values[0] for v in values) else None


def _json_safe(obj: object, what: str) -> object:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise FormatError(f"{what} is not JSON-serializable ({e})") from None


def checkpoint_config(hf_config: Mapping, layers: Mapping[str, Mapping], method: str,
                      residual_bits: int | None, source: Mapping | None = None) -> dict:
    """The checkpoint's ``config.json``: ``hf_config`` plus the ``qdec`` section.

    ``layers`` maps each quantized linear, in file order, to its
    :meth:`PackedWeight.layer_metadata`; ``residual_bits`` is None when no
    residual store is written. Any ``quantization_config`` moves to
    ``qdec.source`` (module docstring)."""
    config = copy.deepcopy(dict(_json_safe(dict(hf_config), "hf_config")))
    config.pop(METADATA_KEY, None)
    src = dict(_json_safe(dict(source or {}), "source"))
    if "quantization_config" in config:
        src.setdefault("quantization_config", config.pop("quantization_config"))
    entries = list(layers.values())
    section = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "bits": _common([e["bits"] for e in entries]),
        "group_size": _common([e["group_size"] for e in entries]),
        "symmetric": _common([e["symmetric"] for e in entries]),
        "residual_bits": residual_bits,
        "quantized_modules": list(layers),
    }
    if src:
        section["source"] = src
    config[METADATA_KEY] = section
    config["quantization_config"] = quantization_config_block(section)
    return config


QUANT_METHOD = "qdec"
# Keys of the quantization_config block copied from the "qdec" section.
_BLOCK_KEYS = ("format_version", "bits", "group_size", "symmetric", "residual_bits")


def quantization_config_block(section: Mapping) -> dict:
    """The ``quantization_config`` entry of a QDEC checkpoint's ``config.json``.

    The one definition of that block: ``{"quant_method": "qdec", "format_version",
    "bits", "group_size", "symmetric", "residual_bits"}`` copied from the ``qdec``
    section (null where layers differ; the per-layer metadata of
    ``model.safetensors`` is authoritative). Serving frameworks (the vLLM plugin
    :mod:`qdec.vllm`, a transformers integration) recognise a QDEC checkpoint by
    ``quant_method``; the block may also carry an optional ``k`` (see
    :func:`read_quantization_config`), which ``qdec quantize`` does not write.
    """
    return {"quant_method": QUANT_METHOD, **{key: section.get(key) for key in _BLOCK_KEYS}}


def _check_k_value(where: str, what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{where}: {what} must be a number, got {value!r}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise FormatError(f"{where}: {what} as a fraction must be in [0, 1], got {value}")
    if isinstance(value, int) and value < 0:
        raise FormatError(f"{where}: {what} as a channel count must be >= 0, got {value}")


def read_quantization_config(config: Mapping, where: str = "config.json") -> dict:
    """The QDEC settings of a ``config.json`` (as a dict), validated.

    Accepts a whole ``config.json`` (its ``quantization_config`` block with
    ``quant_method: "qdec"`` or, for checkpoints written before that block
    existed, its ``qdec`` section) or the block alone, as vLLM hands it over.

    Returns:
        ``{"format_version", "bits", "group_size", "symmetric", "residual_bits",
        "k"}`` where ``k`` is ``0`` when absent, else an int channel count, a float
        fraction of each layer's input channels, or a mapping from a projection
        name (``q_proj``, ``down_proj``, ...) to either.

    Raises:
        FormatError: naming ``where`` and the offending key.
    """
    if not isinstance(config, Mapping):
        raise FormatError(f"{where}: expected a JSON object, got {type(config).__name__}")
    block = config.get("quantization_config")
    if config.get("quant_method") is not None:
        block = config
    if block is None:
        section = config.get(METADATA_KEY)
        if not isinstance(section, Mapping):
            raise FormatError(f"{where}: neither a quantization_config with quant_method "
                              f"{QUANT_METHOD!r} nor a {METADATA_KEY!r} section; not a QDEC "
                              f"checkpoint")
        block = quantization_config_block(section)
    if not isinstance(block, Mapping) or block.get("quant_method") != QUANT_METHOD:
        found = block.get("quant_method") if isinstance(block, Mapping) else block
        raise FormatError(f"{where}: quantization_config.quant_method is {found!r}; expected "
                          f"{QUANT_METHOD!r}")
    if block.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{where}: quantization_config.format_version is "
                          f"{block.get('format_version')!r}; this reader knows version "
                          f"{FORMAT_VERSION}")
    bits, rbits = block.get("bits"), block.get("residual_bits")
    for key, value in (("bits", bits), ("residual_bits", rbits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 2 <= value <= 8):
            raise FormatError(f"{where}: quantization_config.{key} must be null or an int in "
                              f"2..8, got {value!r}")
    k = block.get("k", 0)
    if isinstance(k, Mapping):
        for proj, value in k.items():
            _check_k_value(where, f"quantization_config.k[{proj!r}]", value)
        k = dict(k)
    else:
        _check_k_value(where, "quantization_config.k", k)
    out = {key: block.get(key) for key in _BLOCK_KEYS}
    out["k"] = k
    return out


KSpec = int | float | dict[str, int | float]


def k_for_linear(spec: KSpec, name: str, in_features: int) -> int:
    """Channels compensated per token for linear ``name`` (full name, e.g.
    ``model.layers.3.mlp.down_proj``) with ``in_features`` inputs, from a k
    specification as :func:`read_quantization_config` returns it.

    The one resolution rule every loader uses (the patch path, ``qdec
    generate``, the vLLM plugin, a transformers integration): a mapping is
    looked up by full name, then by the last name component (``down_proj``),
    absent = 0 (a per-linear *k map* written by :mod:`qdec.budget` names every
    linear); a float is a fraction of ``in_features``, rounded as
    :attr:`qdec.nn.QDECLinear.k` rounds it (Python's ``round``); an int is a
    channel count.

    Raises:
        ValueError: the resolved k is outside ``[0, in_features]``.
    """
    if isinstance(spec, Mapping):
        spec = spec.get(name, spec.get(name.rsplit(".", 1)[-1], 0))
    k = round(spec * in_features) if isinstance(spec, float) else int(spec)
    if not 0 <= k <= in_features:
        raise ValueError(f"k for {name} must be in [0, {in_features}], got {k}")
    return k


def checkpoint_k_map(config: Mapping, in_features: Mapping[str, int],
                     where: str = "config.json") -> dict[str, int]:
    """The k of every linear in ``in_features`` (name -> input channels) set by
    a checkpoint's ``config.json`` (``quantization_config.k``: a count, a
    fraction, a per-projection or a per-linear mapping; absent = 0).

    Raises:
        FormatError: the config is not a valid QDEC config, or its k resolves
            outside ``[0, in_features]`` for some linear (naming it).
    """
    spec = read_quantization_config(config, where)["k"]
    out = {}
    for name, K in in_features.items():
        try:
            out[name] = k_for_linear(spec, name, K)
        except ValueError as e:
            raise FormatError(f"{where}: quantization_config.k: {e}") from None
    return out


def write_k_map(path: str | os.PathLike, k_map: Mapping[str, int],
                allocation: Mapping | None = None) -> Path:
    """Store a per-linear k map (full linear name -> channel count) in the
    checkpoint directory ``path``: ``config.json``'s ``quantization_config.k``
    (what every loader reads, :func:`checkpoint_k_map`) and, when given, how
    it was chosen under ``qdec.k_allocation`` (budget, bytes per token, gain
    measure). The file is replaced atomically.

    Raises:
        FormatError: ``path`` is not a QDEC checkpoint, or ``k_map`` names a
            linear the checkpoint does not quantize or has a k that is not an
            int in ``[0, in_features]``.
    """
    path = Path(os.fspath(path))
    cfg_path = path / CONFIG_FILE
    config = read_json(str(cfg_path), "config")
    section = _parse_section(str(cfg_path), config)
    layers = read_qdec_checkpoint(path, load_residual=False).linears
    for name, k in k_map.items():
        if name not in layers:
            raise FormatError(f"{cfg_path}: k map names {name!r}, not a quantized linear of "
                              f"this checkpoint")
        K = layers[name].in_features
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= K:
            raise FormatError(f"{cfg_path}: k of {name} must be an int in [0, {K}], got {k!r}")
    block = dict(config.get("quantization_config") or quantization_config_block(section))
    block["k"] = {name: int(k) for name, k in k_map.items()}
    config["quantization_config"] = block
    if allocation is not None:
        section["k_allocation"] = dict(_json_safe(dict(allocation), "allocation"))
    write_json_atomic(config, cfg_path, overwrite=True)
    return cfg_path


def model_file_metadata(layers: Mapping[str, Mapping]) -> dict[str, str]:
    """The ``__metadata__`` of ``model.safetensors`` for these per-layer entries
    (:meth:`PackedWeight.layer_metadata`, in file order)."""
    meta = {"format_version": FORMAT_VERSION, "layers": {n: dict(e) for n, e in layers.items()}}
    return {"format": "pt", METADATA_KEY: json.dumps(meta)}


def write_qdec_checkpoint(
    path: str | os.PathLike,
    *,
    hf_config: Mapping,
    linears: Mapping[str, PackedWeight | QuantizedWeight],
    tensors: Mapping[str, Tensor],
    method: str,
    residuals: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    residual_bits: int | None = None,
    source: Mapping | None = None,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a QDEC checkpoint directory (layout: module docstring), atomically.

    Args:
        path: output directory; refused if it exists unless ``overwrite``.
        hf_config: the model's HF config as a dict (``model.config.to_dict()``).
        linears: qualified linear name -> quantized weight.
        tensors: every non-quantized tensor of the model under its HF name; must not
            contain ``<linear>.weight`` (or any ``<linear>.*`` other than ``.bias``).
        method: how the weights were quantized (recorded, free text).
        residuals: ``{name: (residual int32 [K, ceil(N/32)*rb], scales float32 [N])}``
            for a subset of ``linears``; needs ``residual_bits``.
        source: provenance recorded under ``qdec.source``.
        extra_files: ``{file name in the checkpoint: source path}`` copied verbatim.

    Returns:
        The checkpoint directory.
    """
    path = Path(os.fspath(path))
    where = str(path)
    if not isinstance(method, str) or not method:
        raise FormatError(f"{where}: method must be a non-empty string, got {method!r}")
    if not linears:
        raise FormatError(f"{where}: no quantized linears to write")
    packed = {name: _as_packed(name, w) for name, w in linears.items()}
    for name, w in packed.items():
        if not isinstance(name, str) or not name:
            raise FormatError(f"{where}: invalid linear name {name!r}")
        w.validate(name, where)
    for tname in tensors:
        owner, _, suffix = tname.rpartition(".")
        if owner in packed and suffix != "bias":
            raise FormatError(f"{where}: tensor {tname!r} belongs to quantized linear {owner!r}; "
                              f"only {owner}.bias may be stored beside its packed weight")
    if residuals:
        if residual_bits is None:
            raise FormatError(f"{where}: residuals given without residual_bits")
        try:
            check_bits(residual_bits, "residual_bits")
        except ValueError as e:
            raise FormatError(f"{where}: {e}") from None
        unknown = sorted(set(residuals) - set(packed))
        if unknown:
            raise FormatError(f"{where}: residuals for layers that are not quantized linears: "
                              f"{unknown[:5]}")
        for name, pair in residuals.items():
            w = packed[name]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise FormatError(f"{where}: residual of {name!r} must be (residual, scales)")
            check_residual_pair(where, name, pair[0], pair[1], residual_bits,
                                 w.in_features, w.out_features)
    elif residual_bits is not None:
        raise FormatError(f"{where}: residual_bits={residual_bits} given without residuals")
    extra_files = dict(extra_files or {})
    for fname, src in extra_files.items():
        if (os.path.basename(fname) != fname or fname in (CONFIG_FILE, MODEL_FILE, RESIDUAL_FILE)
                or fname in ("", ".", "..")):
            raise FormatError(f"{where}: extra file name {fname!r} must be a plain file name "
                              f"other than the checkpoint's own files")
        if not os.path.isfile(src):
            raise FileNotFoundError(f"extra file {src} (for {fname!r}) does not exist")

    config = checkpoint_config(hf_config, {n: w.layer_metadata() for n, w in packed.items()},
                               method, residual_bits if residuals else None, source)

    out: dict[str, Tensor] = dict(tensors)
    for name, w in packed.items():
        out[f"{name}.qweight"] = w.qweight
        out[f"{name}.scales"] = w.scales
        if w.zeros is not None:
            out[f"{name}.zeros"] = w.zeros
        if w.input_permutation is not None:
            out[f"{name}.input_perm"] = w.input_permutation.to(torch.int32)
    file_meta = model_file_metadata({name: w.layer_metadata() for name, w in packed.items()})

    with atomic_directory(path, overwrite) as tmp:
        save_safetensors(out, tmp / MODEL_FILE, file_meta)
        if residuals:
            save_residual_file(tmp / RESIDUAL_FILE, residuals, residual_bits)
        write_json_atomic(config, tmp / CONFIG_FILE)
        for fname, src_path in extra_files.items():
            shutil.copyfile(src_path, tmp / fname)
            with open(tmp / fname, "rb+") as f:
                os.fsync(f.fileno())
    return path


def _parse_section(cfg_path: str, config: dict) -> dict:
    section = config.get(METADATA_KEY)
    if not isinstance(section, dict):
        raise FormatError(f"{cfg_path}: no '{METADATA_KEY}' section; not a QDEC checkpoint")
    if section.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{cfg_path}: qdec.format_version is {section.get('format_version')!r}; "
                          f"this reader knows version {FORMAT_VERSION}")
    modules = section.get("quantized_modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise FormatError(f"{cfg_path}: qdec.quantized_modules must be a list of names")
    if len(set(modules)) != len(modules):
        raise FormatError(f"{cfg_path}: qdec.quantized_modules lists a module twice")
    if not isinstance(section.get("method"), str):
        raise FormatError(f"{cfg_path}: qdec.method must be a string")
    rb = section.get("residual_bits")
    if rb is not None and (not isinstance(rb, int) or isinstance(rb, bool) or not 2 <= rb <= 8):
        raise FormatError(f"{cfg_path}: qdec.residual_bits must be null or an int in 2..8, "
                          f"got {rb!r}")
    block = config.get("quantization_config")
    if isinstance(block, Mapping) and block.get("quant_method") == QUANT_METHOD:
        settings = read_quantization_config(block, cfg_path)
        for key in _BLOCK_KEYS:
            if settings[key] != section.get(key):
                raise FormatError(f"{cfg_path}: quantization_config.{key} is {settings[key]!r} "
                                  f"but qdec.{key} is {section.get(key)!r}")
    return section


def _layer_entry(where: str, name: str, entry: object) -> dict:
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: metadata of layer {name!r} must be an object")
    ints = ("bits", "group_size", "in_features", "out_features")
    for key in ints:
        v = entry.get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise FormatError(f"{where}: metadata of layer {name!r}: {key} must be an int, "
                              f"got {v!r}")
    for key in ("symmetric", "input_permutation"):
        if not isinstance(entry.get(key), bool):
            raise FormatError(f"{where}: metadata of layer {name!r}: {key} must be a bool, "
                              f"got {entry.get(key)!r}")
    if entry.get("scale_dtype") not in [dtype_name(d) for d in SCALE_DTYPES]:
        raise FormatError(f"{where}: metadata of layer {name!r}: scale_dtype must be one of "
                          f"{[dtype_name(d) for d in SCALE_DTYPES]}, got "
                          f"{entry.get('scale_dtype')!r}")
    try:
        check_bits(entry["bits"])
        check_group_size(entry["group_size"])
    except ValueError as e:
        raise FormatError(f"{where}: metadata of layer {name!r}: {e}") from None
    if entry["in_features"] <= 0 or entry["out_features"] <= 0:
        raise FormatError(f"{where}: metadata of layer {name!r}: in_features and out_features "
                          f"must be positive")
    return entry


def read_qdec_checkpoint(path: str | os.PathLike, *, load_residual: bool = True,
                         pin_memory: bool | None = None) -> QDECCheckpoint:
    """Read and fully validate a QDEC checkpoint directory.

    Args:
        load_residual: also load ``residual.safetensors`` (when the config declares
            one) into host memory via :func:`load_residual_store`.
        pin_memory: passed to :func:`load_residual_store` (None: pin iff CUDA).

    Raises:
        FormatError: a missing file, tensor or metadata entry, or a tensor whose dtype
            or shape disagrees with the metadata (naming the file and tensor).
    """
    path = Path(os.fspath(path))
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    cfg_path = str(path / CONFIG_FILE)
    config = read_json(cfg_path, "config")
    section = _parse_section(cfg_path, config)
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise FormatError(f"{model_path}: file missing")
    f = SafetensorsFile(model_path)
    where = f.path
    if METADATA_KEY not in f.metadata:
        raise FormatError(f"{where}: __metadata__ has no {METADATA_KEY!r} entry")
    try:
        meta = json.loads(f.metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: __metadata__[{METADATA_KEY!r}] is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{where}: __metadata__[{METADATA_KEY!r}] must be an object with "
                          f"format_version {FORMAT_VERSION}")
    layer_meta = meta.get("layers")
    if not isinstance(layer_meta, dict):
        raise FormatError(f"{where}: __metadata__[{METADATA_KEY!r}] has no 'layers' object")
    modules = section["quantized_modules"]
    if set(layer_meta) != set(modules):
        missing = sorted(set(modules) - set(layer_meta))
        extra = sorted(set(layer_meta) - set(modules))
        raise FormatError(f"{where}: layer metadata does not match {cfg_path} "
                          f"qdec.quantized_modules: missing {missing[:5]}, extra {extra[:5]}")

    linears: dict[str, PackedWeight] = {}
    used: set[str] = set()
    for name in modules:
        e = _layer_entry(where, name, layer_meta[name])
        for key in ("bits", "group_size", "symmetric"):
            if section.get(key) is not None and section[key] != e[key]:
                raise FormatError(f"{where}: layer {name!r} has {key}={e[key]!r} but "
                                  f"{cfg_path} says {section[key]!r} for every layer")
        N, K, bits = e["out_features"], e["in_features"], e["bits"]
        groups = num_groups(K, e["group_size"])
        sdtype = DTYPES[e["scale_dtype"]][0]
        qweight = f.get(f"{name}.qweight", torch.int32, (N, packed_words(K, bits)))
        scales = f.get(f"{name}.scales", sdtype, (N, groups))
        used.update((f"{name}.qweight", f"{name}.scales"))
        zeros = None
        if not e["symmetric"]:
            zeros = f.get(f"{name}.zeros", sdtype, (N, groups))
            used.add(f"{name}.zeros")
        perm = None
        if e["input_permutation"]:
            perm = f.get(f"{name}.input_perm", torch.int32, (K,)).long()
            used.add(f"{name}.input_perm")
        for suffix in QUANT_SUFFIXES + ("weight",):
            t = f"{name}.{suffix}"
            if t in f and t not in used:
                raise FormatError(f"{where}: unexpected tensor {t!r} (layer {name!r} is "
                                  f"{'symmetric' if e['symmetric'] else 'asymmetric'}, "
                                  f"input_permutation={e['input_permutation']})")
        w = PackedWeight(qweight, scales, zeros, bits, e["group_size"], K, perm)
        w.validate(name, where)
        linears[name] = w
    tensors = {n: f.get(n) for n in f.keys() if n not in used}

    residual = None
    rb = section.get("residual_bits")
    res_path = path / RESIDUAL_FILE
    if rb is None and res_path.exists():
        raise FormatError(f"{res_path}: present, but {cfg_path} has qdec.residual_bits null")
    if rb is not None:
        if not res_path.is_file():
            raise FormatError(f"{res_path}: file missing ({cfg_path} declares residual_bits="
                              f"{rb})")
        if load_residual:
            shapes = {n: (w.in_features, w.out_features) for n, w in linears.items()}
            residual = load_residual_store(res_path, pin_memory, shapes)
            if residual.residual_bits != rb:
                raise FormatError(f"{res_path}: residual_bits is {residual.residual_bits}; "
                                  f"{cfg_path} says {rb}")
    return QDECCheckpoint(str(path), config, linears, tensors, residual)


def verify_qdec_checkpoint(path: str | os.PathLike, *, require_residual: bool = False
                           ) -> QDECCheckpoint:
    """Validate a whole QDEC checkpoint without copying its residual store.

    Everything :func:`read_qdec_checkpoint` checks, plus every tensor of
    ``residual.safetensors`` against the base weights (memory-mapped, not
    loaded). A server calls this before it uses any weight.

    Args:
        require_residual: also refuse a checkpoint in which some quantized module
            has no residual (a server that compensates every projection needs one).

    Returns:
        The checkpoint with ``residual=None`` (tensors memory-mapped).

    Raises:
        FormatError: naming the file and tensor that is missing or malformed.
    """
    ckpt = read_qdec_checkpoint(path, load_residual=False)
    res_path = Path(ckpt.path) / RESIDUAL_FILE
    if ckpt.qdec.get("residual_bits") is None:
        if require_residual:
            raise FormatError(f"{res_path}: file missing (and {Path(ckpt.path) / CONFIG_FILE} "
                              f"has qdec.residual_bits null); every quantized module needs a "
                              f"residual, e.g. tensor {next(iter(ckpt.linears))}.residual")
        return ckpt
    shapes = {n: (w.in_features, w.out_features) for n, w in ckpt.linears.items()}
    _, pairs = read_residual_file(res_path, shapes)
    if require_residual:
        missing = [n for n in ckpt.linears if n not in pairs]
        if missing:
            raise FormatError(f"{res_path}: tensor {missing[0]}.residual missing ({len(missing)} "
                              f"quantized modules have no residual)")
    return ckpt


def save_quantization_result(path: str | os.PathLike, result, model: torch.nn.Module, *,
                             overwrite: bool = False,
                             extra_files: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Write a :class:`qdec.quant.QuantizationResult` and its model as a QDEC checkpoint.

    The non-quantized tensors come from ``model.state_dict()`` (which already holds
    any AWQ-rescaled norm weights). For every quantized linear only ``<name>.bias``
    is kept from the model. A tied ``lm_head.weight`` (same storage as
    ``model.embed_tokens.weight`` with ``tie_word_embeddings``) is not stored twice;
    transformers re-ties it on load.
    """
    hf_config = model.config.to_dict()
    state = model.state_dict()
    quantized = set(result.linears)
    tensors: dict[str, Tensor] = {}
    for key, t in state.items():
        owner, _, suffix = key.rpartition(".")
        if owner in quantized and suffix != "bias":
            continue
        tensors[key] = t
    emb, head = tensors.get("model.embed_tokens.weight"), tensors.get("lm_head.weight")
    if (hf_config.get("tie_word_embeddings") and emb is not None and head is not None
            and head.data_ptr() == emb.data_ptr() and head.shape == emb.shape):
        del tensors["lm_head.weight"]
    residuals = {name: (r.residual, r.residual_scales) for name, r in result.linears.items()
                 if r.residual is not None}
    rbits = {r.residual_bits for name, r in result.linears.items() if r.residual is not None}
    if len(rbits) > 1:
        raise FormatError(f"{path}: layers use different residual_bits {sorted(rbits)}; one "
                          f"residual store holds one width")
    return write_qdec_checkpoint(
        path, hf_config=hf_config,
        linears={name: r.weight for name, r in result.linears.items()},
        tensors=tensors, method=result.method, residuals=residuals or None,
        residual_bits=rbits.pop() if residuals else None,
        source={"quantizer": result.method, "propagate": getattr(result, "propagate", None)},
        extra_files=extra_files, overwrite=overwrite)


__all__ = [
    "CONFIG_FILE", "FORMAT_VERSION", "ImportedCheckpoint", "MODEL_FILE", "PackedWeight",
    "QDECCheckpoint", "QUANT_METHOD", "checkpoint_config", "checkpoint_k_map", "k_for_linear",
    "model_file_metadata",
    "quantization_config_block", "read_qdec_checkpoint", "read_quantization_config",
    "save_quantization_result", "verify_qdec_checkpoint",
    "write_k_map", "write_qdec_checkpoint",
]
