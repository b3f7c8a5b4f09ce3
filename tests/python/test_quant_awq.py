"""AWQ: scale folding is FP-exact, the searches never do worse than no
scaling/clipping, and salient input channels are protected."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qdec.quant import apply_scale, fake_quantize, quantize_rtn, search_clip, search_scale
from qdec.quant.awq import awq_layer, clip_weight, llama_scaling_groups, scales_for_alpha
from qdec.quant.pipeline import capture_layer_inputs, capture_linear_inputs


def tiny_llama(kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=128,
                      max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, as in a trained model
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


def calib(n=3, seq=24, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (no v->o group) and MHA (v->o)
def test_scale_folding_keeps_fp_output(kv_heads):
    model = tiny_llama(kv_heads)
    ids = calib()
    with torch.no_grad():
        ref = model(ids).logits
        hidden, kwargs = capture_layer_inputs(model, ids)
        for layer in model.model.layers:
            groups = llama_scaling_groups(layer, kwargs)
            names = [g.prev_name for g in groups]
            assert ("self_attn.v_proj" in names) == (kv_heads == 4)
            for g in groups:
                s = torch.exp(torch.randn(g.layers[0].in_features))  # wild scales
                apply_scale(g.prev, g.layers, s, g.prev_name)
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_awq_layer_keeps_fp_output_and_rescales_inputs(kv_heads):
    model = tiny_llama(kv_heads)
    ids = calib()
    with torch.no_grad():
        ref = model(ids).logits
        hidden, kwargs = capture_layer_inputs(model, ids)
        layer = model.model.layers[0]
        inputs, _ = capture_linear_inputs(layer, hidden, kwargs)
        result = awq_layer(layer, inputs, kwargs, 3, 32, n_grid=10)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        fresh, _ = capture_linear_inputs(layer, hidden, kwargs)
    for key in inputs:  # the returned inputs are what the scaled layer sees
        torch.testing.assert_close(inputs[key], fresh[key], rtol=1e-4, atol=1e-5)
    assert len(result.scales) == (4 if kv_heads == 4 else 3)
    for sc in result.scales:
        assert 0 <= sc.alpha < 1 and sc.loss <= sc.loss_unscaled
        assert sc.scales.dtype == torch.float32 and (sc.scales > 0).all()
    assert set(result.clips) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                 "mlp.up_proj", "mlp.down_proj"}  # not q, k
    down = layer.mlp.down_proj.weight
    assert result.clips["mlp.down_proj"].shape == (64, 5)  # K=160, G=32
    assert (result.clips["mlp.down_proj"] <= down.abs().reshape(64, 5, 32).amax(-1) + 1e-7).all()


def test_scales_for_alpha_normalised():
    x_mean = torch.rand(50) + 0.01
    assert torch.equal(scales_for_alpha(x_mean, 0.0), torch.ones(50))
    s = scales_for_alpha(x_mean, 0.7)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))


def _salient_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 256, 128, generator=g)
    x[..., :4] *= 30  # a few salient channels, as in LLM activations
    lin = nn.Linear(128, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 128, generator=g) * 0.02)
    return lin, x


def test_scale_search_protects_salient_channels():
    lin, x = _salient_layer()
    w = lin.weight.detach().clone()
    s, alpha, loss, loss0 = search_scale(x, [lin], lin, 3, 64)
    assert torch.equal(lin.weight, w)  # restored
    assert alpha > 0 and loss < 0.7 * loss0
    # The winning scale, folded, beats plain RTN on the layer output.
    xs = x.reshape(-1, 128)
    awq_w = fake_quantize(w * s, 3, 64) / s
    rtn_w = quantize_rtn(w, 3, 64).dequantize(torch.float32)
    assert ((xs @ (w - awq_w).t()).square().sum() < (xs @ (w - rtn_w).t()).square().sum())


@pytest.mark.parametrize("group_size", [32, -1])
def test_clip_search_not_worse_than_no_clip(group_size):
    lin, x = _salient_layer(1)
    w = lin.weight.detach()
    w[:, 7] *= 6  # an outlier weight column makes clipping worthwhile
    max_val = search_clip(w, x, 3, group_size, n_tokens=512)
    groups = 4 if group_size == 32 else 1
    assert max_val.shape == (96, groups)
    xs = x.reshape(-1, 128)

    def err(wq):
        return (xs @ (w - wq).t()).square().sum().item()
    clipped = fake_quantize(clip_weight(w, max_val, group_size), 3, group_size)
    assert err(clipped) <= err(fake_quantize(w, 3, group_size))


def test_clip_weight_ragged_and_checks():
    w = torch.randn(4, 100)
    m = torch.full((4, 4), 0.5)
    c = clip_weight(w, m, 32)
    assert c.abs().max() <= 0.5 and torch.equal(c[w.abs() <= 0.5], w[w.abs() <= 0.5])
    with pytest.raises(ValueError, match="max_val"):
        clip_weight(w, torch.ones(4, 3), 32)


def test_apply_scale_errors():
    norm = nn.LayerNorm(16)
    with pytest.raises(ValueError, match="producer"):
        apply_scale(nn.LayerNorm(8), [nn.Linear(16, 4)], torch.ones(16), "input_layernorm")
    with pytest.raises(ValueError, match="consumer"):
        apply_scale(norm, [nn.Linear(8, 4)], torch.ones(16), "input_layernorm")
    with pytest.raises(ValueError, match="producer linear"):
        apply_scale(nn.Linear(4, 8), [nn.Linear(16, 4)], torch.ones(16), "mlp.up_proj")
