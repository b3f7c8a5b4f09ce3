"""Layer-streaming quantization of Hugging Face Llama-family decoders, with the
QDEC residual store formed per linear.

How it runs (:func:`quantize_model`):

1. The calibration sequences are embedded and the inputs of decoder layer 0 are
   captured (a pre-hook on layer 0 records its hidden states and keyword
   arguments, including the rotary ``position_embeddings`` (cos, sin) computed by
   ``model.model.rotary_emb`` and the causal mask, then aborts the forward).
2. Decoder layers are then processed **one at a time**: the layer's inputs are
   run through it once with hooks that record the inputs of its linears; the
   linears are quantized (RTN, AWQ or GPTQ); for each linear the relative output
   error ``||X W_ref^T - X W_hat^T||^2 / ||X W_ref^T||^2`` on the calibration
   tokens is measured, and the residual ``R = W_ref - W_hat`` is quantized; then
   the calibration activations are propagated to the next layer.
3. Propagation (``propagate``): ``"quantized"`` (default) runs each layer with
   its quantized weights, so layer ``i + 1`` is calibrated on the activations it
   will see in the quantized model, as GPTQ does; ``"fp"`` propagates the FP
   outputs (what the AWQ reference code does, to our reading). Within a layer, all linears are calibrated from one
   pass through the FP layer (no "true-sequential" re-capture).

Memory: besides the model itself, the working set is one decoder layer's
temporaries plus the calibration activations. Per linear: a few float32
``[N, K]`` matrices (``W_hat``, the residual, an error difference; weights are
quantized and packed a chunk of rows at a time, so no larger temporaries), and
for GPTQ, or when it is the cheaper way to measure errors, one ``[K, K]`` float32
Gram/Hessian (plus GPTQ's two ``[K, K]`` factor workspaces). Activations: the layer
input/output ``[n, seq, hidden]`` and the four captured linear inputs
(``hidden`` x 3 and ``intermediate`` per token). Nothing is kept per layer except
the packed results (on the CPU). The model stays where it is; with ``device``
set, each layer is moved there for its turn and back afterwards.
:func:`measure_slice_memory` measures this on a Llama-3-8B-shaped slice. The
model itself must be in memory here; :mod:`qdec.quant.streaming` runs the same
per-layer code (:func:`quantize_decoder_layer`) on a checkpoint read from disk one
layer at a time, so its peak does not grow with the model.

What happens to the model: RTN and GPTQ leave it unchanged. AWQ modifies it
**in place** by folding its scales (an FP-exact reparametrisation): norm
weights are divided by ``s``, consumer columns multiplied, producer rows (v, up)
divided. After the call every decoder linear's weight is ``W_ref``, the scaled,
unclipped FP weight that the residual is formed against; the scaled norm
weights are also returned in :attr:`QuantizationResult.norm_weights` so a
checkpoint can store them.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from ..packing import check_bits
from .awq import AWQLayerResult, awq_layer, clip_weight
from .gptq import HessianAccumulator, quantize_gptq
from .grid import QuantizedWeight, check_group_size
from .residual import dequantize_residual, pack_residual, residual_scale_search
from .rtn import quantize_rtn

if TYPE_CHECKING:
    from ..patch import InputAbsSums

METHODS = ("rtn", "awq", "gptq")

# Relative names of the decoder linears and the captured activation each one reads.
LINEAR_INPUTS: dict[str, str] = {
    "self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}
# One linear per captured activation: the one whose pre-hook records it.
_CAPTURE_FROM = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj",
                 "mlp_in": "mlp.gate_proj", "down_in": "mlp.down_proj"}


@dataclasses.dataclass
class LinearResult:
    """One quantized decoder linear.

    ``residual`` is int32 ``[K, ceil(N/32) * residual_bits]`` and
    ``residual_scales`` float32 ``[N]`` (:mod:`qdec.quant.residual`), or both None
    when no residual was requested. ``rel_error`` is the calibration output error
    of ``W_hat`` against ``W_ref``; ``rel_error_full_residual`` the same with the
    whole quantized residual added (the error left when every channel is
    compensated, i.e. the residual quantizer's own error).
    """

    name: str
    weight: QuantizedWeight
    residual: Tensor | None
    residual_scales: Tensor | None
    residual_bits: int
    rel_error: float
    rel_error_full_residual: float
    weight_bytes: int
    residual_bytes: int
    seconds: float
    clip: Tensor | None = None  # AWQ clip thresholds [N, groups], if clipped

    def packed(self):
        """As :class:`qdec.patch.PackedLinear` (what :func:`qdec.patch.patch` takes)."""
        from ..patch import PackedLinear
        w = self.weight
        return PackedLinear(w.pack(), w.scales, w.zeros, w.bits, w.group_size, w.in_features,
                            self.residual, self.residual_scales, self.residual_bits)


@dataclasses.dataclass
class QuantizationResult:
    """Everything :func:`quantize_model` produced.

    ``linears`` maps qualified names (``model.layers.3.self_attn.q_proj``) to
    their result. ``norm_weights`` holds the AWQ-scaled norm weights
    (``model.layers.3.input_layernorm.weight``) that replace the originals (the
    model already has them). ``awq`` holds each layer's search results
    (``model.layers.3`` -> scales and clip thresholds) for saving.
    """

    method: str
    bits: int
    group_size: int
    symmetric: bool
    residual_bits: int | None
    propagate: str
    linears: dict[str, LinearResult]
    norm_weights: dict[str, Tensor]
    awq: dict[str, AWQLayerResult]
    layer_seconds: dict[str, float]
    seconds: float
    # Mean |x| per input channel of each linear (float32 [K], original input
    # order) over the calibration tokens as the quantized model (k = 0) sees
    # them: recorded by the propagated run (propagate="quantized"), empty
    # otherwise. The static policy's ranking (qdec.patch.set_static_rankings)
    # without a second calibration pass.
    input_abs_mean: dict[str, Tensor] = dataclasses.field(default_factory=dict)

    def packed(self) -> dict:
        """``{name: PackedLinear}`` for :func:`qdec.patch.patch`."""
        return {name: r.packed() for name, r in self.linears.items()}

    def rel_errors(self) -> dict[str, float]:
        return {name: r.rel_error for name, r in self.linears.items()}

    def summary(self) -> str:
        return summary_line(self)


def summary_line(result, suffix: str = "") -> str:
    """One line on a quantization run (this module's or the streaming one's):
    method, grid, per-linear output error, bytes, time."""
    linears = result.linears.values()
    errs = torch.tensor([r.rel_error for r in linears])
    wbytes = sum(r.weight_bytes for r in linears)
    rbytes = sum(r.residual_bytes for r in linears)
    return (f"{result.method} {result.bits}-bit G={result.group_size} "
            f"{'sym' if result.symmetric else 'asym'}: {len(result.linears)} linears, "
            f"rel. output error median {errs.median().item():.4g} "
            f"mean {errs.mean().item():.4g}; packed {wbytes / 2**20:.2f} MiB, "
            f"residual {rbytes / 2**20:.2f} MiB; {result.seconds:.1f} s{suffix}")


class _LayerInputsCaptured(Exception):
    """Raised by the layer-0 pre-hook to stop the forward once inputs are recorded."""


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no model.layers decoder stack "
                         f"(a transformers Llama-family causal LM is expected)")
    for name in LINEAR_INPUTS:
        try:
            lin = layers[0].get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"model.layers.0.{name} is not an nn.Linear "
                             f"({type(lin).__name__}); is the model already quantized?")
    return layers


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calib_ids: Tensor, batch_size: int = 1
                         ) -> tuple[Tensor, dict]:
    """Hidden states entering decoder layer 0 and the layer's keyword arguments.

    Args:
        model: transformers Llama-family causal LM.
        calib_ids: int64 ``[n, seq]`` token ids.
        batch_size: sequences per embedding call.

    Returns:
        ``(hidden [n, seq, hidden], kwargs)``: ``kwargs`` are those of the first
        call (``position_embeddings`` (cos, sin), ``attention_mask``,
        ``position_ids``, ...); all sequences share one length, so they are the
        same for every batch, and batch-1 tensors broadcast over any batch.
    """
    layers = _decoder_layers(model)
    captured: list[Tensor] = []
    kwargs_seen: list[dict] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.detach())
        if not kwargs_seen:
            kwargs_seen.append(kwargs)
        raise _LayerInputsCaptured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for b in range(0, calib_ids.shape[0], batch_size):
            try:
                model(calib_ids[b:b + batch_size].to(device), use_cache=False)
            except _LayerInputsCaptured:
                pass
            else:
                raise RuntimeError("decoder layer 0 was never called during the forward pass")
    finally:
        handle.remove()
    kwargs = kwargs_seen[0]
    kwargs["use_cache"] = False
    # Batch-size-1 kwargs are reused for every batch: require no per-sample content.
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[0] not in (1,):
        kwargs["attention_mask"] = mask[:1]
    return torch.cat(captured), kwargs


def _run_layer(layer: nn.Module, hidden: Tensor, kwargs: dict, batch_size: int) -> Tensor:
    outs = []
    for b in range(0, hidden.shape[0], batch_size):
        out = layer(hidden[b:b + batch_size], **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


@torch.no_grad()
def capture_linear_inputs(layer: nn.Module, hidden: Tensor, kwargs: dict, batch_size: int = 1
                          ) -> tuple[dict[str, Tensor], Tensor]:
    """Run ``hidden [n, seq, hidden]`` through one decoder layer, recording the
    inputs of its linears. Returns ``({"attn_in", "o_in", "mlp_in", "down_in"} ->
    [n, seq, K], layer output [n, seq, hidden])``."""
    chunks: dict[str, list[Tensor]] = {key: [] for key in _CAPTURE_FROM}
    handles = []
    for key, name in _CAPTURE_FROM.items():
        def hook(module: nn.Module, args: tuple, key: str = key) -> None:
            chunks[key].append(args[0].detach())
        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    try:
        out = _run_layer(layer, hidden, kwargs, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {key: torch.cat(c) for key, c in chunks.items()}, out


@torch.no_grad()
def output_errors(x: Tensor | None, w_ref: Tensor, w_hats: Sequence[Tensor],
                  gram: Tensor | None = None, tokens_per_chunk: int = 4096) -> list[float]:
    """``||X W_ref^T - X W_hat^T||^2 / ||X W_ref^T||^2`` for each ``W_hat`` [N, K].

    Either from the tokens ``x [..., K]`` directly (float32, chunked over tokens),
    or, when ``gram`` (any positive multiple of ``X^T X``, float ``[K, K]``) is
    given, as ``tr(D G D^T) / tr(W G W^T)`` with ``D = W_ref - W_hat``: cheaper
    when several linears share an input with more tokens than channels."""
    w_ref = w_ref.float()
    if gram is None:
        if x is None:
            raise ValueError("output_errors needs x or gram")
        x = x.reshape(-1, x.shape[-1])

    def energy(m: Tensor) -> float:  # ||X m^T||^2, or tr(m G m^T)
        if gram is not None:
            return ((m @ gram.float()) * m).sum().item()
        total = 0.0
        for t0 in range(0, x.shape[0], tokens_per_chunk):
            total += (x[t0:t0 + tokens_per_chunk].float() @ m.t()).square().sum().item()
        return total

    den = energy(w_ref)
    # One difference matrix alive at a time: they are as large as the weight.
    nums = [energy(w_ref - w.float()) for w in w_hats]
    return [n / den if den > 0 else float("nan") for n in nums]


def output_error(x: Tensor, w_ref: Tensor, w_hat: Tensor) -> float:
    """``||X W_ref^T - X W_hat^T||^2 / ||X W_ref^T||^2`` over the tokens ``x [..., K]``."""
    return output_errors(x, w_ref, [w_hat])[0]


def _gram_pays(tokens: int, K: int, outputs: int, evals: int, gram_bytes_limit: int) -> bool:
    """Whether ``X^T X`` (T K^2, then evals N K^2) is cheaper than ``evals + 1``
    direct products (T K N each), for the linears sharing one input."""
    if K * K * 4 > gram_bytes_limit:
        return False
    return tokens * K * K + evals * outputs * K * K < (evals + 1) * tokens * K * outputs


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """How each decoder layer is quantized (the per-layer arguments of
    :func:`quantize_model`, shared with :mod:`qdec.quant.streaming`)."""

    method: str
    bits: int
    group_size: int
    symmetric: bool = False
    residual_bits: int | None = 4
    propagate: str = "quantized"
    scale_dtype: torch.dtype = torch.float16
    residual_grid_points: int = 32
    batch_size: int = 1
    gptq_act_order: bool = False
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    awq_n_grid: int = 20
    awq_clip: bool = True
    awq_search_samples: int | None = None
    awq_clip_tokens: int = 512

    def validate(self, calib_ids: Tensor | None) -> None:
        """Raise ValueError for an unknown method, bad widths or calibration ids."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        check_bits(self.bits)
        check_group_size(self.group_size)
        if self.residual_bits is not None:
            check_bits(self.residual_bits, "residual_bits")
        if self.propagate not in ("quantized", "fp"):
            raise ValueError(f"propagate must be 'quantized' or 'fp', got {self.propagate!r}")
        if calib_ids is None and self.method != "rtn":
            raise ValueError(f"method={self.method!r} needs calib_ids (int64 [n, seq])")
        if calib_ids is not None and (calib_ids.dim() != 2 or calib_ids.dtype != torch.long
                                      or calib_ids.numel() == 0):
            raise ValueError(f"calib_ids must be a non-empty int64 [n, seq] tensor, got "
                             f"{calib_ids.dtype} {tuple(calib_ids.shape)}")


@torch.no_grad()
def quantize_decoder_layer(layer: nn.Module, prefix: str, hidden: Tensor | None,
                           kwargs: dict | None, opts: LayerOptions, result: "QuantizationResult",
                           note: Callable[[str], None] | None = None,
                           input_sums: "InputAbsSums | None" = None) -> Tensor | None:
    """Quantize the 7 linears of one decoder layer (already on its processing
    device) and return the calibration hidden states for the next layer.

    Args:
        layer: the decoder layer; AWQ folds its scales into it in place.
        prefix: its qualified name, e.g. ``"model.layers.3"``.
        hidden: the layer's input ``[n, seq, hidden]`` (None: no calibration, RTN only).
        kwargs: the layer's keyword arguments (:func:`capture_layer_inputs`).
        opts: the quantization settings.
        result: receives the :class:`LinearResult` of each linear (and, for AWQ,
            the layer's search result and scaled norm weights).
        note: optional ``callable(str)`` for progress messages.
        input_sums: receives the linears' inputs of the propagated quantized
            run (``propagate="quantized"``), under their qualified names.

    Returns:
        The next layer's input (quantized or FP outputs, per ``opts.propagate``),
        or None without calibration.
    """
    note = note or (lambda msg: None)
    method, bits, group_size, symmetric = opts.method, opts.bits, opts.group_size, opts.symmetric
    residual_bits, batch_size = opts.residual_bits, opts.batch_size
    inputs, fp_out = (None, None)
    if hidden is not None:
        inputs, fp_out = capture_linear_inputs(layer, hidden, kwargs, batch_size)
    clips: dict[str, Tensor] = {}
    if method == "awq":
        awq_result = awq_layer(layer, inputs, kwargs, bits, group_size, symmetric,
                               opts.awq_n_grid, opts.awq_clip, 0.5, opts.awq_clip_tokens,
                               opts.awq_search_samples, batch_size, note)
        result.awq[prefix] = awq_result
        clips = awq_result.clips
        for norm in ("input_layernorm", "post_attention_layernorm"):
            result.norm_weights[f"{prefix}.{norm}.weight"] = (
                layer.get_submodule(norm).weight.detach().cpu().clone())
    # One [K, K] Gram/Hessian alive at a time: the linears sharing an input are
    # consecutive in LINEAR_INPUTS.
    gram_key, gram = None, None
    evals = 1 if residual_bits is None else 2
    quantized: dict[str, QuantizedWeight] = {}
    for name, key in LINEAR_INPUTS.items():
        lin: nn.Linear = layer.get_submodule(name)
        note(name)
        t0 = time.perf_counter()
        w_ref = lin.weight.detach()
        qname = f"{prefix}.{name}"
        if inputs is not None and key != gram_key:
            gram_key, gram = key, None
            x = inputs[key]
            tokens, K = x.numel() // x.shape[-1], x.shape[-1]
            outputs = sum(layer.get_submodule(n).out_features
                          for n, k in LINEAR_INPUTS.items() if k == key)
            if method == "gptq" or _gram_pays(tokens, K, outputs, evals, 1 << 30):
                acc = HessianAccumulator(K, w_ref.device)
                acc.add_batch(x)
                gram = acc.H
        if method == "gptq":
            qw = quantize_gptq(w_ref, gram, bits, group_size, symmetric,
                               opts.gptq_act_order, opts.gptq_damp, opts.gptq_block_size,
                               opts.scale_dtype, name=qname)
        else:
            w_in = clip_weight(w_ref, clips[name], group_size) if name in clips else w_ref
            qw = quantize_rtn(w_in, bits, group_size, symmetric, opts.scale_dtype)
        w_hat = qw.dequantize(torch.float32)
        residual = residual_scales = None
        err = err_full = float("nan")
        rbytes = 0
        candidates = [w_hat]
        if residual_bits is not None:
            q_r, residual_scales = residual_scale_search(w_ref.float() - w_hat, residual_bits,
                                                         opts.residual_grid_points)
            residual = pack_residual(q_r, residual_bits)
            rbytes = residual.numel() * 4 + residual_scales.numel() * 4
            candidates.append(w_hat + dequantize_residual(q_r, residual_scales))
            del q_r
        seconds = time.perf_counter() - t0
        if inputs is not None:
            errs = output_errors(inputs[key], w_ref, candidates, gram)
            err = errs[0]
            if residual_bits is not None:
                err_full = errs[1]
        del candidates, w_hat
        quantized[name] = qw
        result.linears[qname] = LinearResult(
            qname, _cpu_weight(qw), None if residual is None else residual.cpu(),
            None if residual_scales is None else residual_scales.cpu(),
            residual_bits or 0, err, err_full, qw.nbytes(), rbytes, seconds,
            clips.get(name))
    del gram
    if hidden is not None:
        if opts.propagate == "fp":
            hidden = fp_out
        else:
            hidden = _run_with_weights(layer, quantized, hidden, kwargs, batch_size,
                                       input_sums, prefix)
    del inputs, fp_out
    return hidden


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: Literal["rtn", "awq", "gptq"],
    bits: int,
    group_size: int,
    symmetric: bool = False,
    calib_ids: Tensor | None = None,
    residual_bits: int | None = 4,
    progress: bool = True,
    *,
    propagate: Literal["quantized", "fp"] = "quantized",
    scale_dtype: torch.dtype = torch.float16,
    residual_grid_points: int = 32,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    layers: Sequence[int] | None = None,
    gptq_act_order: bool = False,
    gptq_damp: float = 0.01,
    gptq_block_size: int = 128,
    awq_n_grid: int = 20,
    awq_clip: bool = True,
    awq_search_samples: int | None = None,
    awq_clip_tokens: int = 512,
) -> QuantizationResult:
    """Quantize every decoder linear of a Llama-family model, layer by layer.

    The model must already be in memory; :func:`qdec.quant.streaming.quantize_checkpoint_streaming`
    does the same from a checkpoint on disk, holding one decoder layer at a time.

    Args:
        model: transformers ``LlamaForCausalLM``-like model (``model.model.layers[i]``
            with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``).
            Modified in place by AWQ only (see the module docstring).
        method: ``"rtn"``, ``"awq"`` or ``"gptq"``.
        bits: weight code width, 2..8.
        group_size: ``-1`` or a positive multiple of 32 (ragged last group allowed).
        symmetric: symmetric grid (no stored zeros).
        calib_ids: int64 ``[n, seq]`` calibration token ids. Required for AWQ and
            GPTQ; for RTN without it no errors are measured (reported as NaN).
        residual_bits: residual code width (2..8), or None for no residual.
        progress: show a tqdm bar over layers.
        propagate: ``"quantized"`` or ``"fp"`` (see the module docstring).
        scale_dtype: stored dtype of the weight scales/zeros.
        residual_grid_points: candidate scales per residual row.
        batch_size: calibration sequences per layer call.
        device: where each layer is processed (default: where it is).
        layers: indices of the decoder layers to quantize (default all); the
            others are still run to propagate activations.
        gptq_act_order, gptq_damp, gptq_block_size: GPTQ options.
        awq_n_grid, awq_clip, awq_search_samples, awq_clip_tokens: AWQ options
            (see :func:`qdec.quant.awq.awq_layer`).

    Returns:
        :class:`QuantizationResult`.
    """
    opts = LayerOptions(method, bits, group_size, symmetric, residual_bits, propagate,
                        scale_dtype, residual_grid_points, batch_size, gptq_act_order,
                        gptq_damp, gptq_block_size, awq_n_grid, awq_clip, awq_search_samples,
                        awq_clip_tokens)
    opts.validate(calib_ids)
    decoder = _decoder_layers(model)
    selected = set(range(len(decoder)) if layers is None else layers)
    bad = sorted(i for i in selected if not 0 <= i < len(decoder))
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(decoder)} decoder layers")
    start = time.perf_counter()
    result = QuantizationResult(method, bits, group_size, symmetric, residual_bits, propagate,
                                {}, {}, {}, {}, 0.0)

    hidden = kwargs = None
    input_sums = None
    if calib_ids is not None:
        hidden, kwargs = capture_layer_inputs(model, calib_ids, batch_size)
        if propagate == "quantized":
            from ..patch import InputAbsSums

            input_sums = InputAbsSums()
    last = max(selected) if selected else -1
    bar = range(last + 1)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=f"{method} {bits}-bit", unit="layer")
    note = bar.set_postfix_str if progress else None
    for i in bar:
        layer = decoder[i]
        home = next(layer.parameters()).device
        if device is not None:
            layer.to(device)
            if hidden is not None:
                hidden = hidden.to(device)
                kwargs = _to_device(kwargs, device)
        layer_start = time.perf_counter()
        if i not in selected:
            if hidden is not None:
                hidden = _run_layer(layer, hidden, kwargs, batch_size)
            layer.to(home)
            continue
        prefix = f"model.layers.{i}"
        hidden = quantize_decoder_layer(layer, prefix, hidden, kwargs, opts, result, note,
                                        input_sums)
        layer.to(home)
        result.layer_seconds[prefix] = time.perf_counter() - layer_start
    if input_sums is not None:
        result.input_abs_mean = input_sums.means()
    result.seconds = time.perf_counter() - start
    return result


