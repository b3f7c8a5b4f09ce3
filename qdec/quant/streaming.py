"""Quantize a Hugging Face Llama-family checkpoint on disk, one decoder layer in
memory at a time.

:func:`quantize_model` needs the whole model in memory, so its peak RSS grows
with the model. :func:`quantize_checkpoint_streaming` produces the same
checkpoint (byte for byte, for a model held in the same dtype) while holding at
most:

* one decoder layer's weights (read from disk into private memory, cast to the
  compute dtype) and its quantization temporaries (see :mod:`qdec.quant.pipeline`);
* the calibration activations (the layer's input/output and its captured linear
  inputs);
* the embedding matrix, only while the calibration ids are embedded (it is
  released before layer 0 is loaded);
* fixed-size copy buffers.

How:

1. The model skeleton is built on the ``meta`` device (no weight storage); the
   source headers are checked against it (every tensor present, right shape)
   before any work, so a missing tensor fails fast, naming tensor and file.
2. The embeddings (and a CPU rotary embedding) are materialized, and
   :func:`~qdec.quant.pipeline.capture_layer_inputs` runs the skeleton up to
   decoder layer 0, exactly as :func:`quantize_model` does; then the embeddings go
   back to ``meta``.
3. For each layer: its tensors are read with plain file reads (``readinto`` into
   a fresh tensor, not a memory map, so no file pages are mapped into this
   process and counted in its RSS), assigned into the skeleton layer,
   quantized by :func:`~qdec.quant.pipeline.quantize_decoder_layer` (the same
   code as :func:`quantize_model`), and the layer's packed weights, residuals and
   its other tensors (norms, which AWQ has rescaled; biases) are written to a
   per-layer part file inside the output's temporary directory. The layer is then
   moved back to ``meta``, freeing it.
4. At the end the part files and the non-decoder tensors of the source
   (embeddings, final norm, untied ``lm_head``) are concatenated, in fixed-size
   chunks, into the project's single ``model.safetensors`` and
   ``residual.safetensors`` (:mod:`qdec.formats.qdec_checkpoint`, unchanged
   format, unchanged reader). The part files are deleted.

Why per-layer part files instead of keeping the packed tensors in memory: the
packed weights plus a 4-bit residual are about ``(bits + 4 + ~0.5) / 16`` of the
bf16 model (~45% at W3), which for a full 8B model is several GB and would
again grow with the model. The price is writing the (small) packed checkpoint
twice.

The output directory is built under a temporary name beside ``out_dir`` and
renamed into place only when everything has been written and re-read
(:func:`qdec.formats.safetensors_io.atomic_directory`); any failure leaves no
output.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ..formats.qdec_checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    PackedWeight,
    checkpoint_config,
    model_file_metadata,
    read_qdec_checkpoint,
)
from ..formats.residual_store import (
    METADATA_KEY as RESIDUAL_METADATA_KEY,
    RESIDUAL_FILE,
    RESIDUAL_FORMAT_VERSION,
    check_residual_pair,
)
from ..formats.safetensors_io import (
    _METADATA_KEY,
    DTYPES,
    MAX_HEADER_BYTES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    FormatError,
    _atomic_file,
    atomic_directory,
    dtype_name,
    load_sharded,
    read_header,
    save_safetensors,
    write_json_atomic,
)
from .pipeline import (
    LINEAR_INPUTS,
    LayerOptions,
    QuantizationResult,
    _decoder_layers,
    _to_device,
    capture_layer_inputs,
    current_rss_bytes,
    quantize_decoder_layer,
    summary_line,
)

# Bytes moved per read/write when concatenating tensors into the final files.
COPY_CHUNK_BYTES = 64 << 20
_PARTS_DIR = ".parts"


# ---------------------------------------------------------------------------------
# Reading the source checkpoint
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Located:
    """Where one tensor's bytes are: file, absolute byte offset, dtype, shape."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][1]


def _locate_file(path: str) -> dict[str, _Located]:
    header = read_header(path)  # validated: offsets inside the file, no overlaps
    return {name: _Located(header.path, header.data_start + info.begin, info.dtype,
                           tuple(info.shape))
            for name, info in header.tensors.items()}


