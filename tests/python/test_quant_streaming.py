"""Streaming (one decoder layer in memory) quantization of an HF checkpoint on disk
against the in-memory pipeline on the same model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qdec.formats.qdec_checkpoint import read_qdec_checkpoint, save_quantization_result
from qdec.formats.safetensors_io import FormatError, read_header, save_safetensors
from qdec.quant.pipeline import quantize_model
from qdec.quant.streaming import quantize_checkpoint_streaming

LAYERS = 3


def tiny_llama(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=128, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, as in a trained model
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model


def save_hf_dir(model: LlamaForCausalLM, path, sharded: bool) -> None:
    """An HF model directory: config.json plus one safetensors file, or one shard
    per decoder layer (+ one for the rest) with model.safetensors.index.json."""
    path.mkdir()
    model.config.save_pretrained(path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    if not sharded:
        save_safetensors(state, path / "model.safetensors", {"format": "pt"})
        return
    groups: dict[str, dict] = {}
    for name, t in state.items():
        shard = (f"model-layer{int(name.split('.')[2]):02d}.safetensors"
                 if name.startswith("model.layers.") else "model-rest.safetensors")
        groups.setdefault(shard, {})[name] = t
    weight_map = {}
    for shard, tensors in groups.items():
        save_safetensors(tensors, path / shard, {"format": "pt"})
        weight_map.update({n: shard for n in tensors})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))


OPTS = dict(awq_n_grid=4, progress=False)


@pytest.mark.parametrize("method,sharded", [("rtn", False), ("rtn", True), ("awq", False),
                                            ("awq", True), ("gptq", True)])
def test_streaming_matches_in_memory(tmp_path, ids, method, sharded):
    model = tiny_llama()
    src = tmp_path / "hf"
    save_hf_dir(model, src, sharded)
    out = tmp_path / "stream"
    res = quantize_checkpoint_streaming(src, out, method, 3, 32, calib_ids=ids, **OPTS)

    ref_model = tiny_llama()
    ref = quantize_model(ref_model, method, 3, 32, calib_ids=ids, **OPTS)
    ref_dir = tmp_path / "ref"
    save_quantization_result(ref_dir, ref, ref_model)

    # The files are byte-identical: same packed weights/scales/zeros, residuals,
    # (AWQ-folded) norms, embeddings, head, and metadata.
    for fname in ("model.safetensors", "residual.safetensors"):
        assert (out / fname).read_bytes() == (ref_dir / fname).read_bytes(), fname
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                       "residual.safetensors"]
    a, b = read_qdec_checkpoint(out), read_qdec_checkpoint(ref_dir)
    assert a.qdec == b.qdec
    assert list(a.linears) == list(ref.linears)
    for name, w in b.linears.items():
        v = a.linears[name]
        assert torch.equal(v.qweight, w.qweight) and torch.equal(v.scales, w.scales)
        assert torch.equal(v.zeros, w.zeros)
        ra, rb = a.residual.layers[name], b.residual.layers[name]
        assert torch.equal(ra.residual, rb.residual) and torch.equal(ra.scales, rb.scales)
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in b.tensors.items():
        assert torch.equal(a.tensors[name], t), name
    if method == "awq":  # the folded norms are what was written
        for name, w in ref.norm_weights.items():
            assert torch.equal(a.tensors[name], w)
            assert not torch.equal(w, model.get_submodule(name.removesuffix(".weight")).weight)

    # Per-linear statistics as quantize_model reports them.
    assert list(res.linears) == list(ref.linears)
    for name, r in ref.linears.items():
        s = res.linears[name]
        assert s.rel_error == r.rel_error and s.weight_bytes == r.weight_bytes
        assert s.residual_bytes == r.residual_bytes
    assert list(res.layer_seconds) == [f"model.layers.{i}" for i in range(LAYERS)]
    assert res.checkpoint_bytes == sum(f.stat().st_size for f in out.iterdir())
    assert method in res.summary()


def test_tied_embeddings_and_rtn_without_calibration(tmp_path):
    model = tiny_llama(tied=True)
    save_hf_dir(model, tmp_path / "hf", sharded=False)
    quantize_checkpoint_streaming(tmp_path / "hf", tmp_path / "stream", "rtn", 4, 32,
                                  residual_bits=None, progress=False)
    ref = quantize_model(model, "rtn", 4, 32, residual_bits=None, progress=False)
    save_quantization_result(tmp_path / "ref", ref, model)
    assert ((tmp_path / "stream" / "model.safetensors").read_bytes()
            == (tmp_path / "ref" / "model.safetensors").read_bytes())
    assert not (tmp_path / "stream" / "residual.safetensors").exists()
    ckpt = read_qdec_checkpoint(tmp_path / "stream")
    assert "lm_head.weight" not in ckpt.tensors and ckpt.residual is None


def test_float32_compute_of_bf16_checkpoint(tmp_path, ids):
    """dtype=float32 (what the CLI uses) equals the in-memory path on the model
    loaded in float32, bf16 tensors converted on the way through."""
    model = tiny_llama().to(torch.bfloat16)
    save_hf_dir(model, tmp_path / "hf", sharded=True)
    quantize_checkpoint_streaming(tmp_path / "hf", tmp_path / "stream", "rtn", 3, 32,
                                  calib_ids=ids, dtype=torch.float32, progress=False)
    model = model.float()
    ref = quantize_model(model, "rtn", 3, 32, calib_ids=ids, progress=False)
    save_quantization_result(tmp_path / "ref", ref, model)
    for fname in ("model.safetensors", "residual.safetensors"):
        assert ((tmp_path / "stream" / fname).read_bytes()
                == (tmp_path / "ref" / fname).read_bytes())


@pytest.mark.parametrize("sharded", [False, True])
def test_missing_tensor_names_tensor_and_file(tmp_path, ids, sharded):
    model = tiny_llama()
    src = tmp_path / "hf"
    save_hf_dir(model, src, sharded)
    missing = "model.layers.2.mlp.up_proj.weight"
    if sharded:
        index = json.loads((src / "model.safetensors.index.json").read_text())
        del index["weight_map"][missing]
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        shard = src / "model-layer02.safetensors"
        hdr = read_header(shard)
        from qdec.formats.safetensors_io import SafetensorsFile
        tensors = {n: SafetensorsFile(shard).get(n).clone() for n in hdr.tensors if n != missing}
        save_safetensors(tensors, shard, overwrite=True)
        where = "model.safetensors.index.json"
    else:
        state = {k: v for k, v in model.state_dict().items() if k != missing}
        save_safetensors(state, src / "model.safetensors", overwrite=True)
        where = "model.safetensors"
    out = tmp_path / "out"
    with pytest.raises(FormatError, match=rf"{where}: missing tensor '{missing}'"):
        quantize_checkpoint_streaming(src, out, "rtn", 3, 32, calib_ids=ids, progress=False)
    assert not out.exists()


def test_wrong_shape_names_tensor_file_and_expected(tmp_path, ids):
    model = tiny_llama()
    src = tmp_path / "hf"
    save_hf_dir(model, src, sharded=False)
    state = dict(model.state_dict())
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_safetensors(state, src / "model.safetensors", overwrite=True)
    with pytest.raises(FormatError, match=r"model.safetensors: tensor 'model.layers.1.self_attn"
                                          r".k_proj.weight' has shape \[16, 64\]; expected "
                                          r"\[32, 64\]"):
        quantize_checkpoint_streaming(src, tmp_path / "out", "rtn", 3, 32, calib_ids=ids,
                                      progress=False)


def test_existing_output_refused_without_overwrite(tmp_path, ids):
    model = tiny_llama()
    save_hf_dir(model, tmp_path / "hf", sharded=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists"):
        quantize_checkpoint_streaming(tmp_path / "hf", out, "rtn", 3, 32, calib_ids=ids,
                                      progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    quantize_checkpoint_streaming(tmp_path / "hf", out, "rtn", 3, 32, calib_ids=ids,
                                  progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and read_qdec_checkpoint(out).linears


def test_corrupt_layer_midway_leaves_no_output(tmp_path, ids, monkeypatch):
    """A NaN in layer 2's weights is found only when that layer is loaded, after
    layers 0 and 1 were quantized and written: nothing may be left behind."""
    model = tiny_llama()
    src = tmp_path / "hf"
    save_hf_dir(model, src, sharded=True)
    bad = "model.layers.2.mlp.down_proj.weight"
    shard = src / "model-layer02.safetensors"
    hdr = read_header(shard)
    info = hdr.tensors[bad]
    with open(shard, "r+b") as f:  # overwrite one float32 element with a NaN
        f.seek(hdr.data_start + info.begin + 4 * 37)
        f.write(b"\x00\x00\xc0\x7f")

    import qdec.quant.streaming as streaming
    written = []
    real = streaming._write_layer_part
    monkeypatch.setattr(streaming, "_write_layer_part",
                        lambda *a, **k: written.append(a[1]) or real(*a, **k))
    out = tmp_path / "out"
    with pytest.raises(FormatError, match=rf"model-layer02.safetensors: tensor '{bad}' "
                                          r"\[64, 128\] has non-finite values"):
        quantize_checkpoint_streaming(src, out, "gptq", 3, 32, calib_ids=ids, progress=False)
    assert written == [0, 1]  # it really failed mid-way
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary directory either


def test_bad_settings_rejected_before_work(tmp_path, ids):
    save_hf_dir(tiny_llama(), tmp_path / "hf", sharded=False)
    with pytest.raises(ValueError, match="needs calib_ids"):
        quantize_checkpoint_streaming(tmp_path / "hf", tmp_path / "o", "awq", 3, 32)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_checkpoint_streaming(tmp_path / "hf", tmp_path / "o", "xyz", 3, 32, ids)
    with pytest.raises(FileNotFoundError, match="config.json"):
        quantize_checkpoint_streaming(tmp_path, tmp_path / "o", "rtn", 3, 32, ids)
    assert not (tmp_path / "o").exists()


def test_cli_quantize_hf_directory_streams(tmp_path, capsys):
    """``qdec quantize --model <HF dir>`` takes the streaming path and writes what
    the in-memory path (model loaded in float32 by the CLI's loader) would."""
    from qdec.cli import load_model, main
    from qdec.models.llama import load_gguf_llama

    calib = "/work/shared/data/wikitext-2/valid.txt"
    if not os.path.isfile(calib):
        pytest.skip(f"{calib} not available")
    _, tok = load_gguf_llama()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    src = tmp_path / "hf"
    save_hf_dir(model, src, sharded=False)
    tok.save_pretrained(src)
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(src), "--method", "awq", "--bits", "3",
            "--group-size", "32", "--calib", calib, "--calib-samples", "2", "--calib-len", "32",
            "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "quantize_summary.json").read_text())
    assert summary["streaming"] and len(summary["layers"]) == 14
    assert len(summary["layer_rss_bytes"]) == 2
    assert (out / "tokenizer.json").is_file()
    assert main(argv) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err

    from qdec.eval.sweep import calibration_ids
    ref_model, _ = load_model(str(src))
    ids = calibration_ids(tok, calib, 2, 32, 0)
    ref = quantize_model(ref_model, "awq", 3, 32, calib_ids=ids, progress=False)
    save_quantization_result(tmp_path / "ref", ref, ref_model)
    for fname in ("model.safetensors", "residual.safetensors"):
        assert (out / fname).read_bytes() == (tmp_path / "ref" / fname).read_bytes()
