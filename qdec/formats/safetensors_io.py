"""A strict safetensors reader and an atomic writer, written for this project.

File layout (https://huggingface.co/docs/safetensors, little-endian throughout)::

    u64 header_len | header_len bytes of UTF-8 JSON | data section

The JSON header is an object mapping each tensor name to
``{"dtype": "F16", "shape": [2, 3], "data_offsets": [begin, end]}`` (offsets
relative to the start of the data section) plus an optional ``"__metadata__"``
object of string to string.

The reader validates the whole header before it touches any tensor data, and
every error is a :class:`FormatError` that names the file and, where one is at
fault, the tensor:

* ``header_len`` fits in the file and is at most 100 MB (:data:`MAX_HEADER_BYTES`);
* the header is UTF-8, a JSON object, and has no duplicate keys;
* every entry has exactly the keys ``dtype`` (one of :data:`DTYPES`), ``shape``
  (non-negative ints) and ``data_offsets`` (two ints, ``begin <= end``);
* ``end - begin == numel * itemsize``;
* the ranges lie inside the data section, do not overlap, and cover it with no
  gap or trailing bytes (the official reader's rule: a file is its header plus
  exactly its tensors);
* ``__metadata__`` maps str to str.

Tensors are read zero-copy from a private (copy-on-write) memory map, so opening
a multi-GB file costs nothing until a tensor is used, and writing into a returned
tensor never changes the file. A tensor whose offset is not a multiple of its
item size (legal, but never produced by the official writer) is copied instead.

Pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ...) can run arbitrary code when
loaded; they are refused unless the caller passes ``allow_pickle=True``, and even
then are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


class FormatError(ValueError):
    """A checkpoint file is malformed or does not match what was expected.

    Messages name the file and, where one is at fault, the tensor, and give the
    expected and the actual values."""


# Largest header accepted (the limit of the reference implementation).
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype string -> (torch dtype, item size in bytes).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F64": (torch.float64, 8),
}
TORCH_TO_DTYPE: dict[torch.dtype, str] = {t: name for name, (t, _) in DTYPES.items()}

# Suffixes of pickle-based checkpoints (torch.save / pickle).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float16`` -> ``"F16"``)."""
    try:
        return TORCH_TO_DTYPE[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} has no safetensors encoding") from None