class CheckpointSource:
    """The tensors of a Hugging Face model directory (``model.safetensors``, or
    shards listed by ``model.safetensors.index.json``), read on demand.

    Only headers are read at construction. :meth:`read` returns a tensor in
    private memory, filled with ordinary file reads: unlike a memory map, this
    maps no file pages into the process (they stay in the kernel's page cache,
    which RSS does not count) and leaves nothing behind once the tensor is freed.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{self.directory}: no such model directory")
        index_path = os.path.join(self.directory, SAFETENSORS_INDEX)
        single = os.path.join(self.directory, SAFETENSORS_SINGLE)
        self.tensors: dict[str, _Located] = {}
        if os.path.isfile(index_path):
            self.where = index_path
            self.tensors = load_sharded(self.directory, SAFETENSORS_INDEX, _locate_file)
        elif os.path.isfile(single):
            self.where = single
            self.tensors = _locate_file(single)
        else:
            found = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
            raise FormatError(f"{self.directory}: no {SAFETENSORS_INDEX} or "
                              f"{SAFETENSORS_SINGLE} (safetensors files present: "
                              f"{found or 'none'}); streaming quantization reads safetensors only")

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def locate(self, name: str, shape: tuple[int, ...] | None = None) -> _Located:
        """Where ``name`` is; FormatError naming the file and tensor when it is
        absent, not floating point, or (``shape`` given) of another shape."""
        loc = self.tensors.get(name)
        if loc is None:
            raise FormatError(f"{self.where}: missing tensor {name!r}"
                              + ("" if shape is None else f" (expected shape {list(shape)})"))
        if not DTYPES[loc.dtype][0].is_floating_point:
            raise FormatError(f"{loc.path}: tensor {name!r} has dtype {loc.dtype}; expected a "
                              f"floating-point weight")
        if shape is not None and tuple(loc.shape) != tuple(shape):
            raise FormatError(f"{loc.path}: tensor {name!r} has shape {list(loc.shape)}; "
                              f"expected {list(shape)}")
        return loc

    def read(self, name: str, shape: tuple[int, ...] | None = None,
             dtype: torch.dtype | None = None, check_finite: bool = True) -> Tensor:
        """Tensor ``name`` in private CPU memory, cast to ``dtype`` if given.

        ``check_finite`` rejects NaN/inf values (a corrupt or truncated download
        would otherwise quantize to garbage silently)."""
        loc = self.locate(name, shape)
        tdtype = DTYPES[loc.dtype][0]
        buf = torch.empty(loc.nbytes, dtype=torch.uint8)
        _read_exact(loc.path, loc.offset, memoryview(buf.numpy()), name)
        t = buf.view(tdtype).reshape(loc.shape)
        if check_finite and t.numel() and not bool(torch.isfinite(t).all()):
            raise FormatError(f"{loc.path}: tensor {name!r} {list(loc.shape)} has non-finite "
                              f"values (NaN or inf); the checkpoint is corrupt")
        return t if dtype is None or dtype == tdtype else t.to(dtype)


def _read_exact(path: str, offset: int, out: memoryview, name: str) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(out):
            n = f.readinto(out[done:])
            if not n:
                raise FormatError(f"{path}: file ends inside tensor {name!r} (read {done} of "
                                  f"{len(out)} bytes)")
            done += n


# ---------------------------------------------------------------------------------
# Writing: one safetensors file concatenated from tensors lying in other files
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Piece:
    """A tensor to write: its source bytes and the dtype it is written in."""

    source: _Located
    dtype: str  # safetensors dtype string of the output

    @property
    def nbytes(self) -> int:
        return self.source.numel * DTYPES[self.dtype][1]


def _write_concatenated(path: Path, pieces: Mapping[str, _Piece],
                        metadata: Mapping[str, str]) -> None:
    """Write ``pieces`` as one safetensors file with the layout of
    :func:`qdec.formats.safetensors_io.save_safetensors` (same header, same order:
    decreasing item size, then name), copying ``COPY_CHUNK_BYTES`` at a time so no
    tensor is ever whole in memory. Atomic (temporary name, fsync, rename)."""
    order = sorted(pieces, key=lambda n: (-DTYPES[pieces[n].dtype][1], n))
    header: dict[str, object] = {}
    if metadata:
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for name in order:
        p = pieces[name]
        header[name] = {"dtype": p.dtype, "shape": list(p.source.shape),
                        "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    if len(blob) > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: header would be {len(blob)} bytes, over the limit of "
                          f"{MAX_HEADER_BYTES}")
    buf = torch.empty(COPY_CHUNK_BYTES, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with _atomic_file(os.fspath(path), False) as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for name in order:
            p = pieces[name]
            src = p.source
            if p.dtype == src.dtype:
                for start in range(0, src.nbytes, COPY_CHUNK_BYTES):
                    n = min(COPY_CHUNK_BYTES, src.nbytes - start)
                    _read_exact(src.path, src.offset + start, view[:n], name)
                    out.write(view[:n])
                continue
            # A dtype change (e.g. bf16 embeddings of a model quantized in float32):
            # convert a chunk of whole elements at a time.
            sdt, sitem = DTYPES[src.dtype]
            ddt, ditem = DTYPES[p.dtype]
            per = COPY_CHUNK_BYTES // max(sitem, ditem)
            for e0 in range(0, src.numel, per):
                n = min(per, src.numel - e0)
                _read_exact(src.path, src.offset + e0 * sitem, view[:n * sitem], name)
                converted = buf[:n * sitem].view(sdt).to(ddt)
                out.write(converted.view(torch.uint8).numpy().data)


# ---------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------


@dataclasses.dataclass
class LinearStats:
    """What is kept of one quantized linear once its tensors are on disk (the
    scalar fields of :class:`qdec.quant.pipeline.LinearResult`)."""

    name: str
    rel_error: float
    rel_error_full_residual: float
    weight_bytes: int
    residual_bytes: int
    seconds: float


@dataclasses.dataclass
class StreamingResult:
    """What :func:`quantize_checkpoint_streaming` did.

    ``linears``: per-linear errors, bytes and seconds (as :func:`quantize_model`
    reports them); ``layer_seconds``: per decoder layer; ``layer_rss_bytes``: the
    process RSS right after each layer was written and freed (flat when
    streaming works); ``layer_fp_bytes``: one decoder layer's weights in the
    compute dtype; ``calib_bytes``: the calibration hidden states entering a layer.
    """

    path: str
    method: str
    bits: int
    group_size: int
    symmetric: bool
    residual_bits: int | None
    propagate: str
    dtype: str
    linears: dict[str, LinearStats]
    layer_seconds: dict[str, float]
    layer_rss_bytes: dict[str, int]
    layer_fp_bytes: int
    calib_bytes: int
    checkpoint_bytes: int
    seconds: float

    def rel_errors(self) -> dict[str, float]:
        return {name: r.rel_error for name, r in self.linears.items()}

    def summary(self) -> str:
        return summary_line(self, " (streamed)")


# ---------------------------------------------------------------------------------
# The streaming quantizer
# ---------------------------------------------------------------------------------


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next layer
    starts from the same RSS (glibc keeps small freed chunks otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _skeleton(model_dir: str, dtype: torch.dtype) -> nn.Module:
    """The model built on the ``meta`` device: structure and shapes, no storage."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _decoder_layers(model)  # Llama-family check, with a clear message
    return model.eval()


