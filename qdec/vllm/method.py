"""The ``qdec`` quantization method for vLLM: :class:`QDECConfig` and
:class:`QDECLinearMethod` (imported, and so registered, by :func:`qdec.vllm.register`).

Weights. Every quantized linear declares, with vLLM's parameter classes so that
fused layers (qkv_proj, gate_up_proj) and tensor-parallel sharding load by
vLLM's own loaders, the checkpoint's tensors (layouts: :mod:`qdec.formats.qdec_checkpoint`):

=====================  ====================  ==================================
parameter              local shape           split under tensor parallelism
=====================  ====================  ==================================
``qweight``            ``[N, K/32 * b]``     column: rows; row: 32-value blocks
``scales``, ``zeros``  ``[N, K/G]``          column: rows; row: whole groups
``input_perm``         ``[K]``               replicated (refused on a split input)
``residual``           ``[K, N/32 * rb]``    column: each input row's output
                                             slice (packed words); row: rows
``residual_scales``    ``[N]``               column: outputs; row: replicated
=====================  ====================  ==================================

A row-parallel split (o_proj, down_proj) must fall on group boundaries (and on
32-channel blocks); a column-parallel split or fused part of a layer with a
residual must keep each part's outputs a multiple of 32 (the residual packs
32 outputs per block). Both are checked with a message naming layer and sizes.
The residual store stays in host memory: it is created on the CPU and, where
CUDA is present, moved to pinned memory after loading, which the CUDA kernel
reads zero-copy (:func:`qdec.nn.place_residual`); it never enters the GPU pool.

Compute. :meth:`QDECLinearMethod.apply` runs ``torch.ops.qdec.quantized_matmul``
(k = 0) or ``compensated_linear`` (k > 0): every token row selects its own
top-k ``|x|`` channels, as :class:`qdec.nn.QDECLinear` does. The parts of a
fused layer share their input; when their k differ, each part runs on its own
slice of the packed weight and residual.

Tensor parallelism. A column-parallel rank sees all of ``x`` and selects
exactly as one process would. A row-parallel rank sees only its slice of ``x``
and, without communication, takes the top ``ceil(k / tp)`` channels of that
slice: ``tp * ceil(k / tp)`` channels in all, chosen locally, which is not the
global top-k. :func:`qdec.eval.ablations.tp_selection` measures the effect on
perplexity; :attr:`qdec.nn.QDECLinear.selection_shards` reproduces it exactly
in one process.

Validation. Before any weight is created, :meth:`QDECConfig.maybe_update_config`
validates the whole checkpoint (:func:`qdec.formats.qdec_checkpoint.verify_qdec_checkpoint`):
a missing residual, a tensor of the wrong shape or dtype, bits out of range are
refused with a :class:`qdec.formats.FormatError` naming the file and tensor.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch.nn import Parameter

from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

import qdec  # noqa: F401  (registers torch.ops.qdec)

from .. import ops
from ..formats import FormatError
from ..formats.qdec_checkpoint import (
    QUANT_METHOD,
    PackedWeight,
    k_for_linear,
    read_quantization_config,
    verify_qdec_checkpoint,
)
from ..nn import place_residual
from ..packing import packed_words

# vLLM's fused linears and the checkpoint projections they are made of, used
# when the model class does not publish its own packed_modules_mapping.
DEFAULT_PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                          "gate_up_proj": ["gate_proj", "up_proj"]}
ENV_K = "QDEC_K"
ENV_TUNE_CONFIG = "QDEC_TUNE_CONFIG"
ENV_TUNE_TARGET = "QDEC_TUNE_TARGET"

KSpec = int | float | dict[str, int | float]


def resolve_k_spec(checkpoint_k: KSpec) -> KSpec:
    """The k specification in force: ``QDEC_TUNE_CONFIG`` (+ ``QDEC_TUNE_TARGET``),
    else ``QDEC_K``, else the checkpoint's ``quantization_config.k``."""
    tune = os.environ.get(ENV_TUNE_CONFIG)
    if tune:
        from ..tune import load_config

        return load_config(tune, os.environ.get(ENV_TUNE_TARGET) or None)
    text = os.environ.get(ENV_K)
    if text:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{ENV_K}={text!r} is neither a number nor a JSON object") from None
        return read_quantization_config({"quant_method": QUANT_METHOD, "format_version": 1,
                                         "k": value}, f"environment variable {ENV_K}")["k"]
    return checkpoint_k


