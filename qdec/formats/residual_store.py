"""The residual store file (``residual.safetensors``) and its host-memory loader.

For each quantized linear ``<name>`` with ``N`` outputs and ``K`` inputs, the file
holds (layout: :mod:`qdec.packing`, decode: :func:`qdec.reference.residual_rows_ref`)

* ``<name>.residual``: int32 ``[K, ceil(N/32) * residual_bits]``; row ``j`` is input
  channel ``j`` (so one decode-time fetch reads one contiguous row);
* ``<name>.residual_scales``: float32 ``[N]``;

with ``r[n, j] = (q[j, n] - 2**(residual_bits-1)) * residual_scales[n]``. The
``__metadata__`` key ``"qdec"`` holds a JSON object::

    {"format_version": 1, "kind": "residual", "residual_bits": 4,
     "layers": {"<name>": {"in_features": K, "out_features": N}, ...}}

and the file holds exactly the tensors its metadata lists. When the base weight
carries an input permutation (act-order GPTQ), residual row ``j`` belongs to the
weight's column ``j``, i.e. to input channel ``input_permutation[j]``.

:func:`load_residual_store` copies the tensors out of the file mapping into
page-locked (pinned) memory when a CUDA device is present, so that a GPU kernel
can read the selected rows over PCIe, and into ordinary memory otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..packing import check_bits, packed_words
from .safetensors_io import FormatError, SafetensorsFile, save_safetensors

RESIDUAL_FILE = "residual.safetensors"
RESIDUAL_FORMAT_VERSION = 1
METADATA_KEY = "qdec"


class ResidualLayer(NamedTuple):
    """One layer's residual: packed codes, per-output scales, code width."""

    residual: Tensor
    scales: Tensor
    bits: int

    @property
    def in_features(self) -> int:
        return self.residual.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    def nbytes(self) -> int:
        return (self.residual.numel() * self.residual.element_size()
                + self.scales.numel() * self.scales.element_size())


@dataclass
class ResidualStore:
    """Every layer's residual, resident in host memory.

    Attributes:
        layers: qualified linear name -> :class:`ResidualLayer` ``(residual, scales, bits)``.
        residual_bits: code width of every layer.
        pinned: whether the tensors live in page-locked memory.
        path: the file they came from (None if built in memory).
    """

    layers: dict[str, ResidualLayer]
    residual_bits: int
    pinned: bool = False
    path: str | None = None

    def layer_nbytes(self) -> dict[str, int]:
        """Host bytes per layer (packed codes + scales)."""
        return {name: layer.nbytes() for name, layer in self.layers.items()}

    def nbytes(self) -> int:
        """Total host bytes of the store."""
        return sum(self.layer_nbytes().values())

    def summary(self, max_layers: int = 8) -> str:
        """A few lines: total size and placement, then the largest layers."""
        sizes = self.layer_nbytes()
        where = "pinned host memory" if self.pinned else "host memory"
        lines = [f"residual store: {len(sizes)} layers, {self.residual_bits}-bit, "
                 f"{self.nbytes() / 2**20:.2f} MiB in {where}"
                 + (f" (from {self.path})" if self.path else "")]
        for name, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:max_layers]:
            layer = self.layers[name]
            lines.append(f"  {name}: [{layer.out_features} x {layer.in_features}] "
                         f"{n / 2**10:.1f} KiB")
        if len(sizes) > max_layers:
            lines.append(f"  ... and {len(sizes) - max_layers} more")
        return "\n".join(lines)


def check_residual_pair(where: str, name: str, residual: Tensor, scales: Tensor, bits: int,
                         in_features: int | None = None, out_features: int | None = None
                         ) -> tuple[int, int]:
    """Validate one layer's residual tensors; returns ``(K, N)``."""
    if not isinstance(scales, Tensor) or scales.dim() != 1 or scales.dtype != torch.float32:
        raise FormatError(f"{where}: tensor {name}.residual_scales must be float32 [N], got "
                          f"{getattr(scales, 'dtype', type(scales))} "
                          f"{list(getattr(scales, 'shape', []))}")
    N = scales.shape[0] if out_features is None else out_features
    if scales.shape[0] != N:
        raise FormatError(f"{where}: tensor {name}.residual_scales has shape "
                          f"{list(scales.shape)}; expected [{N}]")
    if not isinstance(residual, Tensor) or residual.dim() != 2 or residual.dtype != torch.int32:
        raise FormatError(f"{where}: tensor {name}.residual must be int32 [K, words], got "
                          f"{getattr(residual, 'dtype', type(residual))} "
                          f"{list(getattr(residual, 'shape', []))}")
    K = residual.shape[0] if in_features is None else in_features
    expected = [K, packed_words(N, bits)]
    if list(residual.shape) != expected:
        raise FormatError(f"{where}: tensor {name}.residual has shape {list(residual.shape)}; "
                          f"expected {expected} (K={K}, N={N}, residual_bits={bits})")
    return K, N


