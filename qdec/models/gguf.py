"""GGUF v2/v3 files (llama.cpp's model format): our validating header parser, the
``gguf`` package's dequantization.

The file is memory-mapped (``numpy.memmap``); the header (typed metadata and
tensor infos) is parsed and validated eagerly, tensor data is only touched when
a tensor is requested. Every structural problem (truncation, bad magic,
unsupported version, absurd counts or lengths, tensors outside the file or
overlapping) raises :class:`ValueError` naming the file, the field and the byte
offset.

Why the header is parsed here and not by ``gguf.GGUFReader`` (gguf 0.19.0,
measured on the embedded SmolLM2-135M Q4_1 file, one thread, on a shared
2-core machine; ``benchmarks/readers_load.py``):

* it takes 5.6-12.2 s and +145 MB peak RSS to open the file (it builds numpy
  views for each of the 49,152 vocabulary strings and merges) where this parser
  takes 0.5-1.1 s;
* its errors on malformed files are numpy's, naming neither file, field nor
  offset: an array length of 2**50 in a 100-byte file gives "When changing to a
  larger dtype, its size must be a divisor of the total size in bytes of the last
  axis of the array", a truncated Q8_0 tensor "cannot reshape array of size 24
  into shape (34,)"; it does not check for overlapping tensors.

Dequantization is the package's (:func:`gguf.quants.dequantize`, llama.cpp's own
reference code: every Q*/K/IQ type but the activation types Q8_1/Q8_K), faster
than the numpy code it replaced (2.9 s vs 4.7 s for all 272 tensors of that
file) and bit-identical on it (``tests/python/test_gguf.py`` pins the
dequantized Llama weights). The only
types it lacks, plain F64 and I8..I64, are converted here.

Layout (all integers little-endian)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv        (v1 used u32 counts)
    n_kv  x  { string key | u32 value_type | value }
    n_tensors x { string name | u32 n_dims | u64 dims[n_dims] | u32 ggml_type | u64 offset }
    padding to general.alignment (default 32)
    data section: tensor bytes at data_start + offset

A string is ``u64 length`` + UTF-8 bytes; an array is ``u32 element_type |
u64 count | elements``. GGUF lists dims fastest-varying first, so a tensor
listed as ``[K, N]`` is the row-major PyTorch ``[N, K]``; :class:`GGUFTensorInfo`
stores the PyTorch order.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf as _gguf
import numpy as np
import torch
from gguf.quants import dequantize as _dequantize

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# ggml's GGML_MAX_DIMS: tensors have at most 4 dimensions.
MAX_DIMS = 4


# The package's enums (same names and ids as ggml): value types of metadata, tensor types.
GGUFValueType = _gguf.GGUFValueType
GGMLType = _gguf.GGMLQuantizationType


# Fixed-size scalar value types -> little-endian numpy dtype.
_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}


# (weights per block, bytes per block) of every known type: needed to size and
# bounds-check tensors even of types that cannot be dequantized.
GGML_BLOCK_SIZES: Mapping[GGMLType, tuple[int, int]] = _gguf.GGML_QUANT_SIZES

# Types gguf.quants.dequantize does not handle (it raises NotImplementedError):
# plain numbers, converted here.
_PLAIN_DTYPES: dict[GGMLType, str] = {
    GGMLType.F64: "<f8", GGMLType.I8: "<i1", GGMLType.I16: "<i2", GGMLType.I32: "<i4",
    GGMLType.I64: "<i8"}

# Smallest possible encodings, used to reject absurd counts before looping:
# a KV is at least a u64 key length + u32 type + 1 value byte, a tensor info at
# least a u64 name length + u32 n_dims + u32 type + u64 offset.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's header entry.

    ``shape`` is in PyTorch (row-major, slowest-first) order, i.e. the reverse of
    the file's dims; ``offset`` is relative to the data section, ``file_offset``
    absolute.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int
    file_offset: int
    n_elements: int
    n_bytes: int


class GGUFFile:
    """A parsed, memory-mapped GGUF file (use :func:`read_gguf`).

    Attributes:
        path: the file.
        version: GGUF version (2 or 3).
        metadata: key -> value; scalars as Python ``int``/``float``/``bool``/``str``,
            arrays of numbers as numpy arrays, arrays of strings (or of arrays)
            as Python lists.
        metadata_types: key -> value type; arrays as ``(ARRAY, element_type)``.
        tensors: name -> :class:`GGUFTensorInfo`, in file order.
        alignment: data alignment (``general.alignment``, default 32).
        data_start: absolute offset of the data section.
    """

    def __init__(self, path: Path, data: np.memmap, version: int, metadata: dict[str, Any],
                 metadata_types: dict[str, Any], tensors: dict[str, GGUFTensorInfo],
                 alignment: int, data_start: int) -> None:
        self.path = path
        self._data = data
        self.version = version
        self.metadata = metadata
        self.metadata_types = metadata_types
        self.tensors = tensors
        self.alignment = alignment
        self.data_start = data_start

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, "
                f"{len(self.metadata)} metadata keys, {len(self.tensors)} tensors)")

    def __iter__(self) -> Iterator[GGUFTensorInfo]:
        return iter(self.tensors.values())

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value of ``key``, or ``default`` if absent."""
        return self.metadata.get(key, default)

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r} "
                           f"({len(self.tensors)} tensors in the file)") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only ``uint8`` view of the memory map."""
        info = self._info(name)
        return self._data[info.file_offset:info.file_offset + info.n_bytes]

    def dequantize(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` dequantized to a new ``dtype`` tensor of its PyTorch shape."""
        info = self._info(name)
        try:
            values = dequantize(self.raw(name), info.ggml_type, info.n_elements)
        except (ValueError, NotImplementedError) as e:
            raise type(e)(f"{self.path}: tensor {name!r} at offset {info.file_offset}: {e}") from e
        return torch.from_numpy(values).reshape(info.shape).to(dtype)


