"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024), written from
the paper's algorithm.

Two searches per decoder layer, both on calibration activations:

1. **Scale search.** For a *scaling group* (a producer op ``prev`` whose output
   feeds the consumer linears ``L``) and the consumers' input ``x``, try per-input-
   channel scales ``s = mean_t |x_t| ** alpha``, normalised by ``sqrt(max(s) *
   min(s))``, for ``alpha`` in ``{0, 1/n, ..., (n-1)/n}``. For each, every consumer
   weight becomes ``Q(W * s) / s`` (fake-quantized in the scaled basis) and the
   loss is the MSE of the group's *block output* (the whole attention block for
   q/k/v, the whole MLP for gate/up, the consumer linear itself otherwise)
   against the FP block output. The best ``s`` is then folded in, which is exact
   in floating point: ``prev``'s output is divided by ``s`` (RMSNorm weight, or the
   rows and bias of a producing linear) and the consumers' columns multiplied.

   Llama groups (:func:`llama_scaling_groups`): input_layernorm -> q,k,v;
   v_proj -> o_proj only when ``v_proj.weight.shape == o_proj.weight.shape``
   (with grouped-query attention o_proj's input channels are repeats of v's
   outputs, so the scales would have to be tied across the repeated heads; AWQ
   skips the pair and so do we); post_attention_layernorm -> gate,up;
   up_proj -> down_proj.

2. **Clip search.** For each linear except q and k (their errors are
   amplified by the softmax and their outputs are only compared through
   attention), each (row, group) gets a clipping threshold ``max_val = (1 - i/n) *
   max|w|`` for ``i < max_shrink * n`` minimising the squared error of that
   group's partial outputs ``sum_k w[k] x[k]`` over a token subsample.

The scaled-and-clipped weight is then quantized with RTN. All searches use the
same grid as :func:`qdec.quant.rtn.quantize_rtn`.

Residual basis (method.md §2): QDEC's residual must be formed against the
*scaled* FP weight. This module returns the search results (scales, clip
thresholds) so they can be saved; the pipeline takes ``W_ref`` = the scaled,
**unclipped** weight, so the residual ``W_ref - W_hat`` also compensates the
clipping error (clipping lowers the grid error of most weights at the expense of
a few large ones, exactly the error the residual can correct).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..packing import check_bits
from .grid import (_grouped, check_group_size, effective_group_size, fake_quantize,
                   grid_params_from_range, num_groups)

# Smallest per-channel activation magnitude used in s = mean|x|^alpha; keeps
# channels that never fire from getting a zero (non-invertible) scale.
MIN_ACT = 1e-4


@dataclasses.dataclass
class ScalingGroup:
    """A producer and the linears that consume its output.

    ``prev_name``/``layer_names`` are relative to the decoder layer
    (``"input_layernorm"``, ``"self_attn.q_proj"``); ``block`` maps the consumers'
    input ``[batch, seq, K]`` to the output whose error the scale search
    minimises; ``input_key`` names the captured activation that feeds the group.
    """

    prev_name: str
    prev: nn.Module
    layer_names: list[str]
    layers: list[nn.Linear]
    block: Callable[[Tensor], Tensor]
    input_key: str


@dataclasses.dataclass
class AWQScale:
    """The result of one scale search (what llm-awq's ``--dump_awq`` keeps)."""

    prev_name: str
    layer_names: list[str]
    scales: Tensor  # float32 [K]
    alpha: float
    loss: float  # block-output MSE at the chosen alpha
    loss_unscaled: float  # ... at alpha = 0 (s = 1, plain RTN)


@dataclasses.dataclass
class AWQLayerResult:
    """Scale and clip search results of one decoder layer."""

    scales: list[AWQScale]
    clips: dict[str, Tensor]  # relative linear name -> float32 [N, groups] max_val


def _check_consumers(group_name: str, layers: Sequence[nn.Linear], K: int) -> None:
    for lin in layers:
        if lin.in_features != K:
            raise ValueError(f"{group_name}: consumer has in_features={lin.in_features}, "
                             f"expected {K}")


def activation_scales(x: Tensor) -> Tensor:
    """Per-channel ``mean |x|`` over all tokens of ``x [..., K]`` (float32 ``[K]``)."""
    x = x.reshape(-1, x.shape[-1])
    total = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    # Chunked so a half-precision input is never materialised whole in float32.
    for t0 in range(0, x.shape[0], 4096):
        total += x[t0:t0 + 4096].float().abs().sum(0)
    return total / max(x.shape[0], 1)