def save_residual_file(path: str | os.PathLike, residuals: Mapping[str, tuple[Tensor, Tensor]],
                       residual_bits: int, *, overwrite: bool = False) -> None:
    """Write ``{name: (residual, residual_scales)}`` as a residual store file (atomic).

    Raises:
        FormatError: a tensor has the wrong dtype or shape for ``residual_bits``.
    """
    path = os.fspath(path)
    try:
        check_bits(residual_bits, "residual_bits")
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, int]] = {}
    for name, pair in residuals.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise FormatError(f"{path}: residual of {name!r} must be (residual, scales)")
        residual, scales = pair
        K, N = check_residual_pair(path, name, residual, scales, residual_bits)
        tensors[f"{name}.residual"] = residual
        tensors[f"{name}.residual_scales"] = scales
        layers[name] = {"in_features": K, "out_features": N}
    meta = {"format_version": RESIDUAL_FORMAT_VERSION, "kind": "residual",
            "residual_bits": residual_bits, "layers": layers}
    save_safetensors(tensors, path, {METADATA_KEY: json.dumps(meta)}, overwrite=overwrite)


def _parse_metadata(path: str, metadata: Mapping[str, str]
                    ) -> tuple[int, dict[str, tuple[int, int]]]:
    if METADATA_KEY not in metadata:
        raise FormatError(f"{path}: __metadata__ has no {METADATA_KEY!r} entry; not a QDEC "
                          f"residual store")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: __metadata__[{METADATA_KEY!r}] is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: __metadata__[{METADATA_KEY!r}] must be a JSON object")
    if meta.get("format_version") != RESIDUAL_FORMAT_VERSION or meta.get("kind") != "residual":
        raise FormatError(f"{path}: expected a residual store of format_version "
                          f"{RESIDUAL_FORMAT_VERSION}, got format_version="
                          f"{meta.get('format_version')!r}, kind={meta.get('kind')!r}")
    bits = meta.get("residual_bits")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise FormatError(f"{path}: residual_bits must be an int in 2..8, got {bits!r}")
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise FormatError(f"{path}: metadata 'layers' must be an object, got {layers!r}")
    shapes: dict[str, tuple[int, int]] = {}
    for name, entry in layers.items():
        dims = [entry.get(k) if isinstance(entry, dict) else None
                for k in ("in_features", "out_features")]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise FormatError(f"{path}: metadata of layer {name!r} needs positive int "
                              f"in_features and out_features, got {entry!r}")
        shapes[name] = (dims[0], dims[1])
    return bits, shapes


def read_residual_file(path: str | os.PathLike,
                       expected_shapes: Mapping[str, tuple[int, int]] | None = None
                       ) -> tuple[int, dict[str, tuple[Tensor, Tensor]]]:
    """Validate a residual store file and return ``(residual_bits, {name: (residual,
    scales)})`` as memory-mapped tensors.

    Args:
        expected_shapes: optional ``{name: (K, N)}`` of the base weights; every layer of
            the file must be one of them, with the same shape.
    """
    f = SafetensorsFile(path)
    bits, shapes = _parse_metadata(f.path, f.metadata)
    expected_names: set[str] = set()
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, (K, N) in shapes.items():
        if expected_shapes is not None:
            if name not in expected_shapes:
                raise FormatError(f"{f.path}: layer {name!r} has a residual but is not a "
                                  f"quantized module of the checkpoint")
            if tuple(expected_shapes[name]) != (K, N):
                raise FormatError(f"{f.path}: layer {name!r} residual is K={K}, N={N}; the "
                                  f"base weight is K={expected_shapes[name][0]}, "
                                  f"N={expected_shapes[name][1]}")
        residual = f.get(f"{name}.residual", torch.int32, (K, packed_words(N, bits)))
        scales = f.get(f"{name}.residual_scales", torch.float32, (N,))
        expected_names.update((f"{name}.residual", f"{name}.residual_scales"))
        out[name] = (residual, scales)
    extra = sorted(set(f.keys()) - expected_names)
    if extra:
        raise FormatError(f"{f.path}: tensors not described by the metadata: {extra[:5]}")
    return bits, out


def _to_host(t: Tensor, pin: bool) -> Tensor:
    if pin:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t)
    # A private copy: the decode loop must not page-fault into the file mapping.
    return t.clone(memory_format=torch.contiguous_format)


def load_residual_store(path: str | os.PathLike, pin_memory: bool | None = None,
                        expected_shapes: Mapping[str, tuple[int, int]] | None = None
                        ) -> ResidualStore:
    """Load a residual store into host memory.

    Args:
        path: a ``residual.safetensors`` file, or a QDEC checkpoint directory holding one.
        pin_memory: place the tensors in page-locked memory. ``None`` (default) pins
            exactly when ``torch.cuda.is_available()``; ``True`` without CUDA is an error.
        expected_shapes: optional ``{name: (K, N)}`` to check the layers against.
    """
    path = Path(os.fspath(path))
    if path.is_dir():
        path = path / RESIDUAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no residual store file")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    elif pin_memory and not torch.cuda.is_available():
        raise RuntimeError("pin_memory=True needs a CUDA build of torch with a visible GPU; "
                           "pass pin_memory=None or False")
    bits, pairs = read_residual_file(path, expected_shapes)
    layers = {name: ResidualLayer(_to_host(r, pin_memory), _to_host(s, pin_memory), bits)
              for name, (r, s) in pairs.items()}
    return ResidualStore(layers, bits, bool(pin_memory), str(path))


__all__ = [
    "RESIDUAL_FILE", "ResidualLayer", "ResidualStore", "load_residual_store",
    "read_residual_file", "save_residual_file",
]