class _Cursor:
    """Bounds-checked little-endian reads from the memory-mapped header."""

    def __init__(self, path: Path, buf: np.ndarray) -> None:
        self.path = path
        self.buf = buf
        self.size = int(buf.shape[0])
        self.pos = 0

    def fail(self, field: str, offset: int, problem: str) -> ValueError:
        return ValueError(f"{self.path}: {field} at offset {offset}: {problem}")

    def need(self, n: int, field: str) -> int:
        """Reserve ``n`` bytes for ``field``; return their start offset."""
        start = self.pos
        if n < 0 or start + n > self.size:
            raise self.fail(field, start, f"needs {n} bytes but the file ends at {self.size} "
                            "(truncated or corrupt file)")
        self.pos = start + n
        return start

    def unpack(self, fmt: str, field: str) -> Any:
        start = self.need(struct.calcsize(fmt), field)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def u32(self, field: str) -> int:
        return self.unpack("<I", field)

    def u64(self, field: str) -> int:
        return self.unpack("<Q", field)

    def string(self, field: str) -> str:
        length_at = self.pos
        length = self.u64(f"{field} (string length)")
        if length > self.size - self.pos:
            raise self.fail(field, length_at, f"string length {length} exceeds the "
                            f"{self.size - self.pos} bytes left in the file")
        start = self.need(length, field)
        try:
            return bytes(self.buf[start:start + length]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(field, start, f"string is not valid UTF-8 ({e})") from None

    def value_type(self, field: str) -> GGUFValueType:
        at = self.pos
        raw = self.u32(field)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(field, at, f"unknown value type {raw} (expected 0..12)") from None

    def value(self, vtype: GGUFValueType, field: str) -> tuple[Any, Any]:
        """Read a value of type ``vtype``; return ``(value, type descriptor)``."""
        if vtype == GGUFValueType.STRING:
            return self.string(field), vtype
        if vtype == GGUFValueType.ARRAY:
            return self.array(field)
        dt = _SCALAR_DTYPES[vtype]
        start = self.need(dt.itemsize, field)
        v = np.frombuffer(self.buf, dtype=dt, count=1, offset=start)[0].item()
        if vtype == GGUFValueType.BOOL:
            if v not in (0, 1):
                raise self.fail(field, start, f"bool value must be 0 or 1, got {v}")
            v = bool(v)
        return v, vtype

    def array(self, field: str) -> tuple[Any, Any]:
        etype = self.value_type(f"{field} array element type")
        count_at = self.pos
        count = self.u64(f"{field} (array length)")
        left = self.size - self.pos
        # Every element takes at least one byte (a string at least its u64 length).
        min_elem = (8 if etype == GGUFValueType.STRING else 12 if etype == GGUFValueType.ARRAY
                    else _SCALAR_DTYPES[etype].itemsize)
        if count * min_elem > left:
            raise self.fail(field, count_at, f"array of {count} {etype.name} elements needs at "
                            f"least {count * min_elem} bytes, only {left} left in the file")
        if etype in _SCALAR_DTYPES:
            dt = _SCALAR_DTYPES[etype]
            start = self.need(count * dt.itemsize, field)
            values = np.frombuffer(self.buf, dtype=dt, count=count, offset=start).copy()
            if etype == GGUFValueType.BOOL:
                if values.size and values.max() > 1:
                    raise self.fail(field, start, "bool array holds values other than 0/1")
                values = values.astype(bool)
            return values, (GGUFValueType.ARRAY, etype)
        items, item_type = [], etype
        for i in range(count):
            v, item_type = self.value(etype, f"{field}[{i}]")
            items.append(v)
        return items, (GGUFValueType.ARRAY, item_type)


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF v2/v3 file; tensor data stays memory-mapped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a valid GGUF v2/v3 file; the message names the
            file, the field and its byte offset.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: magic at offset 0: empty file, not a GGUF file")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(path, data)

    magic = bytes(data[:4])
    if len(magic) < 4 and GGUF_MAGIC.startswith(magic):
        raise cur.fail("magic", 0, f"the file is only {len(magic)} bytes long (truncated)")
    if magic != GGUF_MAGIC:
        raise cur.fail("magic", 0, f"expected b'GGUF', got {magic!r}: not a GGUF file")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        hint = (" (a big-endian file?)" if version >= 1 << 16 else
                " (GGUF v1 is obsolete; re-convert the model)" if version == 1 else "")
        raise cur.fail("version", 4, f"unsupported GGUF version {version}, expected one of "
                       f"{SUPPORTED_VERSIONS}{hint}")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata KV count")
    left = cur.size - cur.pos
    if n_kv * _MIN_KV_BYTES > left:
        raise cur.fail("metadata KV count", 16, f"{n_kv} KVs cannot fit in the {left} bytes left")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > left:
        raise cur.fail("tensor count", 8, f"{n_tensors} tensor infos cannot fit in the {left} "
                       "bytes left")

    metadata: dict[str, Any] = {}
    metadata_types: dict[str, Any] = {}
    for i in range(n_kv):
        key_at = cur.pos
        key = cur.string(f"metadata KV #{i} key")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r}", key_at, "duplicate key")
        vtype = cur.value_type(f"metadata {key!r} value type")
        metadata[key], metadata_types[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and (
            metadata_types["general.alignment"] != GGUFValueType.UINT32
            or alignment <= 0 or alignment & (alignment - 1)):
        raise ValueError(f"{path}: metadata 'general.alignment' must be a power-of-two UINT32, "
                         f"got {alignment!r} ({metadata_types['general.alignment']})")

    infos: list[tuple[str, tuple[int, ...], GGMLType, int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        info_at = cur.pos
        name = cur.string(f"tensor info #{i} name")
        if name in names:
            raise cur.fail(f"tensor {name!r}", info_at, "duplicate tensor name")
        names.add(name)
        dims_at = cur.pos
        n_dims = cur.u32(f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} n_dims", dims_at,
                           f"{n_dims} dimensions, expected 1..{MAX_DIMS}")
        dims = [cur.u64(f"tensor {name!r} dim {d}") for d in range(n_dims)]
        type_at = cur.pos
        raw_type = cur.u32(f"tensor {name!r} type")
        try:
            ggml_type = GGMLType(raw_type)
        except ValueError:
            raise cur.fail(f"tensor {name!r} type", type_at,
                           f"unknown ggml type {raw_type}") from None
        offset_at = cur.pos
        offset = cur.u64(f"tensor {name!r} offset")
        n_elements = 1
        for d in dims:
            if d == 0:
                raise cur.fail(f"tensor {name!r} dims", dims_at, f"zero-sized dimension in {dims}")
            n_elements *= d
        if n_elements >= 1 << 62:
            raise cur.fail(f"tensor {name!r} dims", dims_at, f"absurd shape {dims}")
        block, _ = GGML_BLOCK_SIZES[ggml_type]
        if dims[0] % block:
            raise cur.fail(f"tensor {name!r} dims", dims_at, f"first dim {dims[0]} is not a "
                           f"multiple of the {ggml_type.name} block size {block}")
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} offset", offset_at,
                           f"data offset {offset} is not a multiple of the alignment {alignment}")
        infos.append((name, tuple(reversed(dims)), ggml_type, offset, n_elements))

    data_start = _align(cur.pos, alignment)
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, ggml_type, offset, n_elements in infos:
        block, block_bytes = GGML_BLOCK_SIZES[ggml_type]
        n_bytes = n_elements // block * block_bytes
        file_offset = data_start + offset
        if file_offset + n_bytes > cur.size:
            raise ValueError(
                f"{path}: tensor {name!r} data at offset {file_offset}: {n_bytes} bytes of "
                f"{ggml_type.name} {list(shape)} run past the end of the file ({cur.size} bytes)")
        tensors[name] = GGUFTensorInfo(name, shape, ggml_type, offset, file_offset, n_elements,
                                       n_bytes)
    # Overlapping tensors mean a corrupt table (llama.cpp writes them back to back).
    spans = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(spans, spans[1:]):
        if a.offset + a.n_bytes > b.offset:
            raise ValueError(f"{path}: tensor {b.name!r} data at offset {b.file_offset} overlaps "
                             f"tensor {a.name!r} ({a.file_offset}..{a.file_offset + a.n_bytes})")
    return GGUFFile(path, data, version, metadata, metadata_types, tensors, alignment, data_start)


