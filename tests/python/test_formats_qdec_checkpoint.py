"""The QDEC checkpoint directory and the residual store (qdec.formats.qdec_checkpoint,
qdec.formats.residual_store): round trips, the exact on-disk layout a C++ loader
reads, atomic writing, and validation errors."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch

import qdec

from qdec.formats import (
    FormatError,
    PackedWeight,
    load_residual_store,
    qdec_checkpoint,
    read_qdec_checkpoint,
    save_quantization_result,
    save_safetensors,
    write_qdec_checkpoint,
)
from qdec.formats.qdec_checkpoint import (
    quantization_config_block,
    read_quantization_config,
    verify_qdec_checkpoint,
)
from qdec.formats.safetensors_io import SafetensorsFile
from qdec.packing import pack_codes
from qdec.quant.grid import QuantizedWeight
from qdec.reference import dequantize_ref, residual_rows_ref


def qweight(N: int, K: int, bits: int, G: int, symmetric: bool, seed: int,
            scale_dtype=torch.float16) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = 1 if G == -1 else -(-K // G)
    return QuantizedWeight(
        torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8),
        (torch.rand(N, groups, generator=g) * 0.01 + 0.001).to(scale_dtype),
        None if symmetric else torch.randint(0, 1 << bits, (N, groups), generator=g).to(
            scale_dtype), bits, G, K)


def residual(N: int, K: int, rbits: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (pack_codes(torch.randint(0, 1 << rbits, (K, N), generator=g), rbits),
            torch.rand(N, generator=g) * 1e-3)


LAYERS = {
    # name: (N, K, bits, G, symmetric)
    "model.layers.0.self_attn.q_proj": (64, 96, 3, 64, False),  # ragged last group
    "model.layers.0.self_attn.o_proj": (96, 64, 4, 32, True),
    "model.layers.0.mlp.down_proj": (40, 128, 2, -1, False),
}


def build(tmp_path, name="ckpt", with_perm=False, **kw):
    linears = {n: qweight(N, K, b, G, sym, i) for i, (n, (N, K, b, G, sym)) in
               enumerate(LAYERS.items())}
    if with_perm:
        n = "model.layers.0.mlp.down_proj"
        linears[n] = PackedWeight.from_quantized_weight(
            linears[n], torch.randperm(128, generator=torch.Generator().manual_seed(9)))
    residuals = {n: residual(N, K, 4, i) for i, (n, (N, K, *_)) in enumerate(LAYERS.items())
                 if "o_proj" not in n}  # a layer without residual is allowed
    tensors = {"model.embed_tokens.weight": torch.randn(10, 96).half(),
               "model.layers.0.input_layernorm.weight": torch.ones(96).half(),
               "model.layers.0.self_attn.q_proj.bias": torch.arange(64).half()}
    hf = {"model_type": "llama", "hidden_size": 96, "num_hidden_layers": 1,
          "quantization_config": {"quant_method": "awq", "bits": 4}}
    args = dict(hf_config=hf, linears=linears, tensors=tensors, method="gptq",
                residuals=residuals, residual_bits=4)
    args.update(kw)
    return write_qdec_checkpoint(tmp_path / name, **args), args


def test_round_trip(tmp_path):
    path, args = build(tmp_path)
    ck = read_qdec_checkpoint(path)
    assert ck.qdec["method"] == "gptq" and ck.qdec["format_version"] == 1
    assert ck.qdec["quantized_modules"] == list(LAYERS)
    assert ck.qdec["bits"] is None and ck.qdec["residual_bits"] == 4  # mixed bits -> null
    # The source's block moved to qdec.source; the new block names QDEC.
    assert ck.config["quantization_config"] == quantization_config_block(ck.qdec)
    assert ck.config["quantization_config"]["quant_method"] == "qdec"
    assert ck.qdec["source"]["quantization_config"]["quant_method"] == "awq"
    assert ck.hf_config()["hidden_size"] == 96
    for name, w in args["linears"].items():
        got = ck.linears[name]
        assert torch.equal(got.qweight, w.pack())
        assert torch.equal(got.scales, w.scales)
        assert (got.zeros is None) == (w.zeros is None)
        assert (got.bits, got.group_size, got.in_features) == (w.bits, w.group_size,
                                                                w.in_features)
        assert torch.equal(dequantize_ref(got.qweight, got.scales, got.zeros, got.bits,
                                          got.group_size, got.in_features), w.dequantize())
    assert sorted(ck.tensors) == sorted(args["tensors"])
    store = ck.residual
    assert sorted(store.layers) == sorted(args["residuals"])
    assert store.pinned == torch.cuda.is_available()
    for name, (r, s) in args["residuals"].items():
        layer = store.layers[name]
        assert torch.equal(layer.residual, r) and torch.equal(layer.scales, s) and layer.bits == 4
        assert torch.equal(residual_rows_ref(layer.residual, layer.scales, 4),
                           residual_rows_ref(r, s, 4))
    packed = ck.packed_linears()
    assert packed["model.layers.0.self_attn.o_proj"].residual is None
    assert torch.equal(packed["model.layers.0.mlp.down_proj"].residual,
                       args["residuals"]["model.layers.0.mlp.down_proj"][0])
    no_res = read_qdec_checkpoint(path, load_residual=False)
    assert no_res.residual is None


def test_on_disk_layout_for_the_cpp_loader(tmp_path):
    """Pins the documented layout: file names, tensor names, dtypes, shapes, metadata."""
    path, args = build(tmp_path, with_perm=True)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "residual.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        q = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{q}.qweight").dtype == torch.int32
        assert list(f.get_slice(f"{q}.qweight").get_shape()) == [64, 3 * 3]  # ceil(96/32)*3
        assert list(f.get_slice(f"{q}.scales").get_shape()) == [64, 2]  # ceil(96/64)
        assert f.get_tensor("model.layers.0.mlp.down_proj.input_perm").dtype == torch.int32
    assert meta["format"] == "pt"
    layers = json.loads(meta["qdec"])["layers"]
    assert layers[q] == {"bits": 3, "group_size": 64, "in_features": 96, "out_features": 64,
                         "symmetric": False, "scale_dtype": "F16", "input_permutation": False}
    assert layers["model.layers.0.mlp.down_proj"]["input_permutation"] is True
    expected = set(args["tensors"])
    for name, (N, K, b, G, sym) in LAYERS.items():
        expected |= {f"{name}.qweight", f"{name}.scales"} | (set() if sym else {f"{name}.zeros"})
    expected.add("model.layers.0.mlp.down_proj.input_perm")
    assert keys == expected
    with safe_open(str(path / "residual.safetensors"), "pt") as f:
        rmeta = json.loads(f.metadata()["qdec"])
        assert rmeta["residual_bits"] == 4 and rmeta["kind"] == "residual"
        assert rmeta["layers"]["model.layers.0.self_attn.q_proj"] == {"in_features": 96,
                                                                       "out_features": 64}
        assert f.get_tensor("model.layers.0.self_attn.q_proj.residual").shape == (96, 2 * 4)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.residual_scales").dtype == \
            torch.float32
    cfg = json.loads((path / "config.json").read_text())
    assert set(cfg["qdec"]) >= {"format_version", "method", "bits", "group_size", "symmetric",
                                "residual_bits", "quantized_modules"}


def test_input_permutation_round_trip_reaches_qdec_linear(tmp_path):
    from qdec.nn import QDECLinear

    path, args = build(tmp_path, with_perm=True)
    ck = read_qdec_checkpoint(path)
    name = "model.layers.0.mlp.down_proj"
    perm = ck.linears[name].input_permutation
    assert perm.dtype == torch.int64
    assert torch.equal(perm, args["linears"][name].input_permutation)
    p = ck.packed_linears()[name]
    assert torch.equal(p.input_permutation, perm)
    layer = QDECLinear(p.qweight, p.scales, p.zeros, p.bits, p.group_size, p.in_features,
                       input_permutation=p.input_permutation)
    x = torch.randn(3, p.in_features)
    w = qdec.ops.dequantize(p.qweight, p.scales.float(), None if p.zeros is None else
                            p.zeros.float(), p.bits, p.group_size, p.in_features)
    torch.testing.assert_close(layer(x), x[:, perm] @ w.t(), rtol=1e-4, atol=1e-4)


def test_existing_directory_refused_and_overwrite(tmp_path):
    path, _ = build(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build(tmp_path)
    build(tmp_path, method="rtn", overwrite=True)
    assert read_qdec_checkpoint(path).qdec["method"] == "rtn"


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full while writing the residual")

    monkeypatch.setattr(qdec_checkpoint, "save_residual_file", boom)
    with pytest.raises(OSError, match="disk full"):
        build(tmp_path)
    assert os.listdir(tmp_path) == []


def test_writer_validation(tmp_path):
    with pytest.raises(FormatError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' belongs"):
        build(tmp_path, tensors={"model.layers.0.mlp.down_proj.weight": torch.ones(1)})
    with pytest.raises(FormatError, match="residuals given without residual_bits"):
        build(tmp_path, residual_bits=None)
    bad = {"model.layers.0.self_attn.q_proj": residual(64, 95, 4, 0)}
    with pytest.raises(FormatError,
                       match=r"q_proj.residual has shape \[95, 8\]; expected \[96, 8\]"):
        build(tmp_path, residuals=bad)
    w = qweight(8, 64, 4, 32, False, 0)
    broken = PackedWeight(w.pack(), w.scales[:, :1], w.zeros, 4, 32, 64)
    with pytest.raises(FormatError, match=r"tensor x.scales is torch.float16 \[8, 1\]; "
                                          r"expected torch.float16 \[8, 2\]"):
        build(tmp_path, linears={"x": broken}, residuals=None, residual_bits=None)
    assert not (tmp_path / "ckpt").exists()


def rewrite_model_file(path, mutate):
    """Rewrite model.safetensors with ``mutate(tensors)`` applied, same metadata."""
    f = SafetensorsFile(path / "model.safetensors")
    tensors = {k: f.get(k).clone() for k in f.keys()}
    meta = dict(f.metadata)
    mutate(tensors, meta)
    save_safetensors(tensors, path / "model.safetensors", meta, overwrite=True)


@pytest.mark.parametrize("mutate, message", [
    (lambda t, m: t.pop("model.layers.0.self_attn.q_proj.zeros"),
     r"model\.safetensors: missing tensor 'model.layers.0.self_attn.q_proj.zeros'"),
    (lambda t, m: t.__setitem__("model.layers.0.self_attn.o_proj.scales", torch.ones(96, 3).half()),
     r"tensor 'model.layers.0.self_attn.o_proj.scales' has shape \[96, 3\]; expected \[96, 2\]"),
    (lambda t, m: t.__setitem__("model.layers.0.self_attn.o_proj.qweight",
                                torch.ones(96, 8, dtype=torch.int64)),
     r"tensor 'model.layers.0.self_attn.o_proj.qweight' has dtype I64; expected I32"),
    (lambda t, m: t.__setitem__("model.layers.0.self_attn.o_proj.zeros", torch.ones(96, 2).half()),
     r"unexpected tensor 'model.layers.0.self_attn.o_proj.zeros'"),
    (lambda t, m: t.__setitem__("model.layers.0.mlp.down_proj.weight", torch.ones(1)),
     r"unexpected tensor 'model.layers.0.mlp.down_proj.weight'"),
    (lambda t, m: m.pop("qdec"), r"__metadata__ has no 'qdec' entry"),
    (lambda t, m: m.__setitem__("qdec", "{oops"), "is not JSON"),
])
def test_reader_validation(tmp_path, mutate, message):
    path, _ = build(tmp_path)
    rewrite_model_file(path, mutate)
    with pytest.raises(FormatError, match=message):
        read_qdec_checkpoint(path)


def test_reader_config_and_residual_errors(tmp_path):
    path, _ = build(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["qdec"]["quantized_modules"].append("model.layers.9.mlp.up_proj")
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"missing \['model.layers.9.mlp.up_proj'\]"):
        read_qdec_checkpoint(path)
    cfg["qdec"]["quantized_modules"].pop()
    cfg["qdec"]["format_version"] = 2
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="knows version 1"):
        read_qdec_checkpoint(path)
    cfg["qdec"]["format_version"] = 1
    cfg["qdec"]["residual_bits"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"quantization_config.residual_bits is 4 but "
                                          r"qdec.residual_bits is None"):
        read_qdec_checkpoint(path)
    cfg["quantization_config"]["residual_bits"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="residual_bits null"):
        read_qdec_checkpoint(path)
    cfg["qdec"]["residual_bits"] = cfg["quantization_config"]["residual_bits"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    os.remove(path / "residual.safetensors")
    with pytest.raises(FormatError, match=r"residual\.safetensors: file missing"):
        read_qdec_checkpoint(path)
    del cfg["qdec"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="not a QDEC checkpoint"):
        read_qdec_checkpoint(path)


def test_quantization_config_block(tmp_path):
    """One definition of config.json's quantization_config, read back from the block,
    from a whole config, or from an older checkpoint's "qdec" section alone."""
    path, _ = build(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    block = cfg["quantization_config"]
    assert block == {"quant_method": "qdec", "format_version": 1, "bits": None,
                     "group_size": cfg["qdec"]["group_size"],
                     "symmetric": cfg["qdec"]["symmetric"], "residual_bits": 4}
    expected = {**{k: v for k, v in block.items() if k != "quant_method"}, "k": 0}
    assert read_quantization_config(block) == expected
    assert read_quantization_config(cfg) == expected
    old = {k: v for k, v in cfg.items() if k != "quantization_config"}
    assert read_quantization_config(old) == expected
    assert read_quantization_config({**block, "k": {"down_proj": 0.05, "q_proj": 3}})["k"] == {
        "down_proj": 0.05, "q_proj": 3}
    with pytest.raises(FormatError, match=r"cfg: quantization_config.k as a fraction must be"):
        read_quantization_config({**block, "k": 1.5}, "cfg")
    with pytest.raises(FormatError, match=r"quant_method is 'awq'; expected 'qdec'"):
        read_quantization_config({"quantization_config": {"quant_method": "awq"}})
    with pytest.raises(FormatError, match="residual_bits must be null or an int in 2..8"):
        read_quantization_config({**block, "residual_bits": 9})
    with pytest.raises(FormatError, match="not a QDEC checkpoint"):
        read_quantization_config({"model_type": "llama"})


def test_verify_checkpoint_checks_residual_tensors_without_loading(tmp_path):
    path, _ = build(tmp_path)
    ck = verify_qdec_checkpoint(path)
    assert ck.residual is None and set(ck.linears) == set(LAYERS)
    # build() leaves o_proj without a residual: refused when every module needs one.
    with pytest.raises(FormatError, match=r"residual\.safetensors: tensor "
                                          r"model\.layers\.0\.self_attn\.o_proj\.residual missing"):
        verify_qdec_checkpoint(path, require_residual=True)
    f = SafetensorsFile(path / "residual.safetensors")
    tensors = {k: f.get(k).clone() for k in f.keys()}
    name = "model.layers.0.mlp.down_proj.residual"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_safetensors(tensors, path / "residual.safetensors", f.metadata, overwrite=True)
    with pytest.raises(FormatError, match=r"residual\.safetensors: tensor "
                                          r"'model\.layers\.0\.mlp\.down_proj\.residual' has"):
        verify_qdec_checkpoint(path)


def test_residual_file_shape_mismatch(tmp_path):
    path, args = build(tmp_path)
    f = SafetensorsFile(path / "residual.safetensors")
    tensors = {k: f.get(k).clone() for k in f.keys()}
    tensors["model.layers.0.mlp.down_proj.residual_scales"] = torch.ones(41)
    save_safetensors(tensors, path / "residual.safetensors", f.metadata, overwrite=True)
    with pytest.raises(FormatError, match=r"residual\.safetensors: tensor "
                                          r"'model.layers.0.mlp.down_proj.residual_scales' has "
                                          r"shape \[41\]; expected \[40\]"):
        read_qdec_checkpoint(path)


def test_residual_store_loader(tmp_path):
    path, args = build(tmp_path)
    store = load_residual_store(path, pin_memory=False)
    assert not store.pinned
    sizes = store.layer_nbytes()
    assert sizes["model.layers.0.self_attn.q_proj"] == 96 * 8 * 4 + 64 * 4
    assert store.nbytes() == sum(sizes.values())
    assert "2 layers, 4-bit" in store.summary() and "host memory" in store.summary()
    residual_t, scales, bits = store.layers["model.layers.0.mlp.down_proj"]
    assert bits == 4 and residual_t.shape == (128, 8)
    # Copied out of the file mapping into ordinary memory.
    assert residual_t.untyped_storage().data_ptr() != SafetensorsFile(
        path / "residual.safetensors").get("model.layers.0.mlp.down_proj.residual"
                                           ).untyped_storage().data_ptr()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="pin_memory=True needs a CUDA"):
            load_residual_store(path, pin_memory=True)
    else:
        assert load_residual_store(path).pinned
        assert store.layers  # pinned tensors are usable as ordinary CPU tensors