def scales_for_alpha(x_mean: Tensor, alpha: float) -> Tensor:
    """``s = x_mean ** alpha``, normalised so that ``max(s) * min(s) = 1``."""
    s = x_mean.clamp(min=MIN_ACT).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(x: Tensor, layers: Sequence[nn.Linear], block: Callable[[Tensor], Tensor],
                 bits: int, group_size: int, symmetric: bool = False, n_grid: int = 20,
                 x_mean: Tensor | None = None, name: str = "group"
                 ) -> tuple[Tensor, float, float, float]:
    """Grid search of the AWQ scale for one scaling group.

    Args:
        x: the consumers' input ``[batch, seq, K]`` (model dtype) fed to ``block``.
        layers: consumer linears; their weights are restored before returning.
        block: callable ``x -> output`` that runs through the consumers.
        bits, group_size, symmetric: the target grid.
        n_grid: number of alphas, ``alpha = i / n_grid``.
        x_mean: per-channel ``mean|x|`` (float32 ``[K]``); computed from ``x`` if
            None (pass it to use more tokens for the statistic than for the loss).
        name: used in error messages.

    Returns:
        ``(scales float32 [K], alpha, best_loss, loss_at_alpha_0)``.
    """
    K = x.shape[-1]
    _check_consumers(name, layers, K)
    if x_mean is None:
        x_mean = activation_scales(x)
    if tuple(x_mean.shape) != (K,):
        raise ValueError(f"{name}: x_mean must be [{K}], got {tuple(x_mean.shape)}")
    x_mean = x_mean.to(x.device)
    reference = block(x).float()
    originals = [lin.weight.data.clone() for lin in layers]
    best = (float("inf"), 0.0, torch.ones(K, dtype=torch.float32, device=x.device))
    loss_unscaled = float("nan")
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = scales_for_alpha(x_mean, alpha)
            for lin, w in zip(layers, originals):
                scaled = w.float() * s
                lin.weight.data.copy_(
                    fake_quantize(scaled, bits, group_size, symmetric) / s)
            loss = (block(x).float() - reference).square().mean().item()
            if i == 0:
                loss_unscaled = loss
            if loss < best[0]:
                best = (loss, alpha, s)
    finally:
        for lin, w in zip(layers, originals):
            lin.weight.data.copy_(w)
    if best[0] == float("inf"):
        raise ValueError(f"{name}: every candidate scale gave a non-finite loss")
    return best[2].float(), best[1], best[0], loss_unscaled


@torch.no_grad()
def apply_scale(prev: nn.Module, layers: Sequence[nn.Linear], scales: Tensor,
                name: str = "group") -> None:
    """Fold ``scales [K]`` into a producer and its consumers, in place; the FP
    function is unchanged (up to rounding): ``prev``'s output channels are divided
    by ``s`` and the consumers' input columns multiplied by ``s``.

    ``prev`` is an RMSNorm/LayerNorm-like module with ``weight [K]`` (and
    optionally ``bias``) or an ``nn.Linear`` with ``out_features == K``.
    """
    K = scales.numel()
    _check_consumers(name, layers, K)
    s = scales.float()
    if isinstance(prev, nn.Linear):
        if prev.out_features != K:
            raise ValueError(f"{name}: producer linear has {prev.out_features} outputs, "
                             f"scales have {K}")
        prev.weight.data.copy_((prev.weight.float() / s[:, None]).to(prev.weight.dtype))
    else:
        weight = getattr(prev, "weight", None)
        if weight is None or weight.shape != (K,):
            raise ValueError(f"{name}: producer {type(prev).__name__} needs a weight of shape "
                             f"[{K}], got {None if weight is None else tuple(weight.shape)}")
        weight.data.copy_((weight.float() / s).to(weight.dtype))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.data.copy_((bias.float() / s).to(bias.dtype))
    for lin in layers:
        lin.weight.data.copy_((lin.weight.float() * s[None, :]).to(lin.weight.dtype))