def resolve_sm_budgets() -> dict[str, int]:
    """The compensation kernel's SM budget per projection from ``QDEC_TUNE_CONFIG``
    (empty without one: 0 = automatic; the CPU kernel ignores it)."""
    tune = os.environ.get(ENV_TUNE_CONFIG)
    if not tune:
        return {}
    from ..tune import load_sm_budgets

    return load_sm_budgets(tune, os.environ.get(ENV_TUNE_TARGET) or None)


def k_for(spec: KSpec, name: str, in_features: int) -> int:
    """Channels per token for checkpoint projection ``name`` (full HF name) with
    ``in_features`` inputs: the shared rule of
    :func:`qdec.formats.qdec_checkpoint.k_for_linear` (a per-linear k map by
    full name, a per-projection mapping by last component, a fraction or a
    count)."""
    return k_for_linear(spec, name, in_features)


@register_quantization_config(QUANT_METHOD)
class QDECConfig(QuantizationConfig):
    """vLLM quantization config of a QDEC checkpoint (method name ``qdec``)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__()
        self.settings = settings
        self.checkpoint: str | None = None
        self.layers: dict[str, PackedWeight] = {}
        self.has_residual: set[str] = set()
        self.residual_bits: int | None = settings.get("residual_bits")
        self.k_spec: KSpec = settings.get("k", 0)
        self.sm_budgets: dict[str, int] = {}

    def __repr__(self) -> str:
        return (f"QDECConfig(checkpoint={self.checkpoint!r}, bits={self.settings.get('bits')}, "
                f"group_size={self.settings.get('group_size')}, "
                f"residual_bits={self.residual_bits}, k={self.k_spec!r})")

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Read only when config.json has no quantization_config (a checkpoint
        # written before that block existed, loaded with quantization="qdec").
        # vLLM matches file names by suffix: the slash keeps tokenizer_config.json
        # and generation_config.json out.
        return ["/config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QDECConfig":
        return cls(read_quantization_config(config, "quantization_config"))

    def maybe_update_config(self, model_name: str, hf_config: Any = None,
                            revision: str | None = None) -> None:
        """Validate the checkpoint directory ``model_name`` and read its per-layer
        metadata, before any weight is created (vLLM calls this right after
        :meth:`from_config`)."""
        path = Path(model_name)
        if not path.is_dir():
            raise FileNotFoundError(f"the qdec vLLM plugin loads local QDEC checkpoint "
                                    f"directories; {model_name} is not one")
        ckpt = verify_qdec_checkpoint(path, require_residual=self.residual_bits is not None)
        self.checkpoint = str(path)
        self.layers = ckpt.linears
        self.residual_bits = ckpt.qdec.get("residual_bits")
        self.has_residual = set(ckpt.linears) if self.residual_bits is not None else set()
        self.k_spec = resolve_k_spec(self.settings.get("k", 0))
        self.sm_budgets = resolve_sm_budgets()

    def parts_of(self, prefix: str) -> list[str]:
        """The checkpoint projections a vLLM layer ``prefix`` is made of."""
        parent, _, leaf = prefix.rpartition(".")
        mapping = getattr(self, "packed_modules_mapping", None) or DEFAULT_PACKED_MODULES
        names = mapping.get(leaf, [leaf])
        return [f"{parent}.{n}" if parent else n for n in names]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        parts = self.parts_of(prefix)
        if not self.layers:
            raise RuntimeError("QDECConfig.get_quant_method before maybe_update_config: the "
                               "checkpoint was not validated")
        present = [p for p in parts if p in self.layers]
        if not present:
            return UnquantizedLinearMethod()
        if len(present) != len(parts):
            raise FormatError(f"{self.checkpoint}: vLLM layer {prefix} fuses {parts}, but only "
                              f"{present} are quantized in the checkpoint")
        return QDECLinearMethod(self, prefix, parts)


@register_weight_loader_v2_supported_method
class QDECLinearMethod(LinearMethodBase):
    """Packed low-bit weight plus host-resident residual store for one vLLM
    linear layer (possibly fused from several checkpoint projections)."""

    def __init__(self, config: QDECConfig, prefix: str, parts: list[str]) -> None:
        self.config = config
        self.prefix = prefix
        self.parts = parts
        weights = [config.layers[p] for p in parts]
        first = weights[0]
        for p, w in zip(parts, weights):
            same = (w.bits, w.group_size, w.symmetric, w.in_features, w.scales.dtype) == (
                first.bits, first.group_size, first.symmetric, first.in_features,
                first.scales.dtype)
            if not same:
                raise FormatError(f"{config.checkpoint}: {p} and {parts[0]} are fused into "
                                  f"{prefix} but differ in bits, group size, symmetry, "
                                  f"in_features or scale dtype")
            perm, perm0 = w.input_permutation, first.input_permutation
            if (perm is None) != (perm0 is None) or (
                    perm is not None and not torch.equal(perm, perm0)):
                raise FormatError(f"{config.checkpoint}: {p} and {parts[0]} are fused into "
                                  f"{prefix} (one input) but have different input_perm")
        self.bits = first.bits
        self.group_size = first.group_size
        self.symmetric = first.symmetric
        self.in_features = first.in_features
        self.scale_dtype = first.scales.dtype
        self.has_perm = first.input_permutation is not None
        self.has_residual = all(p in config.has_residual for p in parts)
        self.k_full = [k_for(config.k_spec, p, self.in_features) for p in parts]
        self.sm_budget = [int(config.sm_budgets.get(p, config.sm_budgets.get(
            p.rsplit(".", 1)[-1], 0))) for p in parts]
        if any(self.k_full) and not self.has_residual:
            raise ValueError(f"k > 0 for {prefix} but the checkpoint has no residual store")

    # ------------------------------------------------------------ weights
    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        loader = extra_weight_attrs["weight_loader"]
        K, K_full, N = input_size_per_partition, input_size, sum(output_partition_sizes)
        G, bits, rb = self.group_size, self.bits, self.config.residual_bits
        where = f"{self.config.checkpoint}: vLLM layer {self.prefix}"
        if K_full != self.in_features:
            raise FormatError(f"{where}: the model expects {K_full} input channels, the "
                              f"checkpoint's {self.parts[0]} has {self.in_features}")
        if sum(self.expected_out(p) for p in self.parts) != output_size:
            raise FormatError(f"{where}: the model expects {output_size} outputs, the "
                              f"checkpoint's {self.parts} have "
                              f"{[self.expected_out(p) for p in self.parts]}")
        split_input = K != K_full
        if split_input:
            if G == -1 or K % G or K % 32:
                raise ValueError(f"{where}: a tensor-parallel rank gets {K} of {K_full} input "
                                 f"channels, which must be whole groups (group_size={G}) and "
                                 f"whole 32-channel blocks; use another tensor-parallel size")
            if self.has_perm:
                raise ValueError(f"{where}: an input permutation (act-order) cannot be split "
                                 f"across tensor-parallel ranks")
        fused_or_split = len(output_partition_sizes) > 1 or N != output_size
        if self.has_residual and fused_or_split and any(n % 32 for n in output_partition_sizes):
            raise ValueError(f"{where}: output parts {output_partition_sizes} per rank must be "
                             f"multiples of 32 (the residual packs 32 outputs per block)")
        groups = 1 if G == -1 else -(-K // G)
        layer.register_parameter("qweight", PackedvLLMParameter(
            data=torch.empty(N, packed_words(K, bits), dtype=torch.int32), input_dim=1,
            output_dim=0, packed_dim=1, packed_factor=Fraction(32, bits), weight_loader=loader))
        layer.register_parameter("scales", GroupQuantScaleParameter(
            data=torch.empty(N, groups, dtype=self.scale_dtype), input_dim=1, output_dim=0,
            weight_loader=loader))
        if not self.symmetric:
            layer.register_parameter("zeros", GroupQuantScaleParameter(
                data=torch.empty(N, groups, dtype=self.scale_dtype), input_dim=1, output_dim=0,
                weight_loader=loader))
        else:
            layer.zeros = None
        if self.has_perm:
            layer.register_parameter("input_perm", RowvLLMParameter(
                data=torch.empty(K, dtype=torch.int32), input_dim=0, weight_loader=loader))
        else:
            layer.input_perm = None
        if self.has_residual:
            layer.register_parameter("residual", PackedvLLMParameter(
                data=torch.empty(K, packed_words(N, rb), dtype=torch.int32, device="cpu"),
                input_dim=0, output_dim=1, packed_dim=1, packed_factor=Fraction(32, rb),
                weight_loader=loader))
            layer.register_parameter("residual_scales", ChannelQuantScaleParameter(
                data=torch.empty(N, dtype=torch.float32), output_dim=0, weight_loader=loader))
        else:
            layer.residual = layer.residual_scales = None
        layer.qdec_shards = K_full // K  # row-parallel: the tensor-parallel degree
        layer.qdec_out_parts = list(output_partition_sizes)
        layer.qdec_act_dtype = params_dtype
        layer.qdec_k = self.local_k(layer, self.k_full)

    @staticmethod
    def local_k(layer: torch.nn.Module, k_full: list[int]) -> list[int]:
        """k per part on this rank: a row-parallel rank selects ceil(k / tp) of
        its own channels (module doc); otherwise k itself."""
        return [-(-k // layer.qdec_shards) for k in k_full]

    def set_k(self, layer: torch.nn.Module, spec: KSpec) -> None:
        """Change k of a loaded layer (same forms as ``QDEC_K``)."""
        k_full = [k_for(spec, p, self.in_features) for p in self.parts]
        if any(k_full) and not self.has_residual:
            raise ValueError(f"k > 0 for {self.prefix} but the checkpoint has no residual store")
        self.k_full = k_full
        layer.qdec_k = self.local_k(layer, k_full)
        layer.qdec_slices = self._slices(layer)

    def expected_out(self, part: str) -> int:
        return self.config.layers[part].out_features

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        dtype = layer.qdec_act_dtype

        def frozen(t: torch.Tensor) -> Parameter:
            return Parameter(t, requires_grad=False)

        layer.qweight = frozen(layer.qweight.data)
        layer.scales = frozen(layer.scales.data.to(dtype))
        if layer.zeros is not None:
            layer.zeros = frozen(layer.zeros.data.to(dtype))
        if layer.input_perm is not None:
            perm = layer.input_perm.data.long()
            if not torch.equal(perm.sort().values.cpu(), torch.arange(perm.numel())):
                raise FormatError(f"{self.config.checkpoint}: tensor {self.parts[0]}.input_perm "
                                  f"is not a permutation")
            layer.input_perm = frozen(perm)
        if layer.residual is not None:
            # Host memory, pinned (mapped) when CUDA is present; never the GPU pool.
            layer.residual = frozen(place_residual(layer.residual.data))
            layer.residual_scales = frozen(layer.residual_scales.data.float())
        layer.qdec_slices = self._slices(layer)

    def _slices(self, layer: torch.nn.Module) -> list[tuple[int, dict[str, Any]]]:
        """``[(k, tensors)]`` to run: one entry for the whole layer when every part
        has the same k (SM budget: the largest of the parts'), else one per part
        (its rows of the weight, its packed residual columns, copied contiguous
        once here, its own SM budget)."""
        ks = layer.qdec_k
        whole = {"qweight": layer.qweight, "scales": layer.scales, "zeros": layer.zeros,
                 "residual": layer.residual, "residual_scales": layer.residual_scales}
        if len(set(ks)) == 1:
            return [(ks[0], {**whole, "sm_budget": max(self.sm_budget)})]
        rb = self.config.residual_bits
        out, start = [], 0
        for k, n, budget in zip(ks, layer.qdec_out_parts, self.sm_budget):
            rows = slice(start, start + n)
            part = {"qweight": layer.qweight[rows], "scales": layer.scales[rows],
                    "zeros": None if layer.zeros is None else layer.zeros[rows],
                    "residual": None, "residual_scales": None, "sm_budget": budget}
            if layer.residual is not None:
                w0, w1 = start // 32 * rb, (start + n) // 32 * rb
                part["residual"] = place_residual(layer.residual[:, w0:w1])
                part["residual_scales"] = layer.residual_scales[rows]
            out.append((k, part))
            start += n
        return out

    # ------------------------------------------------------------ compute
    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.input_perm is not None:
            x = x.index_select(-1, layer.input_perm)
        outs = []
        for k, t in layer.qdec_slices:
            if k == 0:
                outs.append(ops.quantized_matmul(x, t["qweight"], t["scales"], t["zeros"],
                                                 self.bits, self.group_size))
            else:
                outs.append(ops.compensated_linear(
                    x, t["qweight"], t["scales"], t["zeros"], self.bits, self.group_size,
                    t["residual"], t["residual_scales"], self.config.residual_bits, k,
                    sm_budget=t["sm_budget"]))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y if bias is None else y + bias.to(y.dtype)


def configure(model: torch.nn.Module, k: KSpec) -> int:
    """Set k (a count, a fraction, or a mapping per projection, as ``QDEC_K``)
    on every QDEC layer of a loaded vLLM model; returns how many layers. Run it
    in every worker with ``llm.apply_model(functools.partial(configure, k=...))``.
    Prefix caching must be off for the change to reach cached prompts."""
    if isinstance(k, dict):
        k = dict(k)
    n = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, QDECLinearMethod):
            method.set_k(module, k)
            n += 1
    return n


__all__ = ["QDECConfig", "QDECLinearMethod", "configure", "k_for", "resolve_k_spec",
           "resolve_sm_budgets"]