def _cpu_weight(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.codes.cpu(), qw.scales.cpu(),
                           None if qw.zeros is None else qw.zeros.cpu(), qw.bits, qw.group_size,
                           qw.in_features)


def _to_device(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _run_with_weights(layer: nn.Module, weights: dict[str, QuantizedWeight], hidden: Tensor,
                      kwargs: dict, batch_size: int, input_sums: "InputAbsSums | None" = None,
                      prefix: str = "") -> Tensor:
    """Layer output with the given linears temporarily replaced by ``W_hat``;
    their inputs are added to ``input_sums`` (as ``<prefix>.<name>``) if given."""
    saved, hooks = {}, []
    try:
        for name, qw in weights.items():
            lin = layer.get_submodule(name)
            saved[name] = lin.weight.data
            lin.weight.data = qw.dequantize(torch.float32).to(lin.weight.dtype)
            if input_sums is not None:
                hooks.append(lin.register_forward_pre_hook(
                    lambda mod, args, qname=f"{prefix}.{name}": input_sums.add(qname, args[0])))
        return _run_layer(layer, hidden, kwargs, batch_size)
    finally:
        for h in hooks:
            h.remove()
        for name, w in saved.items():
            layer.get_submodule(name).weight.data = w


# --- A Llama-3-8B-shaped slice, for memory measurements -------------------------------

def llama3_8b_slice(num_layers: int = 2, vocab_size: int = 1024,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """A random ``LlamaForCausalLM`` with Llama-3-8B's layer shapes (hidden 4096,
    intermediate 14336, 32 heads, 8 KV heads, head dim 128) but only
    ``num_layers`` layers and a small vocabulary (the embeddings are not
    quantized, so they only inflate the baseline)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=num_layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=vocab_size,
                         max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in dtype: no float32 transient
    try:
        with torch.device("cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``getrusage``, which Linux reports
    in KiB), since the start or the last :func:`reset_peak_rss`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0,
    ``/proc/self/clear_refs``); returns False where that is not possible, in
    which case :func:`peak_rss_bytes` stays the process-lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_slice_memory(method: Literal["rtn", "awq", "gptq"] = "rtn", bits: int = 3,
                         group_size: int = 128, n_samples: int = 4, seqlen: int = 256,
                         num_layers: int = 2, dtype: torch.dtype = torch.bfloat16,
                         progress: bool = True, **kwargs) -> dict[str, float]:
    """Quantize a :func:`llama3_8b_slice` with random calibration tokens and report
    memory in GiB: RSS after building the model (``baseline``), peak RSS of the
    process (``peak``), their difference (``pipeline``: the streaming working set,
    to compare with one layer's FP weights, ``layer_fp``), and seconds.

    The peak mark is reset after the model is built (:func:`reset_peak_rss`) so
    that ``peak`` is the quantization's; where that fails, run this in a fresh
    process and read ``peak`` as the lifetime maximum."""
    model = llama3_8b_slice(num_layers, dtype=dtype)
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    ids = torch.randint(0, model.config.vocab_size, (n_samples, seqlen),
                        generator=torch.Generator().manual_seed(0))
    import gc
    gc.collect()
    baseline = current_rss_bytes()
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    res = quantize_model(model, method, bits, group_size, calib_ids=ids, progress=progress,
                         **kwargs)
    gib = float(2 ** 30)
    peak = peak_rss_bytes()
    return {
        "baseline_gib": baseline / gib,
        "peak_gib": peak / gib,
        "pipeline_gib": (peak - baseline) / gib,
        "layer_fp_gib": layer_params * torch.finfo(dtype).bits / 8 / gib,
        "layer_fp32_gib": layer_params * 4 / gib,
        "seconds": time.perf_counter() - t0,
        "median_rel_error": float(torch.tensor(list(res.rel_errors().values())).median()),
        "peak_was_reset": float(reset),
    }


__all__ = [
    "LINEAR_INPUTS", "LayerOptions", "LinearResult", "METHODS", "QuantizationResult",
    "capture_layer_inputs", "quantize_decoder_layer",
    "capture_linear_inputs", "current_rss_bytes", "llama3_8b_slice", "measure_slice_memory",
    "output_error", "output_errors", "peak_rss_bytes", "quantize_model", "reset_peak_rss", "wikitext_calibration",
]


def wikitext_calibration(tokenizer, n_samples: int = 16, seqlen: int = 512,
                         path: str = "/work/shared/data/wikitext-2/valid.txt", seed: int = 0
                         ) -> Tensor:
    """Calibration ids int64 ``[n_samples, seqlen]``: windows at seeded random
    offsets of the tokenized WikiText-2 *validation* text (never the test split).

    ``tokenizer`` is any callable returning ``.input_ids`` (a transformers tokenizer)."""
    if "test" in str(path).rsplit("/", 1)[-1]:
        raise ValueError(f"{path}: calibration must not use the test split")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
    if ids.numel() < seqlen + 1:
        raise ValueError(f"{path}: {ids.numel()} tokens, fewer than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