@dataclass(frozen=True)
class TensorInfo:
    """One validated header entry; ``begin``/``end`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: entries in file order, metadata, and where data starts."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    data_len: int


def _reject_duplicate_keys(path: str):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise FormatError(f"{path}: header has the key {key!r} twice")
            out[key] = value
        return out

    return hook


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(path: str, name: str, entry: object, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not name:
        raise FormatError(f"{path}: a tensor has an empty name")
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: header entry must be an object, got {type(entry).__name__}")
    keys = set(entry)
    if keys != _ENTRY_KEYS:
        missing, extra = sorted(_ENTRY_KEYS - keys), sorted(keys - _ENTRY_KEYS)
        raise FormatError(f"{where}: header entry must have exactly the keys "
                          f"{sorted(_ENTRY_KEYS)}; missing {missing}, unexpected {extra}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    offsets = entry["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)):
        raise FormatError(f"{where}: data_offsets must be [begin, end] ints, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise FormatError(f"{where}: data_offsets {offsets} must satisfy 0 <= begin <= end")
    if end > data_len:
        raise FormatError(f"{where}: data_offsets end {end} lies beyond the data section of "
                          f"{data_len} bytes (truncated file?)")
    numel = math.prod(shape)
    expected = numel * DTYPES[dtype][1]
    if end - begin != expected:
        raise FormatError(f"{where}: data_offsets {offsets} span {end - begin} bytes; "
                          f"{dtype} {shape} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and fully validate the header of a safetensors file (no tensor data is read).

    Raises:
        FormatError: anything malformed, naming the file (and tensor).
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise FormatError(f"{path}: {file_size} bytes is too short for a safetensors file "
                              f"(needs an 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            raise FormatError(f"{path}: header length {header_len} exceeds the "
                              f"{file_size - 8} bytes after the length field (truncated or "
                              f"not a safetensors file)")
        if header_len > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: header length {header_len} exceeds the limit of "
                              f"{MAX_HEADER_BYTES} bytes")
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise FormatError(f"{path}: could read only {len(raw)} of {header_len} header bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: header is not valid UTF-8 ({e})") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicate_keys(path))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object, got {type(header).__name__}")

    data_start = 8 + header_len
    data_len = file_size - data_start
    metadata = header.pop(_METADATA_KEY, {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"{path}: {_METADATA_KEY} must map strings to strings, got "
                          f"{json.dumps(metadata)[:200]}")
    tensors = {name: _parse_entry(path, name, entry, data_len) for name, entry in header.items()}

    # The ranges must tile the data section exactly: no overlap, no gap, no tail.
    covered = 0
    previous = None
    for info in sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.begin):
        if info.begin < covered:
            raise FormatError(f"{path}: tensor {info.name!r} data_offsets "
                              f"[{info.begin}, {info.end}] overlap tensor {previous!r} "
                              f"(which ends at {covered})")
        if info.begin > covered:
            raise FormatError(f"{path}: data bytes [{covered}, {info.begin}) before tensor "
                              f"{info.name!r} belong to no tensor")
        covered, previous = info.end, info.name
    if covered != data_len:
        raise FormatError(f"{path}: data section has {data_len} bytes but the tensors cover "
                          f"{covered} (trailing bytes)")
    return SafetensorsHeader(path, tensors, dict(metadata), data_start, data_len)


class SafetensorsFile:
    """A validated safetensors file whose tensors are read lazily from a memory map.

    >>> with SafetensorsFile("model.safetensors") as f:
    ...     w = f.get("lm_head.weight")

    Returned tensors stay valid after :meth:`close` (they keep the mapping alive).
    """

    def __init__(self, path: str | os.PathLike):
        self.header = read_header(path)
        self.path = self.header.path
        self._mmap: mmap.mmap | None = None

    # -- header access -------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.header.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.header.tensors

    def __len__(self) -> int:
        return len(self.header.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def info(self, name: str) -> TensorInfo:
        """The header entry of ``name`` (FormatError naming the file if absent)."""
        try:
            return self.header.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: missing tensor {name!r}") from None

    # -- data access ---------------------------------------------------------------
    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            if sys.byteorder != "little":
                raise FormatError(f"{self.path}: safetensors data is little-endian; reading it "
                                  f"on a big-endian host is not supported")
            with open(self.path, "rb") as f:
                # ACCESS_COPY: pages are shared with the page cache until written, and a
                # write into a tensor never reaches the file.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mmap

    def get(self, name: str, dtype: torch.dtype | None = None,
            shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor ``name`` as a CPU tensor backed by the file mapping.

        If ``dtype``/``shape`` are given they are checked first, and a mismatch is a
        :class:`FormatError` naming the file, the tensor, expected and found values.
        """
        info = self.info(name)
        if dtype is not None and info.torch_dtype != dtype:
            raise FormatError(f"{self.path}: tensor {name!r} has dtype {info.dtype}; expected "
                              f"{dtype_name(dtype)}")
        if shape is not None and tuple(info.shape) != tuple(shape):
            raise FormatError(f"{self.path}: tensor {name!r} has shape {list(info.shape)}; "
                              f"expected {list(shape)}")
        tdtype, itemsize = DTYPES[info.dtype]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=tdtype)
        offset = self.header.data_start + info.begin
        if offset % itemsize:
            # Misaligned element access is undefined for some kernels: copy instead.
            raw = torch.frombuffer(self._map(), dtype=torch.uint8, count=info.nbytes,
                                   offset=offset)
            return raw.clone().view(tdtype).reshape(info.shape)
        return torch.frombuffer(self._map(), dtype=tdtype, count=info.numel,
                                offset=offset).reshape(info.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, by name (memory-mapped)."""
        return {name: self.get(name) for name in self.header.tensors}

    def close(self) -> None:
        """Drop this object's reference to the mapping; tensors already returned keep
        it alive until they are freed."""
        self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (validated; memory-mapped)."""
    return SafetensorsFile(path).tensors()


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The validated ``__metadata__`` of a safetensors file."""
    return read_header(path).metadata


# ---------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    # A rename is durable only once its directory entry is flushed; not every
    # platform can open a directory, which is harmless to skip.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_tensors_for_writing(tensors: Mapping[str, torch.Tensor], path: str
                               ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == _METADATA_KEY:
            raise FormatError(f"{path}: invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"{path}: tensor {name!r} is a {type(t).__name__}, not a "
                              f"torch.Tensor")
        dtype_name(t.dtype)  # raises for dtypes safetensors cannot store
        out[name] = t.detach().to("cpu").contiguous()
    return out


@contextlib.contextmanager
def _atomic_file(path: str, overwrite: bool) -> Iterator[object]:
    """Open a temporary file beside ``path``; on success fsync it and rename it
    over ``path``; on failure remove it."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} appeared while it was being written")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, *,
                     overwrite: bool = False) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically.

    Tensors are copied to contiguous CPU memory. Data is laid out by decreasing item
    size, then name, after a header padded with spaces to a multiple of 8 bytes, so
    every tensor is aligned to its item size (what the official writer does). The
    file is written to a temporary name in the same directory, fsynced, then renamed
    over ``path``; ``path`` is never partially written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FormatError: a name, tensor or metadata entry cannot be stored.
    """
    path = os.fspath(path)
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise FormatError(f"{path}: metadata must map str to str, got {k!r}: "
                              f"{type(v).__name__}")
    cpu = _check_tensors_for_writing(tensors, path)
    order = sorted(cpu, key=lambda n: (-cpu[n].element_size(), n))
    header: dict[str, object] = {}
    if metadata:
        header[_METADATA_KEY] = metadata
    offset = 0
    for name in order:
        t = cpu[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    if len(blob) > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: header would be {len(blob)} bytes, over the limit of "
                          f"{MAX_HEADER_BYTES}")
    with _atomic_file(path, overwrite) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            t = cpu[name]
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build an output directory atomically.

    Yields an empty temporary directory beside ``path``; when the block succeeds the
    temporary directory is renamed to ``path`` (an existing ``path`` is replaced only
    with ``overwrite=True``). When the block raises, the temporary directory is
    removed and ``path`` is untouched, so a failure never leaves a partial output.

    With ``overwrite=True`` the old directory is first renamed aside and deleted
    after the new one is in place; a crash between the two renames leaves the old
    one under a hidden ``.<name>.old-*`` name rather than a half-written ``path``.
    """
    path = Path(os.path.abspath(os.fspath(path)))
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output directory {path} exists; pass overwrite=True to "
                              f"replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        _fsync_dir(str(tmp))
        old = None
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"output directory {path} appeared while it was being "
                                      f"written")
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "previous")
        os.replace(tmp, path)
        _fsync_dir(str(path.parent))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(obj: object, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file, fsync, rename)."""
    path = os.fspath(path)
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    with _atomic_file(path, overwrite) as f:
        f.write(text.encode("utf-8"))


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """A JSON object from ``path`` (FormatError naming the file if it is not one)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: {what} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: {what} is not valid UTF-8 JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------
# State dicts: single files, pickle refusal, HF sharded directories
# ---------------------------------------------------------------------------------


