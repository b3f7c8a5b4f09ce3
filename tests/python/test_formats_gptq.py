"""GPTQ checkpoints: hand-computed packing (3-bit straddling), v1/v2 zero points,
act-order g_idx, round trips at 2/3/4/8 bits (qdec.formats.gptq) and OmniQuant
real-quant files (qdec.formats.omniquant)."""

from __future__ import annotations

import json

import pytest
import torch

from qdec.formats import FormatError, save_safetensors
from qdec.formats.gptq import (
    GPTQConfig,
    dequantize_gptq,
    gptq_to_quantized_weight,
    pack_gptq_qweight,
    pack_gptq_words,
    parse_gptq_config,
    quantized_weight_to_gptq,
    read_gptq_checkpoint,
    resolve_zero_convention,
    unpack_gptq_qweight,
    unpack_gptq_words,
    write_gptq_checkpoint,
)
from qdec.formats.omniquant import read_omniquant_real_checkpoint
from qdec.quant.grid import QuantizedWeight
from qdec.reference import dequantize_ref


def signed(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def random_weight(N: int, K: int, bits: int, G: int, symmetric: bool = False,
                  zero_range: tuple[int, int] | None = None, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = 1 if G == -1 else -(-K // G)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8)
    scales = ((torch.rand(N, groups, generator=g) + 0.5) * 0.01).half()
    lo, hi = zero_range or (0, (1 << bits) - 1)
    zeros = None if symmetric else torch.randint(lo, hi + 1, (N, groups), generator=g).half()
    return QuantizedWeight(codes, scales, zeros, bits, G, K)


# --- hand-computed packing -------------------------------------------------------------


def test_3bit_straddling_words_by_hand():
    # Value 10 = 0b101: low bits 01 -> bits 30-31 of word 0, high bit 1 -> bit 0 of
    # word 1. Value 21 = 0b111: low bit 1 -> bit 31 of word 1, high bits 11 -> bits
    # 0-1 of word 2.
    v = torch.zeros(1, 32, dtype=torch.int64)
    v[0, 10], v[0, 21] = 5, 7
    words = pack_gptq_words(v, 3)
    assert words.tolist() == [[0x40000000, signed(0x80000001), 0x3]]
    assert unpack_gptq_words(words, 3, 32).tolist() == v.tolist()
    # Values 0..9 fill bits 0..29 of word 0; value 11 starts at bit 1 of word 1;
    # value 22 starts at bit 2 of word 2.
    v = torch.zeros(1, 32, dtype=torch.int64)
    v[0, 0], v[0, 9], v[0, 11], v[0, 22], v[0, 31] = 1, 7, 3, 2, 4
    w = pack_gptq_words(v, 3)[0].tolist()
    assert w[0] == 1 | (7 << 27)
    assert w[1] == 3 << 1
    assert w[2] == signed((2 << 2) | (4 << 29))


def test_qweight_is_packed_along_k_by_hand():
    # 4-bit: K=8 rows of column 0 hold 1..8 -> one word 0x87654321 (LSB first);
    # column 1 holds 15 in row 7 only -> 0xF0000000.
    codes = torch.zeros(2, 8, dtype=torch.uint8)  # [N, K]
    codes[0] = torch.arange(1, 9)
    codes[1, 7] = 15
    q = pack_gptq_qweight(codes, 4)
    assert q.shape == (1, 2)
    assert q.tolist() == [[signed(0x87654321), signed(0xF0000000)]]
    # 2-bit: 16 values per word; 8-bit: 4 per word.
    c2 = torch.tensor([[3] + [0] * 14 + [1]], dtype=torch.uint8)
    assert pack_gptq_qweight(c2, 2).tolist() == [[3 | (1 << 30)]]
    c8 = torch.tensor([[0x12, 0x34, 0x56, 0xF8]], dtype=torch.uint8)
    assert pack_gptq_qweight(c8, 8).tolist() == [[signed(0xF8563412)]]
    assert torch.equal(unpack_gptq_qweight(pack_gptq_qweight(codes, 4), 4, 8), codes)


def test_v1_symmetric_stores_7_and_v2_stores_raw():
    K, N = 32, 8
    codes = torch.full((N, K), 9, dtype=torch.uint8)
    qweight = pack_gptq_qweight(codes, 4)
    scales = torch.full((1, N), 0.5, dtype=torch.float16)
    v1_zeros = torch.full((1, 1), signed(0x77777777), dtype=torch.int32)
    w, perm = gptq_to_quantized_weight(qweight, v1_zeros, scales, None, 4, -1, "v1")
    assert perm is None and w.zeros is None  # z = 7 + 1 = 8 everywhere: symmetric
    assert (w.dequantize() == 0.5).all()  # (9 - 8) * 0.5
    # The same bytes read as v2 mean z = 7: every weight moves by one step.
    w2, _ = gptq_to_quantized_weight(qweight, v1_zeros, scales, None, 4, -1, "v2")
    assert w2.zeros is not None and (w2.zeros == 7).all()
    assert (w2.dequantize() == 1.0).all()
    assert (dequantize_gptq(qweight, v1_zeros, scales, None, 4, "v1", -1) == 0.5).all()
    # Writing symmetric as v1 gives back 0x77777777.
    t = quantized_weight_to_gptq(w, "v1")
    assert t["qzeros"].tolist() == [[signed(0x77777777)]]
    assert quantized_weight_to_gptq(w, "v2")["qzeros"].tolist() == [[signed(0x88888888)]]


def test_v1_cannot_store_zero_point_0():
    w = random_weight(8, 64, 4, 32, zero_range=(0, 0))
    with pytest.raises(FormatError, match="z=0 is impossible; use v2"):
        quantized_weight_to_gptq(w, "v1")
    t = quantized_weight_to_gptq(w, "v2")
    assert (unpack_gptq_words(t["qzeros"], 4, 8) == 0).all()


# --- round trips -----------------------------------------------------------------------


CASES = [(bits, conv, sym) for bits in (2, 3, 4, 8) for conv in ("v1", "v2")
         for sym in (False, True)]


@pytest.mark.parametrize("bits, convention, symmetric", CASES)
def test_round_trip_all_bits(bits, convention, symmetric):
    N, K, G = 32, 128, 64
    zr = (1, (1 << bits) - 1) if convention == "v1" else None
    w = random_weight(N, K, bits, G, symmetric=symmetric, zero_range=zr, seed=bits)
    t = quantized_weight_to_gptq(w, convention)
    assert t["qweight"].shape == (K * bits // 32, N)
    assert t["qzeros"].shape == (K // G, N * bits // 32)
    assert t["scales"].shape == (K // G, N) and t["g_idx"].tolist() == [k // G for k in range(K)]
    back, perm = gptq_to_quantized_weight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"],
                                          bits, G, convention)
    assert perm is None
    assert torch.equal(back.codes, w.codes) and torch.equal(back.scales, w.scales)
    if symmetric:
        assert back.zeros is None
    else:
        assert torch.equal(back.zeros, w.zeros)
    # The project's dequantization equals GPTQ's own formula, bit for bit.
    ref = dequantize_ref(back.pack(), back.scales, back.zeros, bits, back.group_size, K)
    own = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, convention)
    assert torch.equal(ref, own)
    assert torch.equal(ref, w.dequantize())


def test_one_group_per_row_and_detect_symmetric_off():
    w = random_weight(32, 96, 3, -1, symmetric=True, seed=5)
    t = quantized_weight_to_gptq(w, "v2")
    back, _ = gptq_to_quantized_weight(t["qweight"], t["qzeros"], t["scales"], None, 3, -1,
                                       "v2", detect_symmetric=False)
    assert back.group_size == -1 and (back.zeros == 4).all()
    assert torch.equal(back.dequantize(), w.dequantize())


# --- act-order ---------------------------------------------------------------------------


def test_act_order_g_idx_becomes_an_input_permutation():
    N, K, G, bits = 32, 128, 32, 3
    g = torch.Generator().manual_seed(7)
    order = torch.randperm(K, generator=g)  # quantization order (desc_act)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[order] = (torch.arange(K) // G).to(torch.int32)  # AutoGPTQ's act-order g_idx
    codes = torch.randint(0, 8, (N, K), generator=g, dtype=torch.uint8)
    scales = ((torch.rand(K // G, N, generator=g) + 0.5) * 0.01).half()
    zeros = torch.randint(0, 8, (K // G, N), generator=g)
    qweight, qzeros = pack_gptq_qweight(codes, bits), pack_gptq_words(zeros, bits)
    own = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, "v2")  # [N, K] original order

    w, perm = gptq_to_quantized_weight(qweight, qzeros, scales, g_idx, bits, G, "v2")
    assert perm is not None and perm.dtype == torch.int64
    assert torch.equal(g_idx[perm].long(), torch.arange(K) // G)  # groups now contiguous
    deq = dequantize_ref(w.pack(), w.scales, w.zeros, bits, G, K)
    assert torch.equal(deq, own[:, perm])
    x = torch.randn(3, K, generator=g)
    assert torch.allclose(x[:, perm] @ deq.float().t(), x @ own.float().t(), atol=1e-5)

    # Writing it back reproduces the act-order tensors exactly.
    t = quantized_weight_to_gptq(w, "v2", input_permutation=perm)
    assert torch.equal(t["qweight"], qweight) and torch.equal(t["g_idx"], g_idx)
    assert torch.equal(t["qzeros"], qzeros) and torch.equal(t["scales"], scales)


def test_g_idx_that_cannot_be_permuted_is_refused():
    w = random_weight(8, 64, 4, 32)
    t = quantized_weight_to_gptq(w, "v2")
    g_idx = torch.zeros(64, dtype=torch.int32)
    g_idx[:10] = 1  # group 1 would get 10 channels, group 0 54
    with pytest.raises(FormatError, match=r"tensor l\.g_idx puts 54 channels in group 0"):
        gptq_to_quantized_weight(t["qweight"], t["qzeros"], t["scales"], g_idx, 4, 32, "v2",
                                 name="l")
    with pytest.raises(FormatError, match=r"g_idx values span \[5, 5\]; expected \[0, 1\]"):
        gptq_to_quantized_weight(t["qweight"], t["qzeros"], t["scales"],
                                 torch.full((64,), 5, dtype=torch.int32), 4, 32, "v2")


def test_shape_errors_name_the_tensor():
    w = random_weight(8, 64, 4, 32)
    t = quantized_weight_to_gptq(w, "v2")
    with pytest.raises(FormatError, match=r"dir: tensor a\.b\.scales is .* expected .*\[2, 8\]"):
        gptq_to_quantized_weight(t["qweight"], t["qzeros"], t["scales"][:1], None, 4, 32, "v2",
                                 name="a.b", source="dir")
    with pytest.raises(FormatError,
                       match=r"qzeros is torch.int32 \[2, 2\]; expected int32 \[2, 1\]"):
        gptq_to_quantized_weight(t["qweight"], torch.zeros(2, 2, dtype=torch.int32),
                                 t["scales"], None, 4, 32, "v2")
    with pytest.raises(FormatError, match="expected K=96"):
        gptq_to_quantized_weight(t["qweight"], t["qzeros"], t["scales"], None, 4, 32, "v2",
                                 in_features=96)
    with pytest.raises(FormatError, match="GPTQ bits must be one of"):
        gptq_to_quantized_weight(t["qweight"], t["qzeros"], t["scales"], None, 5, 32, "v2")


# --- zero convention resolution and configs ------------------------------------------------


def test_zero_convention_resolution():
    assert resolve_zero_convention(GPTQConfig(4, 128, checkpoint_format="gptq"), None, "c") == "v1"
    assert resolve_zero_convention(GPTQConfig(4, 128, checkpoint_format="gptq_v2"), None,
                                   "c") == "v2"
    assert resolve_zero_convention(GPTQConfig(4, 128), None, "c") == "v1"  # AutoGPTQ default
    assert resolve_zero_convention(None, "v2", "c") == "v2"
    with pytest.raises(FormatError, match="pass zero_convention='v1'"):
        resolve_zero_convention(None, None, "ckpt")
    with pytest.raises(FormatError, match="contradicts the checkpoint metadata"):
        resolve_zero_convention(GPTQConfig(4, 128, checkpoint_format="gptq"), "v2", "c")
    with pytest.raises(ValueError, match="'v1' or 'v2'"):
        resolve_zero_convention(None, "v3", "c")
    with pytest.raises(FormatError, match="checkpoint_format 'marlin' is not supported"):
        parse_gptq_config({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "c")
    with pytest.raises(FormatError, match="bits must be one of"):
        parse_gptq_config({"bits": 5, "group_size": 128}, "c")


def layer_tensors(prefix: str, t: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in t.items()}


@pytest.mark.parametrize("convention", ["v1", "v2"])
def test_checkpoint_directory_round_trip(tmp_path, convention):
    w3 = random_weight(32, 128, 3, 64, zero_range=(1, 7), seed=11)
    hf = {"model_type": "llama", "hidden_size": 128}
    out = write_gptq_checkpoint(tmp_path / "g", {"model.layers.0.self_attn.q_proj": w3},
                                {"model.layers.0.self_attn.q_proj.bias": torch.ones(32).half()},
                                hf, zero_convention=convention)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == ("gptq" if convention == "v1" else "gptq_v2")
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (3, 64, False, False)
    ck = read_gptq_checkpoint(out)
    assert ck.format == f"gptq-{convention}"
    lin = ck.linears["model.layers.0.self_attn.q_proj"]
    assert lin.input_permutation is None
    assert torch.equal(lin.qweight, w3.pack()) and torch.equal(lin.zeros, w3.zeros)
    assert list(ck.tensors) == ["model.layers.0.self_attn.q_proj.bias"]
    with pytest.raises(FormatError, match="contradicts"):
        read_gptq_checkpoint(out, zero_convention="v2" if convention == "v1" else "v1")
    with pytest.raises(FormatError, match="bits is 3; the caller passed 4"):
        read_gptq_checkpoint(out, bits=4)


def test_quantize_config_json_is_read(tmp_path):
    w = random_weight(8, 64, 4, 32, zero_range=(1, 15))
    t = quantized_weight_to_gptq(w, "v1")
    save_safetensors(layer_tensors("l", t), tmp_path / "model.safetensors")
    (tmp_path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 32, "desc_act": False, "sym": False}))
    ck = read_gptq_checkpoint(tmp_path)
    assert ck.quantization["zero_convention"] == "v1"
    assert torch.equal(ck.linears["l"].zeros, w.zeros)


def test_checkpoint_without_config_needs_the_convention(tmp_path):
    w = random_weight(16, 64, 2, 32, zero_range=(0, 3))
    out = write_gptq_checkpoint(tmp_path / "o", {"l": w}, {}, {"model_type": "llama"},
                                zero_convention="v2", write_quantization_config=False)
    with pytest.raises(FormatError, match="pass bits= and group_size="):
        read_gptq_checkpoint(out)
    with pytest.raises(FormatError, match="pass zero_convention="):
        read_gptq_checkpoint(out, bits=2, group_size=32)
    ck = read_gptq_checkpoint(out, bits=2, group_size=32, zero_convention="v2")
    assert torch.equal(ck.linears["l"].zeros, w.zeros)


def test_missing_layer_tensor(tmp_path):
    w = random_weight(8, 64, 4, 32)
    t = quantized_weight_to_gptq(w, "v2")
    del t["qzeros"]
    save_safetensors(layer_tensors("l", t), tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match="missing tensor l.qzeros"):
        read_gptq_checkpoint(tmp_path, bits=4, group_size=32, zero_convention="v2")


# --- OmniQuant real-quant = GPTQ layout with v2 zeros ---------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_omniquant_real_quant_reads_as_v2(tmp_path, bits):
    # OmniQuant zeros include 0 (all-positive groups clamp to it); v1 could not store them.
    w = random_weight(32, 128, bits, 64, zero_range=(0, (1 << bits) - 1), seed=bits)
    w.zeros[0, 0] = 0
    out = write_gptq_checkpoint(tmp_path / "omni", {"model.layers.0.mlp.down_proj": w},
                                {"model.norm.weight": torch.ones(8).half()},
                                {"model_type": "llama"}, zero_convention="v2",
                                write_quantization_config=False)
    ck = read_omniquant_real_checkpoint(out, bits, 64)
    assert ck.format == "omniquant-real" and ck.quantization["zero_convention"] == "v2"
    lin = ck.linears["model.layers.0.mlp.down_proj"]
    assert torch.equal(dequantize_ref(lin.qweight, lin.scales, lin.zeros, bits, 64, 128),
                       w.dequantize())
    # Read as v1 (an AutoGPTQ loader's assumption) every weight is one step off.
    wrong = read_omniquant_real_checkpoint(out, bits, 64, zero_convention="v1")
    lw = wrong.linears["model.layers.0.mlp.down_proj"]
    shifted = QuantizedWeight(w.codes, w.scales, w.zeros + 1, bits, 64, 128).dequantize()
    assert torch.equal(dequantize_ref(lw.qweight, lw.scales, lw.zeros, bits, 64, 128), shifted)
    assert not torch.equal(shifted, w.dequantize())
