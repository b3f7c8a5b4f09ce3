"""The ``qdec`` quantization method for transformers: :class:`QDECConfig` and
:class:`QDECHfQuantizer` (imported, and so registered, by :func:`qdec.hf.register`).

Loading (``from_pretrained`` on a QDEC checkpoint directory,
:mod:`qdec.formats.qdec_checkpoint`):

1. Before any weight is read, the whole checkpoint is validated
   (:func:`~qdec.formats.qdec_checkpoint.verify_qdec_checkpoint`: every tensor of
   ``model.safetensors`` and ``residual.safetensors`` against the metadata,
   memory-mapped), so a missing or mismatched file is refused with a
   :class:`~qdec.formats.FormatError` naming file and tensor.
2. Each quantized linear of the freshly built (meta) model is replaced by a
   ``QDECLinear`` whose state dict is exactly that layer's checkpoint tensors
   (``qweight``, ``scales``, ``zeros``, ``input_perm``, ``bias``), so
   transformers' own loader fills them, on the devices of ``device_map``.
3. After loading, the layers become plain ``QDECLinear``, the residual store is
   read into host memory (pinned when CUDA is present; it never enters GPU
   memory) and attached, and ``k`` is set from ``quantization_config.k``
   (default 0; change it with :func:`qdec.configure`).

Saving: ``save_pretrained`` writes ``model.safetensors`` in the checkpoint layout
(with its per-layer metadata), ``config.json`` (its ``qdec`` section and
``quantization_config`` block kept), and ``residual.safetensors``.
``model.dequantize()`` replaces the layers by dense ``nn.Linear`` (the k = 0 model).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats import FormatError
from ..formats.qdec_checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    QUANT_METHOD,
    PackedWeight,
    model_file_metadata,
    read_quantization_config,
    verify_qdec_checkpoint,
)
from ..formats.residual_store import RESIDUAL_FILE, load_residual_store, save_residual_file
from ..nn import QDECLinear, place_residual
from ..patch import configure, qdec_layers

# save_pretrained must write one model.safetensors (the format has no shards).
_UNSHARDED = "100000GB"


@register_quantization_config(QUANT_METHOD)
class QDECConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of a QDEC checkpoint
    (:func:`qdec.formats.qdec_checkpoint.quantization_config_block`).

    Args:
        format_version, bits, group_size, symmetric, residual_bits: copied from the
            checkpoint's ``qdec`` section (null where layers differ).
        k: channels compensated per token after loading: an int count, a float
            fraction of each layer's inputs, or ``{projection: either}``; ``None``
            (absent) means 0.
        **kwargs: other keys of the block, kept so that a save writes them back.

    Raises:
        FormatError: a value out of range (naming the key).
    """

    def __init__(self, format_version: int = 1, bits: int | None = None,
                 group_size: int | None = None, symmetric: bool | None = None,
                 residual_bits: int | None = None,
                 k: int | float | dict[str, int | float] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.residual_bits = residual_bits
        self.k = k
        for key, value in kwargs.items():
            setattr(self, key, value)
        read_quantization_config(self.to_dict(), "quantization_config")

    def to_dict(self) -> dict[str, Any]:
        """The block as written to ``config.json`` (``k`` only when set)."""
        out = super().to_dict()
        if out.get("k") is None:
            out.pop("k", None)
        return out

    @property
    def initial_k(self) -> int | float | dict[str, int | float]:
        """``k`` as validated by :func:`read_quantization_config` (0 when absent)."""
        return read_quantization_config(self.to_dict(), "quantization_config")["k"]


class _LoadingQDECLinear(QDECLinear):
    """A ``QDECLinear`` during ``from_pretrained``: its state dict is the layer's
    tensors as the checkpoint stores them (``input_perm`` int32 included; no
    residual, no ``k``), which is what transformers' loader matches checkpoint
    keys against. :func:`_finish_layer` turns it into a plain ``QDECLinear``."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)


def _loading_layer(weight: PackedWeight, bias: torch.Tensor | None) -> _LoadingQDECLinear:
    """A meta-device layer shaped like ``weight`` (tensors filled by the loader)."""
    def empty(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta")

    layer = _LoadingQDECLinear(empty(weight.qweight), empty(weight.scales), empty(weight.zeros),
                               weight.bits, weight.group_size, weight.in_features,
                               bias=empty(bias))
    if weight.input_permutation is not None:
        layer.register_buffer("input_perm", torch.empty(weight.in_features, dtype=torch.int32,
                                                        device="meta"))
    return layer


def _finish_layer(layer: QDECLinear) -> None:
    """Turn a loaded :class:`_LoadingQDECLinear` into a plain ``QDECLinear``."""
    perm = layer._buffers.pop("input_perm", None)
    layer.__class__ = QDECLinear
    if perm is not None:
        layer.set_input_permutation(perm)


def checkpoint_directory(model: nn.Module, checkpoint_files: list[str] | None) -> Path:
    """The local directory ``from_pretrained`` is reading (the Hub's snapshot
    folder for a repository id); fetches ``residual.safetensors`` into it when the
    checkpoint comes from the Hub and declares one."""
    if checkpoint_files:
        path = Path(checkpoint_files[0]).parent
    else:
        path = Path(getattr(model.config, "name_or_path", "") or ".")
    if not (path / CONFIG_FILE).is_file():
        # transformers resolved weights but not the config next to them (a Hub
        # snapshot keeps both in one folder; anything else is not a checkpoint).
        raise FormatError(f"{path / CONFIG_FILE}: file missing; a QDEC checkpoint is one "
                          f"directory with {CONFIG_FILE}, {MODEL_FILE} and, optionally, "
                          f"{RESIDUAL_FILE}")
    section = getattr(model.config, "qdec", None) or {}
    name = str(getattr(model.config, "name_or_path", ""))
    if (section.get("residual_bits") is not None and not (path / RESIDUAL_FILE).exists()
            and name and not os.path.isdir(name)):
        from transformers.utils import cached_file

        cached_file(name, RESIDUAL_FILE, _raise_exceptions_for_missing_entries=False)
    return path


def _save_pretrained(model, save_directory: str | os.PathLike, *args, **kwargs) -> None:
    """``save_pretrained`` of a model loaded by :class:`QDECHfQuantizer`: the
    model's own, which writes ``model.safetensors`` and ``config.json`` through
    :meth:`QDECHfQuantizer.get_state_dict_and_metadata`, then the residual store,
    a file transformers does not know about."""
    if kwargs.get("max_shard_size") is not None:
        raise ValueError(f"a QDEC checkpoint keeps every tensor in one {MODEL_FILE}; "
                         f"save_pretrained(max_shard_size=...) is not supported")
    kwargs["max_shard_size"] = _UNSHARDED
    type(model).save_pretrained(model, save_directory, *args, **kwargs)
    target = Path(save_directory) / RESIDUAL_FILE
    layers = {name: layer for name, layer in qdec_layers(model) if layer.residual is not None}
    section = getattr(model.config, "qdec", {}) or {}
    if layers:
        widths = {layer.residual_bits for layer in layers.values()}
        if len(widths) != 1 or section.get("residual_bits") not in widths:
            raise FormatError(f"{target}: layers hold residual_bits {sorted(widths)} but "
                              f"config qdec.residual_bits is {section.get('residual_bits')!r}")
        save_residual_file(target, {name: (layer.residual, layer.residual_scales.float().cpu())
                                    for name, layer in layers.items()},
                           widths.pop(), overwrite=True)
    elif target.exists():
        target.unlink()  # a store left from an earlier save would contradict the config


@register_quantizer(QUANT_METHOD)
class QDECHfQuantizer(HfQuantizer):
    """Loads (and saves) QDEC checkpoints; see the module docstring."""

    # Only pre-quantized checkpoints: quantize with `qdec quantize` first.
    requires_calibration = True

    def __init__(self, quantization_config: QDECConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_path: Path | None = None
        self.quantized_modules: list[str] = []

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("QDEC checkpoints cannot be offloaded to disk (device_map has "
                             "'disk'); the residual store already lives in host memory")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        path = checkpoint_directory(model, checkpoint_files)
        # Everything checked before a weight is used (names file and tensor). The
        # model is being built under a meta-device context: the checks compute.
        with torch.device("cpu"):
            ckpt = verify_qdec_checkpoint(path)
        where = path / MODEL_FILE
        for name, weight in ckpt.linears.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise FormatError(f"{where}: tensor {name}.qweight: {type(model).__name__} has no "
                                  f"module {name!r}") from None
            if not isinstance(old, nn.Linear):
                raise FormatError(f"{where}: tensor {name}.qweight: module {name!r} of "
                                  f"{type(model).__name__} is a {type(old).__name__}, not a "
                                  f"linear layer")
            if (old.out_features, old.in_features) != (weight.out_features, weight.in_features):
                raise FormatError(f"{where}: tensor {name}.qweight is for a "
                                  f"[{weight.out_features}, {weight.in_features}] weight but "
                                  f"{name} of the model is "
                                  f"[{old.out_features}, {old.in_features}]")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    _loading_layer(weight, old.bias))
        self.checkpoint_path = path
        self.quantized_modules = list(ckpt.linears)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name in self.quantized_modules:
            _finish_layer(model.get_submodule(name))
        if self.checkpoint_path is not None and (self.checkpoint_path / RESIDUAL_FILE).is_file():
            shapes = {name: (layer.in_features, layer.out_features)
                      for name, layer in qdec_layers(model)}
            store = load_residual_store(self.checkpoint_path / RESIDUAL_FILE, None, shapes)
            for name, res in store.layers.items():
                layer = model.get_submodule(name)
                layer.residual = place_residual(res.residual)
                layer.residual_scales = res.scales.to(layer.qweight.device)
                layer.residual_bits = res.bits
        k = self.quantization_config.initial_k
        if k:
            if not isinstance(k, dict):  # layers without a residual stay at k = 0
                k = {name: k for name, layer in qdec_layers(model) if layer.residual is not None}
            configure(model, k=k)
        # The residual store is a file transformers' save does not write. A
        # partial, not a bound method: it pickles (torch.save of the model).
        model.save_pretrained = functools.partial(_save_pretrained, model)
        return model

    def get_state_dict_and_metadata(self, model):
        """The checkpoint layout of ``model.safetensors`` and its metadata."""
        layers = dict(qdec_layers(model))
        for name, layer in layers.items():
            if layer.lowrank is not None:
                raise ValueError(f"{name} has a low-rank term; the QDEC checkpoint format does "
                                 f"not store one (detach it with set_lowrank(None) to save)")
        out = {}
        for key, tensor in model.state_dict().items():
            owner, _, suffix = key.rpartition(".")
            if owner not in layers:
                out[key] = tensor
            elif suffix in ("qweight", "scales", "zeros", "bias"):
                out[key] = tensor
            elif suffix == "input_permutation":
                out[f"{owner}.input_perm"] = tensor.to(torch.int32)
            # residual (its own file), k, residual_scales, static_channels and
            # residual_col_norms are runtime state, not checkpoint tensors.
        meta = model_file_metadata({
            name: PackedWeight(layer.qweight, layer.scales, layer.zeros, layer.bits,
                               layer.group_size, layer.in_features,
                               layer.input_permutation).layer_metadata()
            for name, layer in layers.items()})
        return out, meta

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every ``QDECLinear`` becomes an ``nn.Linear``
        holding its quantized weight ``W_hat`` densely (input permutation undone,
        residual dropped: the k = 0 model), in ``dtype``."""
        from .. import ops

        for name, layer in list(qdec_layers(model)):
            weight = ops.dequantize(layer.qweight, layer.scales.float(),
                                    None if layer.zeros is None else layer.zeros.float(),
                                    layer.bits, layer.group_size, layer.in_features)
            if layer.input_permutation is not None:  # column j multiplies x[perm[j]]
                weight = torch.empty_like(weight).index_copy_(1, layer.input_permutation, weight)
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=weight.device, dtype=dtype or weight.dtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if layer.bias is not None:
                    dense.bias.copy_(layer.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, dense)
        # A dense model: neither the qdec section nor the QDEC save path apply.
        if hasattr(model.config, "qdec"):
            del model.config.qdec
        model.__dict__.pop("save_pretrained", None)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


__all__ = ["QDECConfig", "QDECHfQuantizer", "checkpoint_directory"]