@torch.no_grad()
def search_clip(weight: Tensor, x: Tensor, bits: int, group_size: int, symmetric: bool = False,
                n_grid: int = 20, max_shrink: float = 0.5, n_tokens: int = 512,
                rows_per_batch: int = 64) -> Tensor:
    """Per-(row, group) clipping thresholds for ``weight`` (AWQ's clip search).

    Args:
        weight: float ``[N, K]`` (already scaled).
        x: its input tokens ``[..., K]``; ``n_tokens`` of them, evenly strided,
            are used.
        bits, group_size, symmetric: the target grid.
        n_grid, max_shrink: candidates ``max_val = (1 - i / n_grid) * max|w|`` for
            ``0 <= i < max_shrink * n_grid``.
        rows_per_batch: output rows processed at once (bounds memory to about
            ``rows_per_batch * K * n_tokens`` floats).

    Returns:
        float32 ``[N, ceil(K/G)]`` ``max_val``; clamp each group to ``[-max_val, max_val]``.
    """
    check_bits(bits)
    check_group_size(group_size)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"clip search: input has {x.shape[-1]} features, weight is [{N}, {K}]")
    x = x.reshape(-1, K)
    step = max(1, x.shape[0] // n_tokens)
    x = x[::step][:n_tokens].float()
    groups = num_groups(K, group_size)
    # Tokens as [groups, G, T]; zero padding of a ragged group adds nothing.
    xg = _grouped(x, group_size).permute(1, 2, 0).contiguous()
    wg_all = _grouped(weight, group_size)  # [N, groups, G]
    qmax = (1 << bits) - 1
    best_max = torch.empty(N, groups, dtype=torch.float32, device=weight.device)
    n_steps = max(1, int(max_shrink * n_grid))
    for r0 in range(0, N, rows_per_batch):
        w = wg_all[r0:r0 + rows_per_batch]  # [n, groups, G]
        reference = torch.einsum("ngk,gkt->ngt", w, xg)
        org_max = w.abs().amax(-1, keepdim=True)  # [n, groups, 1]
        best_err = torch.full(w.shape[:2], float("inf"), device=w.device)
        best = org_max.squeeze(-1).clone()
        for i in range(n_steps):
            max_val = org_max * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(w, max_val), -max_val)
            s, z = grid_params_from_range(clipped.amin(-1), clipped.amax(-1), bits, symmetric)
            s = s.unsqueeze(-1)
            z = float(1 << (bits - 1)) if z is None else z.unsqueeze(-1)
            wq = ((torch.round(clipped / s) + z).clamp_(0, qmax) - z) * s
            err = (torch.einsum("ngk,gkt->ngt", wq, xg) - reference).square_().mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, max_val.squeeze(-1), best)
        best_max[r0:r0 + rows_per_batch] = best
    return best_max


def clip_weight(weight: Tensor, max_val: Tensor, group_size: int) -> Tensor:
    """``clamp(weight, -max_val, max_val)`` per (row, group); returns a new tensor
    in ``weight.dtype``. ``max_val`` is ``[N, ceil(K/G)]``."""
    N, K = weight.shape
    G = effective_group_size(group_size, K)
    m = max_val.float().repeat_interleave(G, dim=1)[:, :K]
    if m.shape != weight.shape:
        raise ValueError(f"max_val {tuple(max_val.shape)} does not match weight "
                         f"{tuple(weight.shape)} with group_size={group_size}")
    w = weight.float()
    return torch.maximum(torch.minimum(w, m), -m).to(weight.dtype)


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: Tensor, group_size: int) -> None:
    """Clamp ``linear.weight`` in place per (row, group) to ``[-max_val, max_val]``."""
    linear.weight.data.copy_(clip_weight(linear.weight.data, max_val, group_size))


def llama_scaling_groups(layer: nn.Module, layer_kwargs: dict, batch_size: int = 1
                         ) -> list[ScalingGroup]:
    """The AWQ scaling groups of a transformers Llama-family decoder layer.

    ``layer_kwargs`` are the keyword arguments the decoder layer receives
    (``position_embeddings``, ``attention_mask``, ...); the attention block is run
    with them, ``batch_size`` sequences at a time. Input keys: ``attn_in`` (input
    of q/k/v), ``o_in``, ``mlp_in`` (gate/up), ``down_in``.
    """
    attn, mlp = layer.self_attn, layer.mlp

    def batched(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:
            return torch.cat([fn(x[b:b + batch_size]) for b in range(0, x.shape[0], batch_size)])
        return run

    def attn_block(x: Tensor) -> Tensor:
        out = attn(hidden_states=x, **layer_kwargs)
        return out[0] if isinstance(out, tuple) else out

    groups = [
        ScalingGroup("input_layernorm", layer.input_layernorm,
                     ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                     [attn.q_proj, attn.k_proj, attn.v_proj], batched(attn_block), "attn_in"),
    ]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScalingGroup("self_attn.v_proj", attn.v_proj, ["self_attn.o_proj"],
                                   [attn.o_proj], attn.o_proj, "o_in"))
    groups.append(ScalingGroup("post_attention_layernorm", layer.post_attention_layernorm,
                               ["mlp.gate_proj", "mlp.up_proj"], [mlp.gate_proj, mlp.up_proj],
                               batched(mlp), "mlp_in"))
    groups.append(ScalingGroup("mlp.up_proj", mlp.up_proj, ["mlp.down_proj"], [mlp.down_proj],
                               mlp.down_proj, "down_in"))
    return groups


