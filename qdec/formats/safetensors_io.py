"""safetensors reading through the ``safetensors`` library, the checks it lacks, and
atomic writers.

File layout (https://huggingface.co/docs/safetensors, little-endian throughout)::

    u64 header_len | header_len bytes of UTF-8 JSON | data section

The JSON header maps each tensor name to ``{"dtype": "F16", "shape": [2, 3],
"data_offsets": [begin, end]}`` (offsets relative to the data section) plus an
optional ``"__metadata__"`` object of string to string.

Validation and loading are the library's (:func:`safetensors.safe_open`): header
length (at most 100 MB), UTF-8, JSON schema, dtypes, ``end - begin == numel *
itemsize``, and ranges that tile the data section with no overlap, gap or
trailing bytes. Tensors come zero-copy from a private (copy-on-write) memory map
of the file: opening a multi-GB file costs nothing until a tensor is used, and
writing into a returned tensor never changes the file.

What this module adds:

* every error is a :class:`FormatError` naming the file and, where one is at
  fault, the tensor (the library names neither the file nor, for size and range
  errors, the tensor; :func:`_library_error` finds it);
* checks the library does not make: duplicate header keys (it keeps the last one
  silently), unknown keys in an entry, empty tensor names, and dtypes the library
  knows but torch cannot hold (``F4``, ``F6_*``, ...);
* the tensors' byte offsets (:func:`read_header`; the library validates them but
  does not expose them), which :mod:`qdec.quant.streaming` reads by ``pread``;
* atomic writers (temp file, fsync, rename), and the refusal of pickle checkpoints
  (``.bin``, ``.pt``, ...), which can run arbitrary code when loaded, unless the
  caller passes ``allow_pickle=True`` (then ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open

T = TypeVar("T")


class FormatError(ValueError):
    """A checkpoint file is malformed or does not match what was expected.

    Messages name the file and, where one is at fault, the tensor, and give the
    expected and the actual values."""


# Largest header the writer produces (the library's reading limit).
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


def _raw_header(path: str) -> tuple[bytes, int, int]:
    """The header bytes as the length field bounds them, the length field, and the
    data section's length."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        (header_len,) = struct.unpack("<Q", prefix.ljust(8, b"\0"))
        raw = f.read(min(header_len, MAX_HEADER_BYTES))
    return raw, header_len, os.path.getsize(path) - 8 - header_len


def _entry_problem(name: str, entry: object, data_len: int) -> str | None:
    """Why a header entry is bad, in words, or None (used only to name the tensor
    behind an error the library reports without a name)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return f"malformed header entry {json.dumps(entry)[:200]}"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    ints = [*shape, *offsets] if isinstance(shape, list) and isinstance(offsets, list) else [None]
    if (dtype not in DTYPES or len(offsets) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints)):
        return f"malformed header entry {json.dumps(entry)[:200]}"
    begin, end = offsets
    if end > data_len:
        return (f"data_offsets end {end} lies beyond the data section of {data_len} bytes "
                f"(truncated file?)")
    needed = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != needed:
        return f"data_offsets {offsets} span {end - begin} bytes; {dtype} {shape} needs {needed}"
    return None


def _library_error(path: str, error: Exception) -> FormatError:
    """The library's error with the file and, where the library does not give it, the
    tensor at fault named."""
    message = str(error)
    named = re.search(r"tensor `([^`]*)`", message)
    if named:
        return FormatError(f"{path}: tensor {named.group(1)!r}: {message}")
    with contextlib.suppress(OSError):
        raw, header_len, data_len = _raw_header(path)
        message += (f" (the length field says {header_len} header bytes; the file has "
                    f"{os.path.getsize(path)} bytes)")
    with contextlib.suppress(OSError, ValueError):  # an unreadable header: the library's words
        header = json.loads(raw.decode("utf-8"))
        if isinstance(header, dict):
            metadata = header.pop(_METADATA_KEY, None) or {}
            if not isinstance(metadata, dict) or not all(
                    isinstance(v, str) for v in metadata.values()):
                return FormatError(f"{path}: {_METADATA_KEY} must map strings to strings "
                                   f"({message})")
            for name, entry in header.items():
                problem = _entry_problem(name, entry, data_len)
                if problem:
                    return FormatError(f"{path}: tensor {name!r}: {problem} ({message})")
    return FormatError(f"{path}: {message}")


def _open(path: str):
    """``safe_open`` of ``path``, its errors as :class:`FormatError` naming file and tensor."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise _library_error(path, e) from None


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and fully validate the header of a safetensors file (no tensor data is read).

    Raises:
        FormatError: anything malformed, naming the file (and tensor).
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    _open(path)  # the library's validation
    # The library checked this header but exposes neither offsets nor duplicate keys.
    raw, _, data_len = _raw_header(path)
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys(path))
    metadata = header.pop(_METADATA_KEY, None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not name:
            raise FormatError(f"{path}: a tensor has an empty name")
        if set(entry) != _ENTRY_KEYS:
            raise FormatError(f"{path}: tensor {name!r}: header entry must have exactly the "
                              f"keys {sorted(_ENTRY_KEYS)}; unexpected "
                              f"{sorted(set(entry) - _ENTRY_KEYS)}")
        if entry["dtype"] not in DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which torch "
                              f"cannot hold; expected one of {sorted(DTYPES)}")
        tensors[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]),
                                   *entry["data_offsets"])
    return SafetensorsHeader(path, tensors, dict(metadata), 8 + len(raw), data_len)


class SafetensorsFile:
    """A validated safetensors file whose tensors are read lazily from a memory map.

    >>> with SafetensorsFile("model.safetensors") as f:
    ...     w = f.get("lm_head.weight")

    Returned tensors stay valid after :meth:`close` (they keep the mapping alive).
    """

    def __init__(self, path: str | os.PathLike):
        self.header = read_header(path)
        self.path = self.header.path
        self._file = None  # the library's handle, opened at the first read

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
        if self._file is None:
            self._file = _open(self.path)
        return self._file.get_tensor(name)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, by name (memory-mapped)."""
        return {name: self.get(name) for name in self.header.tensors}

    def close(self) -> None:
        """Drop this object's handle on the file; tensors already returned keep the
        mapping alive until they are freed."""
        self._file = None

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


# Why our own serializer and not safetensors.torch.save_file (0.8.0): that one is
# faster (100 MB of F16/F32: 0.07-0.18 s vs 0.13-0.22 s here, no extra peak RSS for
# either; benchmarks/readers_load.py), but it refuses a dict in which two names share
# one tensor (tied embeddings: "Some tensors share memory"), and it orders the data
# by dtype, not by item size as qdec.quant.streaming's chunked writer does, which
# must reproduce this layout without holding whole tensors in memory. One layout,
# written here; the write is I/O-bound at checkpoint sizes.
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