def test_save_quantization_result(tmp_path):
    """Writing the quantization pipeline's result (duck-typed) with its model."""
    w = qweight(16, 64, 3, 32, False, 0)
    r, s = residual(16, 64, 4, 1)
    lin = types.SimpleNamespace(weight=w, residual=r, residual_scales=s, residual_bits=4)
    result = types.SimpleNamespace(method="rtn", propagate="none",
                                   linears={"model.layers.0.mlp.up_proj": lin})
    emb = torch.nn.Embedding(10, 64)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens = emb
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.model.layers[0].mlp = torch.nn.Module()
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 16)
    model.lm_head = torch.nn.Linear(64, 10, bias=False)
    model.lm_head.weight = emb.weight  # tied
    model.config = types.SimpleNamespace(to_dict=lambda: {"model_type": "llama",
                                                          "tie_word_embeddings": True})
    out = save_quantization_result(tmp_path / "q", result, model)
    ck = read_qdec_checkpoint(out)
    assert sorted(ck.tensors) == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.bias"]
    assert torch.equal(ck.linears["model.layers.0.mlp.up_proj"].qweight, w.pack())
    assert torch.equal(ck.residual.layers["model.layers.0.mlp.up_proj"].residual, r)


def test_config_bits_disagreeing_with_the_tensors(tmp_path):
    """config.json saying bits = 9 (or 4) over 3-bit tensors is refused, naming
    the file and the layer; qdec_infer gives the same message
    (tests/cpp/test_loader.cpp, test_cpp_parity.py)."""
    linears = {n: qweight(N, K, 3, G, sym, i) for i, (n, (N, K, _, G, sym)) in
               enumerate(LAYERS.items())}
    path, _ = build(tmp_path, linears=linears)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["qdec"]["bits"] == 3 and cfg["quantization_config"]["bits"] == 3
    cfg["qdec"]["bits"] = 9
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"quantization_config.bits is 3 but qdec.bits is 9"):
        read_qdec_checkpoint(path)
    cfg["quantization_config"]["bits"] = 9
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"quantization_config.bits must be null or an int "
                                          r"in 2..8, got 9"):
        read_qdec_checkpoint(path)
    cfg["qdec"]["bits"] = cfg["quantization_config"]["bits"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    first = next(iter(LAYERS))
    with pytest.raises(FormatError, match=rf"model.safetensors: layer '{first}' has bits=3 but "
                                          rf".*config.json says 4 for every layer"):
        read_qdec_checkpoint(path)
