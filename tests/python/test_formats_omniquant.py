"""OmniQuant fake-quant grid recovery (qdec.formats.omniquant.recover_grid and the
checkpoint reader). Real-quant files are tested with GPTQ (test_formats_gptq.py)."""

from __future__ import annotations

import json

import pytest
import torch

from qdec.formats import read_qdec_checkpoint, save_safetensors
from qdec.formats.omniquant import (
    read_omniquant_fake_checkpoint,
    recover_fake_quant_state_dict,
    recover_grid,
)
from qdec.reference import dequantize_ref


def omniquant_fake_quant(weight: torch.Tensor, bits: int, group_size: int,
                         compute_dtype: torch.dtype = torch.float32, lwc: float = 0.9
                         ) -> torch.Tensor:
    """OmniQuant's weight fake quantization (UniformAffineQuantizer with learned
    clipping), float16 output: s = (max - min) / (2^b - 1) after clipping,
    z = round(-min / s) *unclamped*, q = clamp(round(w / s) + z, 0, 2^b - 1)."""
    N, K = weight.shape
    G = K if group_size == -1 else group_size
    groups = -(-K // G)
    w = torch.nn.functional.pad(weight.float(), (0, groups * G - K)).reshape(N, groups, G)
    if groups * G != K:  # statistics of the ragged group over its real values only
        real = torch.zeros(groups * G, dtype=torch.bool)
        real[:K] = True
        real = real.reshape(groups, G)
        wmax = torch.where(real, w, -torch.inf).amax(-1)
        wmin = torch.where(real, w, torch.inf).amin(-1)
    else:
        wmax, wmin = w.amax(-1), w.amin(-1)
    wmax, wmin = wmax * lwc, wmin * lwc
    s = ((wmax - wmin) / ((1 << bits) - 1)).clamp(1e-5, 1e4).to(compute_dtype)
    z = torch.round(-wmin.to(compute_dtype) / s)
    q = torch.clamp(torch.round(w.to(compute_dtype) / s[..., None]) + z[..., None], 0,
                    (1 << bits) - 1)
    out = ((q - z[..., None]) * s[..., None]).to(torch.float16)
    return out.reshape(N, groups * G)[:, :K].contiguous()


def sample_weight(N: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[0, :32] = w[0, :32].abs() + 0.01  # an all-positive group: OmniQuant's zero < 0
    w[1, :32] = -w[1, :32].abs() - 0.01  # all negative: zero > 2^b - 1
    w[2] = 0.0  # an all-zero row
    w[3, :] = 0.015  # a constant row
    return w


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("K, G", [(256, 128), (320, 128), (96, -1), (256, 32)])
def test_recovers_float32_scale_grids_exactly(bits, K, G):
    w = omniquant_fake_quant(sample_weight(16, K, seed=bits + K), bits, G)
    rec = recover_grid(w, bits, G)
    assert rec.weight is not None and rec.exact and rec.failed_groups == 0, rec
    r = rec.weight
    assert r.codes.shape == (16, K) and int(r.codes.max()) < (1 << bits)
    deq = dequantize_ref(r.pack(), r.scales, r.zeros, bits, G, K).to(torch.float16)
    assert torch.equal(deq, w)
    # The float32 product (what a fused kernel uses) is within float16 rounding.
    assert rec.max_abs_error <= float(w.abs().max()) * 2**-11 + 1e-12


@pytest.mark.parametrize("bits", [3, 4])
def test_float16_computed_grid_gets_float16_scales(bits):
    w = omniquant_fake_quant(sample_weight(8, 256, seed=1), bits, 128,
                             compute_dtype=torch.float16)
    rec = recover_grid(w, bits, 128)
    assert rec.exact and rec.scale_dtype == torch.float16
    assert rec.weight.scales.dtype == torch.float16 and rec.weight.zeros.dtype == torch.float16
    assert torch.equal(rec.weight.dequantize(), w)


def test_weights_off_the_grid_fall_back_to_dense():
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(8, 256, generator=g) * 0.02).half()
    rec = recover_grid(w, 3, 128)
    assert rec.weight is None and not rec.exact and rec.failed_groups > 0
    assert "kept dense" in str(rec)
    # A 4-bit grid has too many levels for a 2-bit recovery.
    w4 = omniquant_fake_quant(sample_weight(8, 256, seed=4), 4, 128)
    assert recover_grid(w4, 2, 128).weight is None


def test_max_ulp_tolerance():
    w = omniquant_fake_quant(sample_weight(8, 128, seed=5), 3, 128)
    nudged = w.clone()
    i = (nudged[5] != 0).nonzero()[0].item()
    nudged[5, i] = torch.nextafter(nudged[5, i], torch.tensor(1.0, dtype=torch.float16))
    assert recover_grid(nudged, 3, 128).weight is None
    rec = recover_grid(nudged, 3, 128, max_ulp=1)
    assert rec.weight is not None and not rec.exact


def fake_state(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 128, generator=g).half(),
        "model.layers.0.input_layernorm.weight": torch.ones(128).half(),
        "model.layers.0.self_attn.q_proj.weight":
            omniquant_fake_quant(sample_weight(32, 128, seed), 3, 64),
        "model.layers.0.mlp.down_proj.weight": (torch.randn(16, 128, generator=g) * .02).half(),
    }


def test_state_dict_recovery_keeps_failures_dense():
    state = fake_state()
    linears, tensors, report = recover_fake_quant_state_dict(state, 3, 64)
    assert sorted(report) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    assert list(linears) == ["model.layers.0.self_attn.q_proj"]
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.weight"],
                       state["model.layers.0.mlp.down_proj.weight"])
    assert report["model.layers.0.mlp.down_proj"].weight is None


def test_fake_quant_checkpoint_to_qdec(tmp_path):
    state = fake_state(1)
    src = tmp_path / "fake"
    src.mkdir()
    save_safetensors(state, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    ck, report = read_omniquant_fake_checkpoint(src, 3, 64)
    assert ck.format == "omniquant-fake"
    assert ck.quantization["kept_dense"] == ["model.layers.0.mlp.down_proj"]
    out = ck.write(tmp_path / "qdec", method="omniquant")
    back = read_qdec_checkpoint(out)
    assert back.qdec["quantized_modules"] == ["model.layers.0.self_attn.q_proj"]
    w = back.linears["model.layers.0.self_attn.q_proj"]
    deq = dequantize_ref(w.qweight, w.scales, w.zeros, 3, 64, 128).to(torch.float16)
    assert torch.equal(deq, state["model.layers.0.self_attn.q_proj.weight"])
    assert "model.layers.0.mlp.down_proj.weight" in back.tensors