# Linears whose clipping AWQ skips: q/k outputs only meet through softmax(q k^T),
# so a per-linear output MSE is the wrong objective for them.
NO_CLIP = ("q_proj", "k_proj")


@torch.no_grad()
def awq_layer(layer: nn.Module, inputs: dict[str, Tensor], layer_kwargs: dict, bits: int,
              group_size: int, symmetric: bool = False, n_grid: int = 20, clip: bool = True,
              max_shrink: float = 0.5, clip_tokens: int = 512, search_samples: int | None = None,
              batch_size: int = 1, progress: Callable[[str], None] | None = None
              ) -> AWQLayerResult:
    """Run both AWQ searches on one Llama decoder layer and fold the scales in.

    Args:
        layer: a transformers Llama-family decoder layer; modified in place: norm
            weights and linear weights are rescaled (FP-exact). Clipping is *not*
            applied to the layer: the thresholds are returned (see the module
            docstring on ``W_ref``); use :func:`clip_weight`/:func:`apply_clip`.
        inputs: captured FP activations ``[batch, seq, K]`` under the keys
            ``attn_in``, ``o_in``, ``mlp_in``, ``down_in``; on return they are
            divided by the folded scales (the inputs the scaled layer sees).
        layer_kwargs: the decoder layer's keyword arguments (rotary
            ``position_embeddings``, ``attention_mask``, ...).
        bits, group_size, symmetric: the target grid.
        n_grid: alphas in the scale search; clip candidates per ``1/n_grid`` step.
        clip: run the clip search.
        max_shrink, clip_tokens: clip search range and token subsample.
        search_samples: use only the first this many sequences for the scale
            search losses (``mean|x|`` always uses all); None = all.
        batch_size: sequences per block call.
        progress: optional callback receiving a short status string.
    """
    check_bits(bits)
    check_group_size(group_size)
    missing = {"attn_in", "o_in", "mlp_in", "down_in"} - set(inputs)
    if missing:
        raise ValueError(f"awq_layer: captured inputs missing {sorted(missing)}")
    groups = llama_scaling_groups(layer, layer_kwargs, batch_size)
    found: list[tuple[ScalingGroup, AWQScale]] = []
    for g in groups:
        if progress:
            progress(f"scale {g.prev_name}")
        x = inputs[g.input_key]
        x_search = x if search_samples is None else x[:search_samples]
        s, alpha, loss, loss0 = search_scale(
            x_search, g.layers, g.block, bits, group_size, symmetric, n_grid,
            x_mean=activation_scales(x), name=g.prev_name)
        found.append((g, AWQScale(g.prev_name, g.layer_names, s.cpu(), alpha, loss, loss0)))
    # All searches ran on the unscaled layer (folding is FP-exact, so each one saw
    # the same function); now fold them in and rescale the captured inputs.
    for g, result in found:
        s = result.scales.to(inputs[g.input_key].device)
        apply_scale(g.prev, g.layers, s, g.prev_name)
        x = inputs[g.input_key]
        inputs[g.input_key] = (x.float() / s).to(x.dtype)
    clips: dict[str, Tensor] = {}
    if clip:
        linear_inputs = {
            "self_attn.v_proj": "attn_in", "self_attn.o_proj": "o_in",
            "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in",
        }
        for name, key in linear_inputs.items():
            if progress:
                progress(f"clip {name}")
            lin = layer.get_submodule(name)
            clips[name] = search_clip(lin.weight.data, inputs[key], bits, group_size, symmetric,
                                      n_grid, max_shrink, clip_tokens).cpu()
    return AWQLayerResult([r for _, r in found], clips)
