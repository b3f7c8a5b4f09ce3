"""The layer-streaming pipeline on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from qdec.patch import patch
from qdec.quant import quantize_model, quantize_rtn
from qdec.quant.pipeline import (LINEAR_INPUTS, capture_layer_inputs, capture_linear_inputs,
                                 output_error, output_errors)
from qdec.reference import residual_rows_ref

from test_quant_awq import calib, tiny_llama

NAMES = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEAR_INPUTS]


@pytest.fixture(scope="module")
def ids():
    return calib(n=4, seq=32)


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq"])
def test_pipeline_results(method, ids):
    model = tiny_llama()
    with torch.no_grad():
        ref = model(ids).logits
    res = quantize_model(model, method, 3, 32, calib_ids=ids, progress=False,
                         awq_n_grid=5)
    assert list(res.linears) == NAMES
    for name, r in res.linears.items():
        lin = model.get_submodule(name)
        N, K = lin.weight.shape
        assert r.weight.codes.shape == (N, K) and r.weight.scales.shape == (N, -(-K // 32))
        assert r.residual.shape == (K, -(-N // 32) * 4) and r.residual_scales.shape == (N,)
        assert 0 < r.rel_error < 0.2 and r.rel_error_full_residual < r.rel_error / 4
        assert r.weight_bytes == r.weight.nbytes() and r.residual_bytes == r.residual.numel() * 4 + N * 4
        # The residual store holds W_ref - W_hat (W_ref = the model's weight now) on
        # its per-row grid.
        resid = residual_rows_ref(r.residual, r.residual_scales, 4).t()
        true = lin.weight.detach().float() - r.weight.dequantize(torch.float32)
        s = r.residual_scales[:, None]
        torch.testing.assert_close(resid, torch.round(true / s).clamp(-7, 7) * s)
    with torch.no_grad():
        # RTN/GPTQ leave the model alone; AWQ rescales it FP-exactly.
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    if method == "awq":
        assert len(res.norm_weights) == 4 and len(res.awq) == 2
        for name, w in res.norm_weights.items():
            assert torch.equal(model.get_submodule(name.removesuffix(".weight")).weight, w)
        assert res.linears["model.layers.0.self_attn.q_proj"].clip is None
        assert res.linears["model.layers.0.mlp.down_proj"].clip.shape == (64, 5)
    else:
        assert not res.norm_weights and not res.awq
    assert method in res.summary()


def test_layer0_error_matches_direct_measurement(ids):
    model = tiny_llama()
    res = quantize_model(model, "rtn", 3, 32, calib_ids=ids, progress=False)
    hidden, kwargs = capture_layer_inputs(model, ids)
    inputs, _ = capture_linear_inputs(model.model.layers[0], hidden, kwargs)
    w = model.model.layers[0].mlp.down_proj.weight
    direct = output_error(inputs["down_in"], w, quantize_rtn(w, 3, 32).dequantize(torch.float32))
    assert res.linears["model.layers.0.mlp.down_proj"].rel_error == pytest.approx(direct, rel=1e-6)


def test_gptq_beats_rtn_on_layer0(ids):
    errs = {}
    for method in ("rtn", "gptq"):
        res = quantize_model(tiny_llama(), method, 3, 32, calib_ids=ids, progress=False,
                             layers=[0])
        assert len(res.linears) == 7
        errs[method] = [r.rel_error for r in res.linears.values()]
    assert all(g <= r for g, r in zip(errs["gptq"], errs["rtn"]))


def test_awq_not_worse_than_rtn_in_median(ids):
    med = {}
    for method in ("rtn", "awq"):
        res = quantize_model(tiny_llama(), method, 3, 32, calib_ids=ids, progress=False,
                             propagate="fp", awq_n_grid=10)
        med[method] = torch.tensor(list(res.rel_errors().values())).median().item()
    assert med["awq"] <= med["rtn"] * 1.02


def test_patch_with_results(ids):
    model = tiny_llama()
    res = quantize_model(model, "gptq", 4, 32, symmetric=True, calib_ids=ids, progress=False,
                         gptq_act_order=True, propagate="fp")
    with torch.no_grad():
        ref = model(ids).logits
        patch(model, res.packed(), k=1.0)  # compensate every channel: ~FP output
        full = model(ids).logits
        patch_err = (full - ref).abs().max().item()
    assert patch_err < 0.05 * ref.abs().max().item()


def test_rtn_without_calibration():
    res = quantize_model(tiny_llama(), "rtn", 2, -1, progress=False, residual_bits=None)
    r = res.linears["model.layers.1.mlp.up_proj"]
    assert r.residual is None and r.residual_bytes == 0
    assert r.rel_error != r.rel_error  # NaN: no calibration data


def test_errors(ids):
    model = tiny_llama()
    with pytest.raises(ValueError, match="method"):
        quantize_model(model, "squeeze", 3, 32, calib_ids=ids)
    with pytest.raises(ValueError, match="needs calib_ids"):
        quantize_model(model, "gptq", 3, 32)
    with pytest.raises(ValueError, match="int64"):
        quantize_model(model, "awq", 3, 32, calib_ids=ids.int())
    with pytest.raises(ValueError, match=r"layers \[5\] out of range"):
        quantize_model(model, "rtn", 3, 32, calib_ids=ids, layers=[5])
    with pytest.raises(ValueError, match="residual_bits"):
        quantize_model(model, "rtn", 3, 32, calib_ids=ids, residual_bits=1)
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(model, "rtn", 3, 100, calib_ids=ids)
    with pytest.raises(ValueError, match="propagate"):
        quantize_model(model, "rtn", 3, 32, calib_ids=ids, propagate="both")
    with pytest.raises(ValueError, match="decoder stack"):
        quantize_model(torch.nn.Linear(3, 3), "rtn", 3, 32)


def test_output_errors_gram_equals_direct():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 40, generator=g) * torch.exp(torch.randn(40, generator=g))
    w = torch.randn(24, 40, generator=g)
    hats = [w + 0.1 * torch.randn(24, 40, generator=g), quantize_rtn(w, 2, 32).dequantize()]
    direct = output_errors(x, w, hats, tokens_per_chunk=7)
    flat = x.reshape(-1, 40)
    via_gram = output_errors(None, w, hats, gram=flat.t() @ flat)
    assert direct == pytest.approx(via_gram, rel=1e-4)
    manual = ((flat @ (w - hats[0]).t()).square().sum() / (flat @ w.t()).square().sum()).item()
    assert direct[0] == pytest.approx(manual, rel=1e-5)


@pytest.mark.parametrize("method,kwargs", [("rtn", {}), ("awq", {"awq_n_grid": 5}),
                                           ("gptq", {"gptq_act_order": True})])
def test_input_abs_mean_is_the_static_statistic(method, kwargs, ids):
    """The propagated run's mean |x| per linear equals what
    static_channels_from_calibration measures on the patched model (k = 0), so
    qdec eval can rank static channels without a second calibration pass."""
    from qdec.patch import (InputAbsSums, configure, qdec_layers, set_static_rankings,
                            static_channels_from_calibration)

    model = tiny_llama()
    res = quantize_model(model, method, 3, 32, calib_ids=ids, progress=False, **kwargs)
    assert list(res.input_abs_mean) == NAMES
    patch(model, res.packed(), k=0)
    configure(model, simulate_dense=True, compensate_prefill=True)
    measured = InputAbsSums()
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: measured.add(n, a[0]))
             for n, m in qdec_layers(model)]
    with torch.no_grad():
        for row in ids:
            model.get_decoder()(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    for name, mean in measured.means().items():
        if method == "gptq":  # act-order: W_hat's columns permuted, sums in another order
            torch.testing.assert_close(res.input_abs_mean[name], mean, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(res.input_abs_mean[name], mean), name
    if method != "gptq":
        from_pipeline = set_static_rankings(model, res.input_abs_mean)
        from_pass = static_channels_from_calibration(model, ids)
        assert all(torch.equal(from_pipeline[n], from_pass[n]) for n in NAMES)
    fp = quantize_model(tiny_llama(), method, 3, 32, calib_ids=ids, progress=False,
                        propagate="fp", **kwargs)
    assert fp.input_abs_mean == {}
