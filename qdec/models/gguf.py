"""A self-contained reader for GGUF v2/v3 files (llama.cpp's model format).

The file is memory-mapped (``numpy.memmap``); the header (typed metadata and
tensor infos) is parsed and validated eagerly, tensor data is only touched when
a tensor is requested. Every structural problem (truncation, bad magic,
unsupported version, absurd counts or lengths, tensors outside the file) raises
:class:`ValueError` naming the file, the field and the byte offset.

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

Dequantization (F32, F16, BF16, F64, I8-I64, Q4_0, Q4_1, Q8_0) is vectorized
over blocks with numpy; the formats follow ggml's ``dequantize_row_*``.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# ggml's GGML_MAX_DIMS: tensors have at most 4 dimensions.
MAX_DIMS = 4


class GGUFValueType(enum.IntEnum):
    """Type tags of metadata values."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


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


class GGMLType(enum.IntEnum):
    """ggml tensor types (ids as stored in the file)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# (weights per block, bytes per block) of every known type: needed to size and
# bounds-check tensors even of types this module cannot dequantize.
GGML_BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24), GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50), GGMLType.IQ4_NL: (32, 18), GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82), GGMLType.IQ4_XS: (256, 136), GGMLType.IQ1_M: (256, 56),
    GGMLType.TQ1_0: (256, 54), GGMLType.TQ2_0: (256, 66), GGMLType.MXFP4: (32, 17),
}

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


def _blocks(raw: np.ndarray, n_elements: int, block: int, block_bytes: int) -> np.ndarray:
    if n_elements % block:
        raise ValueError(f"{n_elements} elements are not a whole number of {block}-weight blocks")
    n_blocks = n_elements // block
    if raw.size != n_blocks * block_bytes:
        raise ValueError(f"expected {n_blocks * block_bytes} bytes ({n_blocks} blocks of "
                         f"{block_bytes}), got {raw.size}")
    return np.asarray(raw).reshape(n_blocks, block_bytes)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte ``at`` of every block, as float32 ``[n_blocks, 1]``."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[n, 16]`` packed bytes -> ``[n, 32]`` codes: low nibbles are weights 0..15,
    high nibbles weights 16..31 (ggml's order, not pairwise interleaved)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def dequantize(raw: np.ndarray, ggml_type: GGMLType | int, n_elements: int) -> np.ndarray:
    """Dequantize ``n_elements`` values of ``ggml_type`` from bytes ``raw``.

    Returns a new, writable flat ``float32`` array (integer types are converted to
    float32 as well).

    Raises:
        ValueError: ``raw`` has the wrong size for ``n_elements`` of that type.
        NotImplementedError: the type is valid but not supported here (k-quants, IQ*).
    """
    ggml_type = GGMLType(ggml_type)
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    plain = {GGMLType.F32: "<f4", GGMLType.F16: "<f2", GGMLType.F64: "<f8", GGMLType.I8: "<i1",
             GGMLType.I16: "<i2", GGMLType.I32: "<i4", GGMLType.I64: "<i8"}
    block, block_bytes = GGML_BLOCK_SIZES[ggml_type]
    if ggml_type in plain:
        _blocks(raw, n_elements, block, block_bytes)
        return np.frombuffer(raw.tobytes(), dtype=plain[ggml_type]).astype(np.float32)
    if ggml_type == GGMLType.BF16:
        _blocks(raw, n_elements, block, block_bytes)
        # bf16 is the top half of an fp32.
        bits = np.frombuffer(raw.tobytes(), dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    if ggml_type == GGMLType.Q4_0:
        # 2 B fp16 d | 16 B nibbles; y = (q - 8) * d
        b = _blocks(raw, n_elements, block, block_bytes)
        return ((_nibbles(b[:, 2:18]) - 8.0) * _f16(b, 0)).reshape(-1)
    if ggml_type == GGMLType.Q4_1:
        # 2 B fp16 d | 2 B fp16 m | 16 B nibbles; y = q * d + m
        b = _blocks(raw, n_elements, block, block_bytes)
        return (_nibbles(b[:, 4:20]) * _f16(b, 0) + _f16(b, 2)).reshape(-1)
    if ggml_type == GGMLType.Q8_0:
        # 2 B fp16 d | 32 x int8; y = q * d
        b = _blocks(raw, n_elements, block, block_bytes)
        q = np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.float32)
        return (q * _f16(b, 0)).reshape(-1)
    raise NotImplementedError(f"dequantization of ggml type {ggml_type.name} is not implemented "
                              "(supported: F32, F16, BF16, F64, I8-I64, Q4_0, Q4_1, Q8_0)")


def metadata_summary(gguf: GGUFFile, max_items: int = 8) -> Mapping[str, str]:
    """Short printable form of every metadata value (long arrays abbreviated)."""
    out: dict[str, str] = {}
    for key, value in gguf.metadata.items():
        if isinstance(value, (list, np.ndarray)) and len(value) > max_items:
            out[key] = f"[{len(value)} items: {list(value[:max_items])!r}...]"
        else:
            out[key] = repr(value)
    return out