def _load_module(module: nn.Module, prefix: str, source: CheckpointSource,
                 dtype: torch.dtype, check_finite: bool = True) -> int:
    """Read ``module``'s tensors (``<prefix>.<name>``) from ``source`` and assign
    them in place of its meta tensors; returns the bytes loaded."""
    state = {}
    for key, meta in module.state_dict().items():
        state[key] = source.read(f"{prefix}.{key}", tuple(meta.shape), dtype, check_finite)
    module.load_state_dict(state, strict=True, assign=True)
    return sum(t.numel() * t.element_size() for t in state.values())


def _check_extra_files(where: str, extra_files: Mapping[str, str | os.PathLike]) -> None:
    for fname, src in extra_files.items():
        if (os.path.basename(fname) != fname or fname in ("", ".", "..")
                or fname in (CONFIG_FILE, MODEL_FILE, RESIDUAL_FILE, _PARTS_DIR)):
            raise FormatError(f"{where}: extra file name {fname!r} must be a plain file name "
                              f"other than the checkpoint's own files")
        if not os.path.isfile(src):
            raise FileNotFoundError(f"extra file {src} (for {fname!r}) does not exist")


@torch.no_grad()
def quantize_checkpoint_streaming(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: Literal["rtn", "awq", "gptq"],
    bits: int,
    group_size: int,
    symmetric: bool = False,
    calib_ids: Tensor | None = None,
    residual_bits: int | None = 4,
    progress: bool = True,
    overwrite: bool = False,
    *,
    dtype: torch.dtype | None = None,
    propagate: Literal["quantized", "fp"] = "quantized",
    scale_dtype: torch.dtype = torch.float16,
    residual_grid_points: int = 32,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    gptq_act_order: bool = False,
    gptq_damp: float = 0.01,
    gptq_block_size: int = 128,
    awq_n_grid: int = 20,
    awq_clip: bool = True,
    awq_search_samples: int | None = None,
    awq_clip_tokens: int = 512,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
) -> StreamingResult:
    """Quantize a Hugging Face Llama-family directory into a QDEC checkpoint,
    holding one decoder layer in memory at a time (module docstring).

    The checkpoint is the one :func:`quantize_model` followed by
    :func:`qdec.formats.qdec_checkpoint.save_quantization_result` writes for the
    model loaded in ``dtype`` (same tensors, same bytes), and
    :func:`qdec.formats.qdec_checkpoint.read_qdec_checkpoint` reads it.

    Args:
        model_dir: directory with ``config.json`` and ``model.safetensors`` or
            ``model.safetensors.index.json`` + shards.
        out_dir: checkpoint directory to create; refused if it exists unless
            ``overwrite``. Never left partially written.
        method, bits, group_size, symmetric, calib_ids, residual_bits, progress,
        propagate, scale_dtype, residual_grid_points, batch_size, device,
        gptq_*, awq_*: as for :func:`qdec.quant.pipeline.quantize_model`.
        dtype: dtype the layers are computed in and the non-quantized tensors are
            written in (default: the stored dtype of the first decoder weight).
        extra_files: ``{file name in the checkpoint: source path}`` copied verbatim
            (e.g. tokenizer files).

    Returns:
        :class:`StreamingResult` (per-linear errors, bytes and seconds; per-layer
        seconds and RSS).

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        FormatError: a tensor is missing (naming tensor and file), has the wrong
            shape, or holds non-finite values.
        ValueError: invalid quantization settings.
    """
    start = time.perf_counter()
    opts = LayerOptions(method, bits, group_size, symmetric, residual_bits, propagate,
                        scale_dtype, residual_grid_points, batch_size, gptq_act_order,
                        gptq_damp, gptq_block_size, awq_n_grid, awq_clip, awq_search_samples,
                        awq_clip_tokens)
    opts.validate(calib_ids)
    out_dir = Path(os.path.abspath(os.fspath(out_dir)))
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} exists; pass overwrite=True to "
                              f"replace it")
    extra_files = dict(extra_files or {})
    _check_extra_files(str(out_dir), extra_files)
    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, CONFIG_FILE)):
        raise FileNotFoundError(f"{model_dir}: no {CONFIG_FILE}; a Hugging Face model "
                                f"directory is expected")
    source = CheckpointSource(model_dir)

    # Compute dtype, then the skeleton; check every tensor it needs before any work.
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    probe = "model.layers.0.self_attn.q_proj.weight"
    if dtype is None:
        dtype = DTYPES[source.locate(probe).dtype][0]
    model = _skeleton(model_dir, dtype)
    decoder = _decoder_layers(model)
    tied = bool(config.tie_word_embeddings)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight", None)  # transformers re-ties it; never stored
    for name, shape in expected.items():
        source.locate(name, shape)
    outer = [n for n in expected if not n.startswith("model.layers.")]

    hidden = kwargs = None
    calib_bytes = 0
    if calib_ids is not None:
        # Embeddings + a real (CPU) rotary embedding: enough of the skeleton to run
        # up to decoder layer 0, through the very code quantize_model uses.
        embed = model.get_input_embeddings()
        _load_module(embed, "model.embed_tokens", source, dtype)
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=model.config)
        hidden, kwargs = capture_layer_inputs(model, calib_ids, batch_size)
        embed.to("meta")
        model.model.rotary_emb = rotary
        calib_bytes = hidden.numel() * hidden.element_size()
        _release_memory()

    result = StreamingResult(str(out_dir), method, bits, group_size, symmetric, residual_bits,
                             propagate, dtype_name(dtype), {}, {}, {}, 0, calib_bytes, 0, 0.0)
    layer_meta: dict[str, dict] = {}
    residual_layers: dict[str, dict[str, int]] = {}
    bar = range(len(decoder))
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=f"{method} {bits}-bit (streaming)", unit="layer")
    note = bar.set_postfix_str if progress else None
    if device is not None and hidden is not None:
        hidden, kwargs = hidden.to(device), _to_device(kwargs, device)

    with atomic_directory(out_dir, overwrite) as tmp:
        parts = tmp / _PARTS_DIR
        parts.mkdir()
        model_parts: list[Path] = []
        residual_parts: list[Path] = []
        for i in bar:
            layer_start = time.perf_counter()
            prefix = f"model.layers.{i}"
            layer = decoder[i]
            result.layer_fp_bytes = max(result.layer_fp_bytes,
                                        _load_module(layer, prefix, source, dtype))
            if device is not None:
                layer.to(device)
            part = QuantizationResult(method, bits, group_size, symmetric, residual_bits,
                                      propagate, {}, {}, {}, {}, 0.0)
            hidden = quantize_decoder_layer(layer, prefix, hidden, kwargs, opts, part, note)
            mpath, rpath = _write_layer_part(parts, i, prefix, layer, part, layer_meta,
                                             residual_layers)
            model_parts.append(mpath)
            if rpath is not None:
                residual_parts.append(rpath)
            for name, r in part.linears.items():
                result.linears[name] = LinearStats(name, r.rel_error, r.rel_error_full_residual,
                                                   r.weight_bytes, r.residual_bytes, r.seconds)
            # Free the layer: back to meta, and the results with it.
            layer.to("meta")
            del part
            _release_memory()
            result.layer_seconds[prefix] = time.perf_counter() - layer_start
            result.layer_rss_bytes[prefix] = current_rss_bytes()
        del hidden, kwargs

        # Final files: non-decoder tensors straight from the source, then the parts.
        pieces = {name: _Piece(source.locate(name), dtype_name(dtype)) for name in outer}
        for p in model_parts:
            for name, loc in _locate_file(str(p)).items():
                pieces[name] = _Piece(loc, loc.dtype)
        _write_concatenated(tmp / MODEL_FILE, pieces, model_file_metadata(layer_meta))
        if residual_parts:
            rpieces = {}
            for p in residual_parts:
                rpieces.update({n: _Piece(loc, loc.dtype)
                                for n, loc in _locate_file(str(p)).items()})
            rmeta = {"format_version": RESIDUAL_FORMAT_VERSION, "kind": "residual",
                     "residual_bits": residual_bits, "layers": residual_layers}
            _write_concatenated(tmp / RESIDUAL_FILE, rpieces,
                                {RESIDUAL_METADATA_KEY: json.dumps(rmeta)})
        shutil.rmtree(parts)
        config_out = checkpoint_config(model.config.to_dict(), layer_meta, method,
                                       residual_bits if residual_parts else None,
                                       {"quantizer": method, "propagate": propagate})
        write_json_atomic(config_out, tmp / CONFIG_FILE)
        for fname, src_path in extra_files.items():
            shutil.copyfile(src_path, tmp / fname)
            with open(tmp / fname, "rb+") as f:
                os.fsync(f.fileno())
        # Re-read what was written with the strict reader (headers and metadata
        # only: tensors stay memory-mapped and untouched) before publishing it.
        check = read_qdec_checkpoint(tmp, load_residual=False)
        if list(check.linears) != list(layer_meta):
            raise FormatError(f"{tmp}: re-read linears differ from those written")
        del check
        result.checkpoint_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    result.seconds = time.perf_counter() - start
    return result


