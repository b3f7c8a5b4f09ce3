"""AutoAWQ gemm checkpoints: hand-computed words, lossless conversion, config parsing,
directory round trips (qdec.formats.autoawq)."""

from __future__ import annotations

import json

import pytest
import torch

from qdec.formats import FormatError, read_qdec_checkpoint, save_safetensors
from qdec.formats.autoawq import (
    awq_to_quantized_weight,
    dequantize_awq,
    pack_awq,
    parse_awq_config,
    quantized_weight_to_awq,
    read_autoawq_checkpoint,
    unpack_awq,
    write_autoawq_checkpoint,
)
from qdec.quant.grid import QuantizedWeight
from qdec.reference import dequantize_ref


def signed(word: int) -> int:
    """An unsigned 32-bit pattern as the int32 value torch stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


def random_awq(K: int, N: int, G: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-K // G)
    q = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(0, 16, (groups, N), generator=g)
    s = ((torch.rand(groups, N, generator=g) + 0.5) * 0.01).half()
    return pack_awq(q), pack_awq(z), s


def test_hand_computed_word():
    # Columns 0..7 hold 1..8; nibble i holds column ORDER[i] = [0,2,4,6,1,3,5,7],
    # i.e. nibbles (low to high) 1,3,5,7,2,4,6,8 -> 0x86427531.
    word = pack_awq(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))
    assert word.dtype == torch.int32 and word.tolist() == [[signed(0x86427531)]]
    assert unpack_awq(word).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    # Column 1 alone (value 15) sits in nibble 4: bits 16..19.
    one = torch.zeros(1, 8, dtype=torch.int64)
    one[0, 1] = 15
    assert pack_awq(one).item() == 0x000F0000


def test_hand_computed_dequantization():
    # K=64, N=8, G=32: row 0 codes 1..8, all other codes 8; zeros 8 in group 0 and
    # 0x8 in every column of group 1 except column 3 (zero 2); scales 0.5 / 0.25.
    K, N, G = 64, 8, 32
    q = torch.full((K, N), 8)
    q[0] = torch.arange(1, 9)
    z = torch.full((2, N), 8)
    z[1, 3] = 2
    qweight, qzeros = pack_awq(q), pack_awq(z)
    assert qzeros[0].item() == signed(0x88888888)
    # column 3 sits in nibble 5 (ORDER[5] = 3): 0x88288888
    assert qzeros[1].item() == signed(0x88288888)
    scales = torch.tensor([[0.5] * N, [0.25] * N], dtype=torch.float16)
    w = awq_to_quantized_weight(qweight, qzeros, scales, G)
    deq = dequantize_ref(w.pack(), w.scales, w.zeros, w.bits, w.group_size, K)  # [N, K]
    assert deq[:, 0].tolist() == [(c - 8) * 0.5 for c in range(1, 9)]
    assert deq[3, 32:].tolist() == [(8 - 2) * 0.25] * 32
    assert deq[2, 40].item() == 0.0


@pytest.mark.parametrize("K, N, G", [(64, 16, 32), (256, 24, 128), (96, 8, -1), (128, 8, 128)])
def test_lossless_both_ways(K, N, G):
    qweight, qzeros, scales = random_awq(K, N, K if G == -1 else G, seed=K + N)
    w = awq_to_quantized_weight(qweight, qzeros, scales, G)
    assert w.codes.shape == (N, K) and w.scales.dtype == torch.float16
    assert w.zeros.dtype == torch.float16
    assert w.group_size == (-1 if G in (-1, K) else G)
    # The project's dequantization equals AutoAWQ's own formula, bit for bit.
    ref = dequantize_ref(w.pack(), w.scales, w.zeros, 4, w.group_size, K)
    assert torch.equal(ref, dequantize_awq(qweight, qzeros, scales, G))
    assert torch.equal(ref, w.dequantize())
    back = quantized_weight_to_awq(w)
    assert torch.equal(back["qweight"], qweight)
    assert torch.equal(back["qzeros"], qzeros)
    assert torch.equal(back["scales"], scales)
    again = awq_to_quantized_weight(back["qweight"], back["qzeros"], back["scales"], G)
    assert torch.equal(again.codes, w.codes) and torch.equal(again.zeros, w.zeros)


def test_symmetric_project_weight_gets_zero_point_8():
    g = torch.Generator().manual_seed(1)
    w = QuantizedWeight(torch.randint(0, 16, (8, 64), generator=g, dtype=torch.uint8),
                        torch.rand(8, 2, generator=g).half(), None, 4, 32, 64)
    t = quantized_weight_to_awq(w)
    assert (unpack_awq(t["qzeros"]) == 8).all()
    assert torch.equal(dequantize_awq(t["qweight"], t["qzeros"], t["scales"], 32), w.dequantize())


def test_writer_refusals():
    codes = torch.zeros(8, 64, dtype=torch.uint8)
    s = torch.ones(8, 2, dtype=torch.float16)
    with pytest.raises(FormatError, match="4-bit weights only, got bits=3"):
        quantized_weight_to_awq(QuantizedWeight(codes, s, None, 3, 32, 64))
    with pytest.raises(FormatError, match="out_features % 8"):
        quantized_weight_to_awq(QuantizedWeight(torch.zeros(4, 64, dtype=torch.uint8),
                                                s[:4], None, 4, 32, 64))
    with pytest.raises(FormatError, match="integers in 0..15"):
        quantized_weight_to_awq(QuantizedWeight(codes, s, torch.full_like(s, 2.5), 4, 32, 64))
    with pytest.raises(FormatError, match="not exactly representable in float16"):
        quantized_weight_to_awq(QuantizedWeight(codes, torch.full((8, 2), 0.1), None, 4, 32, 64))
    with pytest.raises(FormatError, match="in_features % group_size"):
        quantized_weight_to_awq(QuantizedWeight(torch.zeros(8, 96, dtype=torch.uint8),
                                                torch.ones(8, 2, dtype=torch.float16), None, 4,
                                                64, 96))


def test_reader_shape_and_dtype_errors():
    qweight, qzeros, scales = random_awq(64, 8, 32)
    with pytest.raises(FormatError, match=r"ckpt: tensor l0\.scales is torch.float32"):
        awq_to_quantized_weight(qweight, qzeros, scales.float(), 32, name="l0", source="ckpt")
    with pytest.raises(FormatError, match=r"tensor l0\.qzeros .* expected int32 \[2, 1\]"):
        awq_to_quantized_weight(qweight, qzeros[:1], scales, 32, name="l0")
    with pytest.raises(FormatError, match="group size 16 is not supported"):
        awq_to_quantized_weight(qweight, *random_awq(64, 8, 16)[1:], 16)


def test_config_parsing():
    base = {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4,
            "version": "gemm"}
    assert parse_awq_config({"quantization_config": base}).group_size == 128
    syn = {"quant_method": "AWQ", "w_bit": 4, "q_group_size": 64, "version": "GEMM"}
    cfg = parse_awq_config(syn)
    assert (cfg.bits, cfg.group_size, cfg.zero_point) == (4, 64, True)
    with pytest.raises(FormatError, match="4-bit only"):
        parse_awq_config({**base, "bits": 3})
    with pytest.raises(FormatError, match="version 'gemv' is not supported"):
        parse_awq_config({**base, "version": "gemv"})
    with pytest.raises(FormatError, match="expected 'awq'"):
        parse_awq_config({**base, "quant_method": "gptq"})
    with pytest.raises(FormatError, match="conflicting"):
        parse_awq_config({**base, "w_bit": 8})


def test_checkpoint_round_trip_and_conversion_to_qdec(tmp_path):
    K, N, G = 64, 16, 32
    qweight, qzeros, scales = random_awq(K, N, G, seed=3)
    tensors = {"model.layers.0.mlp.up_proj.qweight": qweight,
               "model.layers.0.mlp.up_proj.qzeros": qzeros,
               "model.layers.0.mlp.up_proj.scales": scales,
               "model.layers.0.mlp.up_proj.bias": torch.ones(N, dtype=torch.float16),
               "model.norm.weight": torch.ones(K, dtype=torch.float16)}
    src = tmp_path / "awq"
    src.mkdir()
    save_safetensors(tensors, src / "model.safetensors")
    hf = {"model_type": "llama", "hidden_size": K,
          "quantization_config": {"quant_method": "awq", "zero_point": True,
                                  "q_group_size": G, "w_bit": 4, "version": "gemm"}}
    (src / "config.json").write_text(json.dumps(hf))

    ck = read_autoawq_checkpoint(src)
    assert ck.format == "autoawq-gemm"
    assert list(ck.linears) == ["model.layers.0.mlp.up_proj"]
    assert sorted(ck.tensors) == ["model.layers.0.mlp.up_proj.bias", "model.norm.weight"]
    lin = ck.linears["model.layers.0.mlp.up_proj"]
    expected = dequantize_awq(qweight, qzeros, scales, G)
    assert torch.equal(dequantize_ref(lin.qweight, lin.scales, lin.zeros, 4, G, K), expected)

    # AWQ -> AWQ through the project layout: identical tensors.
    out = write_autoawq_checkpoint(tmp_path / "awq2", ck.linears, ck.tensors, ck.hf_config)
    again = read_autoawq_checkpoint(out)
    for suffix in ("qweight", "qzeros", "scales"):
        from safetensors.torch import load_file
        written = load_file(str(out / "model.safetensors"))
        assert torch.equal(written[f"model.layers.0.mlp.up_proj.{suffix}"],
                           tensors[f"model.layers.0.mlp.up_proj.{suffix}"])
    assert torch.equal(again.linears["model.layers.0.mlp.up_proj"].qweight, lin.qweight)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["version"]) == (4, G, "gemm")

    # AWQ -> QDEC checkpoint.
    qd = ck.write(tmp_path / "qdec")
    back = read_qdec_checkpoint(qd)
    assert back.qdec["method"] == "autoawq-gemm"
    assert back.config["quantization_config"]["quant_method"] == "qdec"
    assert back.qdec["source"]["quantization_config"]["quant_method"] == "awq"
    w = back.linears["model.layers.0.mlp.up_proj"]
    assert torch.equal(dequantize_ref(w.qweight, w.scales, w.zeros, 4, G, K), expected)
    assert torch.equal(back.tensors["model.layers.0.mlp.up_proj.bias"],
                       tensors["model.layers.0.mlp.up_proj.bias"])


def test_checkpoint_missing_tensor(tmp_path):
    qweight, qzeros, scales = random_awq(64, 8, 32)
    save_safetensors({"l.qweight": qweight, "l.scales": scales}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}}))
    with pytest.raises(FormatError, match="missing tensor 'l.qzeros'"):
        read_autoawq_checkpoint(tmp_path)
