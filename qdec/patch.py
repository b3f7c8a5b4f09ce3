"""Swap the decoder linears of Hugging Face Llama-family models for
:class:`qdec.nn.QDECLinear`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from .nn import QDECLinear, SelectionPolicy

# Model types whose decoder layers have exactly these projections with these
# names (transformers' LlamaDecoderLayer and its close relatives).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DECODER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


@dataclasses.dataclass
class PackedLinear:
    """Everything one ``QDECLinear`` is built from (layouts: :mod:`qdec.ops`)."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group_size: int
    in_features: int
    residual: Tensor | None = None
    residual_scales: Tensor | None = None
    residual_bits: int = 4
    input_permutation: Tensor | None = None  # act-order GPTQ (QDECLinear's doc)


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` replaced."""

    replaced: list[str]
    kept: list[str]
    gpu_bytes: int
    host_residual_bytes: int

    def __str__(self) -> str:
        return (f"replaced {len(self.replaced)} linears with QDECLinear "
                f"({self.gpu_bytes / 2**20:.1f} MiB packed weights, "
                f"{self.host_residual_bytes / 2**20:.1f} MiB residual in host memory); "
                f"kept {len(self.kept)} as they were")


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a Llama-family decoder we know."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"qdec.patch supports Hugging Face models of type {SUPPORTED_MODEL_TYPES} "
            f"(Llama, Mistral, Qwen2, SmolLM2), got model_type={model_type!r} "
            f"({type(model).__name__})")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no model.layers decoder stack")
    for name in DECODER_LINEARS:
        if not isinstance(layers[0].get_submodule(name), (nn.Linear, QDECLinear)):
            raise ValueError(f"model.layers.0.{name} is not a linear layer")


def decoder_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every decoder linear, layer by layer."""
    check_supported(model)
    for i, layer in enumerate(model.model.layers):
        for name in DECODER_LINEARS:
            yield f"model.layers.{i}.{name}", layer.get_submodule(name)


def patch(
    model: nn.Module,
    packed: Mapping[str, PackedLinear],
    k: int | float = 0,
    policy: SelectionPolicy = "dynamic",
    strict: bool = True,
) -> PatchReport:
    """Replace each decoder linear named in ``packed`` by a ``QDECLinear``.

    Args:
        model: a transformers Llama/Mistral/Qwen2/SmolLM2 causal LM.
        packed: qualified linear name (``model.layers.3.mlp.down_proj``) to its
            packed weight and residual, e.g. from :mod:`qdec.quant.pipeline` or a
            checkpoint read by :mod:`qdec.formats`.
        k, policy: initial compensation settings of every replaced layer.
        strict: require an entry for every decoder linear and no unknown names.
    """
    targets = dict(decoder_linears(model))
    unknown = sorted(set(packed) - set(targets))
    missing = sorted(set(targets) - set(packed))
    if unknown:
        raise KeyError(f"not decoder linears of this model: {unknown[:5]}")
    if strict and missing:
        raise KeyError(f"no packed weights for {len(missing)} decoder linears, e.g. {missing[:3]}")
    replaced = []
    gpu_bytes = host_bytes = 0
    for name, p in packed.items():
        old = targets[name]
        out_features = old.out_features
        if p.qweight.shape[0] != out_features or p.in_features != old.in_features:
            raise ValueError(
                f"{name}: packed weight is [{p.qweight.shape[0]}, {p.in_features}] but the model "
                f"layer is [{out_features}, {old.in_features}]")
        bias = None if getattr(old, "bias", None) is None else old.bias.detach().clone()
        device = old.weight.device if isinstance(old, nn.Linear) else old.qweight.device
        new = QDECLinear(p.qweight.to(device), p.scales.to(device),
                         None if p.zeros is None else p.zeros.to(device), p.bits, p.group_size,
                         p.in_features, p.residual,
                         None if p.residual_scales is None else p.residual_scales.to(device),
                         p.residual_bits, bias, k if p.residual is not None else 0, policy,
                         input_permutation=p.input_permutation)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        replaced.append(name)
        gpu_bytes += sum(t.numel() * t.element_size()
                         for t in (new.qweight, new.scales, new.zeros) if t is not None)
        if new.residual is not None:
            host_bytes += new.residual.numel() * 4
    kept = [n for n in targets if n not in packed]
    return PatchReport(replaced, kept, gpu_bytes, host_bytes)


def load_patched_checkpoint(path: str, k: int | float | Mapping[str, int | float] | None = None,
                            policy: SelectionPolicy = "dynamic") -> nn.Module:
    """A transformers model built from a QDEC checkpoint directory and patched
    with its packed weights and residual store (float32, CPU, eval mode): what
    ``qdec generate`` runs, and the reference the vLLM plugin is tested against.

    ``k`` (as :func:`configure` takes it) overrides the checkpoint's own
    ``quantization_config.k`` (a per-linear k map from :mod:`qdec.budget`, a
    per-projection mapping, a fraction or a count; absent = 0), which applies
    when ``k`` is None.

    Raises:
        qdec.formats.FormatError: the checkpoint is malformed (naming file and tensor).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .formats.qdec_checkpoint import checkpoint_k_map, read_qdec_checkpoint

    ckpt = read_qdec_checkpoint(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    model.load_state_dict(ckpt.tensors, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    packed = ckpt.packed_linears()
    if k is None or isinstance(k, Mapping):
        patch(model, packed, k=0, policy=policy)
        configure(model, k=k if k is not None else checkpoint_k_map(
            ckpt.config, {n: p.in_features for n, p in packed.items()},
            str(Path(path) / "config.json")))
    else:  # one k for all: layers without a residual store stay at 0
        patch(model, packed, k=k, policy=policy)
    return model.eval()


def qdec_layers(model: nn.Module) -> Iterator[tuple[str, QDECLinear]]:
    """Every ``QDECLinear`` of a patched model with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, QDECLinear):
            yield name, module


def configure(model: nn.Module, k: int | float | Mapping[str, int | float] | None = None,
              policy: SelectionPolicy | None = None, simulate_dense: bool | None = None,
              compensate_prefill: bool | None = None,
              sm_budget: int | Mapping[str, int] | None = None) -> None:
    """Set compensation settings on every ``QDECLinear`` of ``model``.

    ``k`` (and ``sm_budget``, the CUDA compensation's thread-block cap) may be
    one value for all layers, or a mapping from a projection suffix
    (``q_proj``, ``down_proj``, ...) or full layer name to a value.
    """
    def pick(setting, name):
        if isinstance(setting, Mapping):
            return setting.get(name, setting.get(name.rsplit(".", 1)[-1]))
        return setting

    for name, layer in qdec_layers(model):
        if (value := pick(k, name)) is not None:
            layer.k = value
        if (budget := pick(sm_budget, name)) is not None:
            if int(budget) < 0:
                raise ValueError(f"sm_budget of {name} must be >= 0 (0 = automatic), got {budget}")
            layer.sm_budget = int(budget)
        if policy is not None:
            layer.policy = policy
        if simulate_dense is not None:
            layer.simulate_dense = simulate_dense
        if compensate_prefill is not None:
            layer.compensate_prefill = compensate_prefill


class InputAbsSums:
    """Per linear, the running sum of ``|x|`` of each input channel over
    calibration tokens: the static policy's statistic. Shared by
    :func:`static_channels_from_calibration` and the quantization pipeline's
    propagated run (:attr:`qdec.quant.pipeline.QuantizationResult.input_abs_mean`),
    so both rank channels from the same sums."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, x: Tensor) -> None:
        """Add the tokens of ``x [..., K]`` (in the linear's input order)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sums[name] = self.sums.get(name, 0) + x.abs().sum(0)
        self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

    def means(self) -> dict[str, Tensor]:
        return {name: s / self.tokens[name] for name, s in self.sums.items()}


def set_static_rankings(model: nn.Module, means: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rank each QDECLinear's input channels by mean ``|x|`` (``means``: name ->
    float ``[K]`` in the original input order), most salient first, and set
    them as its static channels. Returns the rankings (int64 ``[K]``, in the
    layer's packed column order)."""
    rankings = {}
    for name, layer in qdec_layers(model):
        # layer_input permutes the last dimension: the means of the permuted
        # input are the permuted means.
        rankings[name] = layer.layer_input(means[name]).argsort(descending=True)
        layer.set_static_channels(rankings[name])
    return rankings


@torch.no_grad()
def static_channels_from_calibration(model: nn.Module, input_ids: Tensor) -> dict[str, Tensor]:
    """Rank each QDECLinear's input channels by mean ``|x|`` over calibration
    tokens (the *static* baseline: channels chosen once, offline), run through
    the model with ``k = 0``, and set them on the layers
    (:func:`set_static_rankings`). Returns the rankings."""
    sums = InputAbsSums()
    hooks = [layer.register_forward_pre_hook(lambda mod, args, name=name: sums.add(name, args[0]))
             for name, layer in qdec_layers(model)]
    try:
        saved = {n: (m.k, m.simulate_dense) for n, m in qdec_layers(model)}
        configure(model, k=0)
        # Only the linears' inputs are wanted: a transformers causal LM runs
        # its decoder alone, without the LM head (vocab x hidden per token).
        body = model.get_decoder() if hasattr(model, "get_decoder") else model
        for row in input_ids:
            body(row.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    for name, layer in qdec_layers(model):
        layer.k, layer.simulate_dense = saved[name]
    return set_static_rankings(model, sums.means())
