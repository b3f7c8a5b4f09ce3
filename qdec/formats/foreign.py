"""Quantized checkpoints made by other tools: detection, reading, and the residual
store built from the original weights (``qdec residual``).

DecDEC's workflow starts from an existing quantized model: the quantized weights
``W_hat`` are kept bit for bit, and the residual ``R = W - W_hat`` against the
original (unquantized) weights ``W`` is quantized for the host store.

Folded scales (AWQ). AWQ multiplies each input channel ``k`` of a linear by a factor
``s_k`` before quantizing and divides the previous operation (a norm, or the rows of
the previous linear) by it, so ``W_hat ~ W diag(s)`` (and rows of some linears
``~ diag(1/s') W``). The original weights are then not in the quantized model's
basis, and ``W - W_hat`` is not a residual. :func:`folded_scaling` detects this from
the weights: the best per-input-channel (or per-output-row) factor fitting
``W_hat ~ W * factor`` removes most of the error, which a plain quantizer's
error cannot do. Such a layer is **refused** with a message saying what reference
is needed (the AWQ-scaled float model, e.g. AutoAWQ's ``export_compatible=True``
export); the factors are not folded in, because estimating them from quantized
weights adds an error the residual store would not see.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .qdec_checkpoint import ImportedCheckpoint, PackedWeight, write_qdec_checkpoint
from .safetensors_io import FormatError, load_state_dict_dir, read_json

# Files besides the weights that travel from the quantized directory to the QDEC one
# (tokenizer and generation settings), copied verbatim when present.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                "chat_template.jinja", "generation_config.json")
# A folded per-channel factor is declared when fitting it removes more than this
# share of the squared error W_hat - W. An MSE-optimal quantizer's error e has
# E[W e] = -E[e^2], so a fitted factor removes about its relative MSE E[e^2]/E[W^2]
# (~12 % for 2-bit Gaussian weights; less at more bits); folded AWQ scales, which
# move each column by its own factor, leave far more than half to remove.
FOLDED_ERROR_SHARE = 0.5


def detect_quantized_format(directory: str | os.PathLike) -> str | None:
    """``"autoawq"``, ``"gptq"``, ``"compressed-tensors"`` or None (no foreign
    quantization config; e.g. a QDEC checkpoint or a float model)."""
    directory = Path(os.fspath(directory))
    cfg_path = directory / "config.json"
    config = read_json(cfg_path, "config") if cfg_path.is_file() else {}
    if "qdec" in config:
        return None
    qc = config.get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if method == "awq":
        return "autoawq"
    if method == "gptq" or (not qc and (directory / "quantize_config.json").is_file()):
        return "gptq"
    if method == "compressed-tensors":
        return "compressed-tensors"
    return None


def read_quantized_checkpoint(directory: str | os.PathLike) -> ImportedCheckpoint:
    """Read an AutoAWQ (gemm), GPTQ or compressed-tensors (pack-quantized) directory.

    Raises:
        FormatError: the directory has none of these quantization configs.
    """
    fmt = detect_quantized_format(directory)
    if fmt == "autoawq":
        from .autoawq import read_autoawq_checkpoint

        return read_autoawq_checkpoint(directory)
    if fmt == "gptq":
        from .gptq import read_gptq_checkpoint

        return read_gptq_checkpoint(directory)
    if fmt == "compressed-tensors":
        from .compressed_tensors import read_compressed_tensors_checkpoint

        return read_compressed_tensors_checkpoint(directory)
    raise FormatError(f"{directory}: config.json has no AutoAWQ ('awq'), GPTQ ('gptq') or "
                      f"compressed-tensors quantization_config")


def folded_scaling(w_hat: Tensor, reference: Tensor) -> str | None:
    """Whether ``w_hat ~ reference * factor`` per input channel or per output row
    (AWQ's folded scales; module docstring). Returns ``"input-channel"``,
    ``"output-row"`` or None. Both arguments float ``[N, K]``."""
    w, q = reference.double(), w_hat.double()
    err = (q - w).square().sum()
    if err == 0:
        return None
    for axis, label in ((0, "input-channel"), (1, "output-row")):
        denom = w.square().sum(axis, keepdim=True).clamp_min(1e-30)
        factor = (w * q).sum(axis, keepdim=True) / denom
        fitted = (q - w * factor).square().sum()
        if fitted < (1 - FOLDED_ERROR_SHARE) * err:
            return label
    return None


def residual_checkpoint(
    quantized: str | os.PathLike, reference: str | os.PathLike, out: str | os.PathLike, *,
    residual_bits: int = 4, grid_points: int = 32, overwrite: bool = False,
    progress: Callable | None = None,
) -> Path:
    """Write a QDEC checkpoint from a foreign quantized checkpoint and the original
    model: the quantized weights bit for bit, plus a residual store of
    ``W - W_hat`` in the quantized model's basis (act-order layers: its permuted
    channel order).

    Args:
        quantized: AutoAWQ / GPTQ / compressed-tensors directory.
        reference: the original model's Hugging Face directory (safetensors).
        out: output directory; refused if it exists unless ``overwrite``. Nothing is
            written until every layer's residual is formed.
        residual_bits, grid_points: as :func:`qdec.quant.residual.quantize_residual`.
        progress: optional wrapper for the layer loop (e.g. ``tqdm``).

    Raises:
        FormatError: a reference tensor missing or of the wrong shape, or a layer
            whose quantized weights carry scales the reference does not (message
            says which reference is needed).
    """
    from ..quant.residual import quantize_residual

    ckpt = read_quantized_checkpoint(quantized)
    ref_dir = Path(os.fspath(reference))
    ref_state = load_state_dict_dir(ref_dir)
    names = list(ckpt.linears)
    residuals: dict[str, tuple[Tensor, Tensor]] = {}
    for name in (progress(names) if progress else names):
        w: PackedWeight = ckpt.linears[name]
        key = f"{name}.weight"
        if key not in ref_state:
            raise FormatError(f"{ref_dir}: tensor {key!r} missing (the quantized checkpoint "
                              f"{quantized} has linear {name!r})")
        ref = ref_state[key]
        if list(ref.shape) != [w.out_features, w.in_features] or not ref.is_floating_point():
            raise FormatError(f"{ref_dir}: tensor {key!r} is {ref.dtype} {list(ref.shape)}; "
                              f"expected a float [{w.out_features}, {w.in_features}] like the "
                              f"quantized layer")
        ref = ref.float()
        if w.input_permutation is not None:
            ref = ref[:, w.input_permutation]
        w_hat = w.to_quantized_weight().dequantize().float()  # as the kernels: in scale dtype
        folded = folded_scaling(w_hat, ref)
        if folded is not None:
            raise FormatError(
                f"{quantized}: layer {name!r} is the reference's {key!r} times a per-"
                f"{folded} factor: the quantizer folded scales (AWQ) into the weights, so "
                f"{ref_dir} is not in the quantized model's basis. Pass as --reference the "
                f"float model with those scales applied (AutoAWQ: quantize(..., "
                f"export_compatible=True) then save_quantized; llm-compressor: the model "
                f"after oneshot, saved with save_compressed=False)")
        residuals[name] = quantize_residual(ref - w_hat, residual_bits, grid_points)
    quantized_dir = Path(os.fspath(quantized))
    extra = {f: quantized_dir / f for f in COPIED_FILES if (quantized_dir / f).is_file()}
    return write_qdec_checkpoint(
        out, hf_config=ckpt.hf_config, linears=ckpt.linears, tensors=ckpt.tensors,
        method=ckpt.format, residuals=residuals, residual_bits=residual_bits,
        source={"format": ckpt.format, "reference": str(ref_dir), **ckpt.quantization},
        extra_files=extra, overwrite=overwrite)


def convert_without_residual(quantized: str | os.PathLike, out: str | os.PathLike, *,
                             overwrite: bool = False) -> Path:
    """A QDEC checkpoint (no residual store, k = 0 only) of a foreign quantized
    directory, tokenizer files copied: what ``qdec generate`` runs on such a
    directory."""
    ckpt = read_quantized_checkpoint(quantized)
    quantized_dir = Path(os.fspath(quantized))
    extra = {f: quantized_dir / f for f in COPIED_FILES if (quantized_dir / f).is_file()}
    return ckpt.write(out, overwrite=overwrite, extra_files=extra)


__all__ = ["COPIED_FILES", "convert_without_residual", "detect_quantized_format",
           "folded_scaling", "read_quantized_checkpoint", "residual_checkpoint"]