def dequantize(raw: np.ndarray, ggml_type: GGMLType | int, n_elements: int) -> np.ndarray:
    """Dequantize ``n_elements`` values of ``ggml_type`` from bytes ``raw``.

    Returns a new, writable flat ``float32`` array (integer types are converted to
    float32 as well).

    Raises:
        ValueError: ``raw`` has the wrong size for ``n_elements`` of that type.
        NotImplementedError: the type is valid but the ``gguf`` package cannot
            dequantize it (e.g. Q8_1, Q8_K).
    """
    ggml_type = GGMLType(ggml_type)
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    block, block_bytes = GGML_BLOCK_SIZES[ggml_type]
    if n_elements % block:
        raise ValueError(f"{n_elements} elements are not a whole number of {block}-weight blocks")
    if raw.size != n_elements // block * block_bytes:
        raise ValueError(f"expected {n_elements // block * block_bytes} bytes "
                         f"({n_elements // block} blocks of {block_bytes}), got {raw.size}")
    if ggml_type in _PLAIN_DTYPES:
        return raw.view(_PLAIN_DTYPES[ggml_type]).astype(np.float32)
    try:
        values = np.asarray(_dequantize(raw, ggml_type), dtype=np.float32).reshape(-1)
    except NotImplementedError:
        raise NotImplementedError(f"dequantization of ggml type {ggml_type.name} is not "
                                  f"implemented by the gguf package") from None
    # F32 comes back as a view of the (read-only) memory map.
    return values if values.flags.writeable else values.copy()


def metadata_summary(gguf: GGUFFile, max_items: int = 8) -> Mapping[str, str]:
    """Short printable form of every metadata value (long arrays abbreviated)."""
    out: dict[str, str] = {}
    for key, value in gguf.metadata.items():
        if isinstance(value, (list, np.ndarray)) and len(value) > max_items:
            out[key] = f"[{len(value)} items: {list(value[:max_items])!r}...]"
        else:
            out[key] = repr(value)
    return out