def _write_layer_part(parts: Path, index: int, prefix: str, layer: nn.Module,
                      part: QuantizationResult, layer_meta: dict[str, dict],
                      residual_layers: dict[str, dict[str, int]]) -> tuple[Path, Path | None]:
    """Write one layer's packed linears and other tensors (``model-<i>``) and its
    residuals (``residual-<i>``) as part files; record their metadata entries."""
    tensors: dict[str, Tensor] = {}
    quantized = {f"{prefix}.{n}" for n in LINEAR_INPUTS}
    # Non-quantized tensors as the layer holds them now (AWQ-rescaled norms, biases),
    # as save_quantization_result takes them from model.state_dict().
    for key, t in layer.state_dict().items():
        name = f"{prefix}.{key}"
        owner, _, suffix = name.rpartition(".")
        if owner in quantized and suffix != "bias":
            continue
        tensors[name] = t
    residuals: dict[str, Tensor] = {}
    for name, r in part.linears.items():
        w = PackedWeight.from_quantized_weight(r.weight)
        w.validate(name, str(parts))
        layer_meta[name] = w.layer_metadata()
        tensors[f"{name}.qweight"] = w.qweight
        tensors[f"{name}.scales"] = w.scales
        if w.zeros is not None:
            tensors[f"{name}.zeros"] = w.zeros
        if r.residual is not None:
            K, N = check_residual_pair(str(parts), name, r.residual, r.residual_scales,
                                       r.residual_bits, w.in_features, w.out_features)
            residuals[f"{name}.residual"] = r.residual
            residuals[f"{name}.residual_scales"] = r.residual_scales
            residual_layers[name] = {"in_features": K, "out_features": N}
    mpath = parts / f"model-{index:05d}.safetensors"
    save_safetensors(tensors, mpath)
    rpath = None
    if residuals:
        rpath = parts / f"residual-{index:05d}.safetensors"
        save_safetensors(residuals, rpath)
    return mpath, rpath


__all__ = ["COPY_CHUNK_BYTES", "CheckpointSource", "LinearStats", "StreamingResult",
           "quantize_checkpoint_streaming"]