def _pickle_suffix(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)


def _pickle_content(path: str) -> bool:
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; a bare pickle starts with PROTO (0x80) and a
    # protocol number. Only consulted once a file has failed as safetensors, since
    # a valid safetensors header length can start with the same bytes.
    return magic == b"PK\x03\x04" or (magic[:1] == b"\x80" and 2 <= magic[1:2][0] <= 5)


def _load_pickle(path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise FormatError(f"{path}: refusing to load a pickle checkpoint (it could run "
                          f"arbitrary code). Convert it to safetensors, or pass "
                          f"allow_pickle=True to load it with torch.load(weights_only=True)")
    with open(path, "rb") as fh:  # a file object: torch.load must not dispatch on suffix
        obj = torch.load(fh, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(
            obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise FormatError(f"{path}: pickle checkpoint is not a dict of str to tensor")
    return dict(obj)


def load_state_dict_file(path: str | os.PathLike, *, allow_pickle: bool = False
                         ) -> dict[str, torch.Tensor]:
    """Tensors of one checkpoint file.

    safetensors files go through the strict reader. Pickle files (by suffix, or a
    file that is not valid safetensors but starts like a pickle or a torch.save zip)
    are refused unless ``allow_pickle=True``, because unpickling can run arbitrary
    code; when allowed they are loaded with ``torch.load(weights_only=True)`` onto
    the CPU.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if _pickle_suffix(path):
        return _load_pickle(path, allow_pickle)
    try:
        return load_safetensors(path)
    except FormatError:
        if _pickle_content(path):
            return _load_pickle(path, allow_pickle)
        raise


def _shard_path(directory: str, index_path: str, shard: object) -> str:
    if (not isinstance(shard, str) or not shard or os.path.basename(shard) != shard
            or shard in (".", "..")):
        raise FormatError(f"{index_path}: shard file name must be a plain file name in the "
                          f"same directory, got {shard!r}")
    return os.path.join(directory, shard)


def load_sharded(directory: str, index_name: str,
                 load_shard: Callable[[str], Mapping[str, T]]) -> dict[str, T]:
    """Every tensor of a sharded checkpoint, as ``load_shard(path)`` gives it
    (tensors, or only their locations). The index must map tensor names to
    plain file names in ``directory``; each shard must exist and hold the
    tensors the index assigns it, and no tensor may appear in two shards."""
    index_path = os.path.join(directory, index_name)
    index = read_json(index_path, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index_path}: 'weight_map' must be a non-empty object of "
                          f"tensor name to shard file")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(_shard_path(directory, index_path, shard), []).append(name)
    out: dict[str, T] = {}
    origin: dict[str, str] = {}
    for shard, names in by_shard.items():
        if not os.path.isfile(shard):
            raise FormatError(f"{index_path}: shard {os.path.basename(shard)!r} (holding "
                              f"{names[0]!r} and {len(names) - 1} more) does not exist")
        tensors = load_shard(shard)
        for name in names:
            if name not in tensors:
                raise FormatError(f"{shard}: missing tensor {name!r}, which {index_path} "
                                  f"places in this shard")
        for name, t in tensors.items():
            if name in out:
                raise FormatError(f"{shard}: tensor {name!r} also appears in {origin[name]}")
            out[name], origin[name] = t, shard
    return out


def load_state_dict_dir(directory: str | os.PathLike, *, allow_pickle: bool = False
                        ) -> dict[str, torch.Tensor]:
    """The whole state dict of a Hugging Face model directory.

    Looks for, in order: ``model.safetensors.index.json`` (sharded safetensors; each
    shard must exist, hold the tensors the index assigns it, and no tensor may
    appear in two shards), ``model.safetensors``, then the pickle equivalents
    (``pytorch_model.bin.index.json`` / ``pytorch_model.bin``, refused unless
    ``allow_pickle=True``). safetensors tensors are memory-mapped.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such model directory")
    if os.path.isfile(os.path.join(directory, SAFETENSORS_INDEX)):
        return load_sharded(directory, SAFETENSORS_INDEX,
                            lambda p: load_state_dict_file(p, allow_pickle=allow_pickle))
    single = os.path.join(directory, SAFETENSORS_SINGLE)
    if os.path.isfile(single):
        return load_safetensors(single)
    for name in (PICKLE_INDEX, PICKLE_SINGLE):
        if os.path.isfile(os.path.join(directory, name)):
            if not allow_pickle:
                raise FormatError(f"{directory}: only pickle weights ({name}) found; refusing "
                                  f"to load them (they could run arbitrary code). Convert to "
                                  f"safetensors, or pass allow_pickle=True")
            if name == PICKLE_INDEX:
                return load_sharded(directory, name, lambda p: load_state_dict_file(
                    p, allow_pickle=allow_pickle))
            return load_state_dict_file(os.path.join(directory, name), allow_pickle=True)
    found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if len(found) == 1:
        return load_safetensors(os.path.join(directory, found[0]))
    raise FormatError(f"{directory}: no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE} "
                      f"(safetensors files present: {found or 'none'})")


__all__ = [
    "DTYPES", "FormatError", "MAX_HEADER_BYTES", "SafetensorsFile", "SafetensorsHeader",
    "TensorInfo", "atomic_directory", "dtype_name", "load_safetensors",
    "load_state_dict_dir", "load_state_dict_file", "read_header", "read_json",
    "read_metadata", "save_safetensors", "write_json_atomic",
]
