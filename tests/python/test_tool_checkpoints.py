"""Checkpoints written by the real quantization tools (tests/data/tools/, made by
tests/data/make_tool_checkpoints.py): the readers reproduce each tool's own
dequantized weights and forward logits, and ``qdec residual`` turns them into QDEC
checkpoints (issue 17). The tools themselves are not needed here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qdec.cli import main as qdec_main
from qdec.formats import FormatError, save_safetensors
from qdec.formats.compressed_tensors import parse_compressed_tensors_config
from qdec.formats.foreign import (
    detect_quantized_format,
    folded_scaling,
    read_quantized_checkpoint,
    residual_checkpoint,
)
from qdec.patch import configure, load_patched_checkpoint

TOOLS = Path(__file__).resolve().parents[1] / "data" / "tools"
REFERENCE = TOOLS / "tiny-llama"
TOOL_DIRS = sorted(p.name for p in TOOLS.iterdir() if p.is_dir() and p.name != "tiny-llama"
                   and (p / "expected.safetensors").is_file())
# The original model in each checkpoint's basis: AWQ folds its scales into the
# weights (and clips them), so its reference is AutoAWQ's export_compatible=True
# export of the same run; the others are in the tiny model's own basis.
# llm-compressor's AWQ checkpoint has no such reference: only its refusal is tested.
FOLDED = [d for d in TOOL_DIRS if "awq" in d]


def reference_for(tool: str) -> Path:
    return TOOLS / f"{tool}-reference" if tool in FOLDED else REFERENCE


WITH_REFERENCE = [d for d in TOOL_DIRS if reference_for(d).is_dir()]
# The tools run their model in float16, the project's patched model in float32:
# logits agree to float16 rounding of the activations (seen <= 1.1e-3).
LOGIT_ATOL = 5e-3


def expected(tool: str) -> dict[str, torch.Tensor]:
    return load_file(str(TOOLS / tool / "expected.safetensors"))


def test_tool_checkpoints_present():
    assert {"llmcompressor-w4a16-gptq", "llmcompressor-w4a16-awq", "autoawq-gemm-w4g64",
            "gptqmodel-w4g64"} <= set(TOOL_DIRS)
    assert REFERENCE.is_dir() and "autoawq-gemm-w4g64" in WITH_REFERENCE


@pytest.mark.parametrize("tool", TOOL_DIRS)
def test_reader_reproduces_tool_weights_exactly(tool):
    ckpt = read_quantized_checkpoint(TOOLS / tool)
    exp = expected(tool)
    # expected.safetensors holds three of the first decoder layer's weights, one of
    # each shape (make_tool_checkpoints.EXPECTED_WEIGHTS; the logits test covers
    # the rest), in the tool's dtype.
    names = [k[: -len(".weight")] for k in exp if k.endswith(".weight")]
    assert len(names) == 3 and set(names) <= set(ckpt.linears)
    for name in names:
        w = ckpt.linears[name]
        ours = w.to_quantized_weight().dequantize()
        theirs = exp[f"{name}.weight"]
        if w.input_permutation is not None:
            theirs = theirs[:, w.input_permutation]
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("tool", TOOL_DIRS)
def test_k0_logits_equal_the_tools_model(tool, tmp_path):
    out = tmp_path / "qdec"
    read_quantized_checkpoint(TOOLS / tool).write(out)
    exp = expected(tool)
    model = load_patched_checkpoint(str(out))
    with torch.no_grad():
        logits = model(exp["input_ids"]).logits[0]
    assert (logits - exp["logits"]).abs().max().item() <= LOGIT_ATOL


def dense_logits(tool_ckpt_dir: Path, weights: dict[str, torch.Tensor], ids: torch.Tensor):
    """Logits of the reference architecture with the given linear weights (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(REFERENCE, dtype=torch.float32).eval()
    ckpt = read_quantized_checkpoint(tool_ckpt_dir)
    state = {k: v.float() for k, v in ckpt.tensors.items()}
    state.update({f"{n}.weight": w for n, w in weights.items()})
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.mark.parametrize("tool", WITH_REFERENCE)
def test_residual_command_k_full_and_k0(tool, tmp_path):
    """k = K equals the model with W_hat + R_hat (the residual's own quantization
    error is all that is left), and is closer to the original model than k = 0,
    which equals the tool's own model."""
    from qdec.formats import read_qdec_checkpoint
    from qdec.quant.residual import dequantize_residual
    from qdec.packing import unpack_codes

    out = tmp_path / "qdec"
    assert qdec_main(["residual", "--quantized", str(TOOLS / tool), "--reference",
                      str(reference_for(tool)), "--out", str(out), "--no-progress"]) == 0
    exp = expected(tool)
    ids = exp["input_ids"]
    model = load_patched_checkpoint(str(out))
    with torch.no_grad():
        k0 = model(ids).logits[0]
        configure(model, k=1.0)
        kfull = model(ids).logits[0]
    assert (k0 - exp["logits"]).abs().max().item() <= LOGIT_ATOL

    ckpt = read_qdec_checkpoint(out)
    rb = ckpt.residual.residual_bits
    weights = {}
    for name, w in ckpt.linears.items():
        r = ckpt.residual.layers[name]
        N, K = w.out_features, w.in_features
        codes = unpack_codes(r.residual, rb, N).t().to(torch.int16) - (1 << (rb - 1))
        full = w.to_quantized_weight().dequantize().float() + dequantize_residual(
            codes, r.scales)
        if w.input_permutation is not None:  # back to the file's channel order
            unperm = torch.empty_like(full)
            unperm[:, w.input_permutation] = full
            full = unperm
        weights[name] = full
    compensated = dense_logits(TOOLS / tool, weights, ids)
    assert (kfull - compensated.to(kfull.dtype)).abs().max().item() <= LOGIT_ATOL

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(reference_for(tool),
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        original = ref(ids).logits[0]
    assert (kfull - original).abs().max() < (k0 - original).abs().max()


@pytest.mark.parametrize("tool", FOLDED)
def test_residual_refuses_folded_awq_scales(tool, tmp_path):
    out = tmp_path / "qdec"
    with pytest.raises(FormatError, match=r"per-(input-channel|output-row) factor.*folded "
                                          r"scales \(AWQ\)"):
        residual_checkpoint(TOOLS / tool, REFERENCE, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_folded_scaling_detection():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    noise = torch.randn(64, 128, generator=g) * 0.05
    assert folded_scaling(w + noise, w) is None
    s = torch.exp(torch.randn(128, generator=g) * 0.5)
    assert folded_scaling(w * s + noise, w) == "input-channel"
    r = torch.exp(torch.randn(64, 1, generator=g) * 0.5)
    assert folded_scaling(w * r + noise, w) == "output-row"
    assert folded_scaling(w, w) is None


def copy_reference(tmp_path: Path, drop: str | None = None, reshape: str | None = None) -> Path:
    ref = tmp_path / "ref"
    ref.mkdir()
    state = {k: v.clone() for k, v in load_file(str(REFERENCE / "model.safetensors")).items()}
    if drop:
        del state[drop]
    if reshape:
        state[reshape] = state[reshape][:, :-32].contiguous()
    save_safetensors(state, ref / "model.safetensors", {"format": "pt"})
    shutil.copy(REFERENCE / "config.json", ref / "config.json")
    return ref


def test_residual_missing_reference_tensor_names_it(tmp_path):
    tool = TOOLS / "llmcompressor-w4a16-gptq"
    ref = copy_reference(tmp_path, drop="model.layers.1.mlp.up_proj.weight")
    out = tmp_path / "out"
    with pytest.raises(FormatError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                          r"missing"):
        residual_checkpoint(tool, ref, out)
    assert not out.exists()


def test_residual_wrong_reference_shape_names_it(tmp_path, capsys):
    tool = TOOLS / "llmcompressor-w4a16-gptq"
    ref = copy_reference(tmp_path, reshape="model.layers.0.self_attn.q_proj.weight")
    out = tmp_path / "out"
    rc = qdec_main(["residual", "--quantized", str(tool), "--reference", str(ref), "--out",
                    str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'model.layers.0.self_attn.q_proj.weight' is torch.float16 [128, 96]" in err
    assert "expected a float [128, 128]" in err
    assert not out.exists()


def test_residual_refuses_a_float_model_and_existing_out(tmp_path):
    with pytest.raises(FormatError, match=r"no AutoAWQ .* GPTQ .* compressed-tensors"):
        residual_checkpoint(REFERENCE, REFERENCE, tmp_path / "out")
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(FileExistsError):
        residual_checkpoint(TOOLS / "llmcompressor-w4a16-gptq", REFERENCE, out)
    assert list(out.iterdir()) == []


def test_detect_quantized_format():
    for tool in TOOL_DIRS:
        fmt = detect_quantized_format(TOOLS / tool)
        assert fmt == ("autoawq" if tool.startswith("autoawq") else
                       "gptq" if tool.startswith("gptq") else "compressed-tensors")
    assert detect_quantized_format(REFERENCE) is None


def test_compressed_tensors_config_errors():
    base = json.loads((TOOLS / "llmcompressor-w4a16-gptq" / "config.json").read_text())
    qc = base["quantization_config"]
    parse_compressed_tensors_config(qc)

    def bad(change, pattern):
        cfg = json.loads(json.dumps(qc))
        change(cfg)
        with pytest.raises(FormatError, match=pattern):
            parse_compressed_tensors_config(cfg, "x/config.json")

    bad(lambda c: c.update(format="marlin-24"), r"x/config\.json: format 'marlin-24'")
    bad(lambda c: c.update(quant_method="gptq"), r"quant_method is 'gptq'")
    bad(lambda c: c["config_groups"]["group_0"].update(
        input_activations={"num_bits": 8, "type": "int", "strategy": "token",
                           "dynamic": True}), r"group 'group_0' quantizes activations")
    bad(lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=5),
        r"num_bits 5 is not supported")
    bad(lambda c: c["config_groups"]["group_0"]["weights"].update(
        strategy="tensor", group_size=None), r"strategy 'tensor' is not supported")


def test_compressed_tensors_tensor_errors(tmp_path):
    src = TOOLS / "llmcompressor-w4a16-gptq"
    d = tmp_path / "ct"
    shutil.copytree(src, d)
    state = {k: v.clone() for k, v in load_file(str(d / "model.safetensors")).items()}
    name = "model.layers.0.mlp.gate_proj"
    del state[f"{name}.weight_zero_point"]
    save_safetensors(state, d / "model.safetensors", {"format": "pt"}, overwrite=True)
    with pytest.raises(FormatError, match=rf"tensor {name}\.weight_zero_point missing"):
        read_quantized_checkpoint(d)
    state[f"{name}.weight_zero_point"] = torch.zeros(4, 1, dtype=torch.int32)
    save_safetensors(state, d / "model.safetensors", {"format": "pt"}, overwrite=True)
    with pytest.raises(FormatError, match=rf"{name}\.weight_zero_point is torch\.int32 \[4, 1\]"
                                          rf"; expected int32 \[32, 2\]"):
        read_quantized_checkpoint(d)


def test_generate_runs_a_tool_directory_at_k0(capsys):
    rc = qdec_main(["generate", str(TOOLS / "llmcompressor-w4a16-gptq"), "--prompt", "The",
                    "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "compressed-tensors checkpoint, no residual store" in captured.err
    assert "qdec residual --quantized" in captured.err
    assert "--- k = 0.0%" in captured.out and "--- k = 2.0%" not in captured.out
    # k > 0 needs a residual store: refused, not silently run at k = 0 (as qdec_infer)
    rc = qdec_main(["generate", str(TOOLS / "llmcompressor-w4a16-gptq"), "--prompt", "The",
                    "--max-new-tokens", "4", "--k", "0.05"])
    err = capsys.readouterr().err
    assert rc == 2 and "compressed-tensors checkpoint with no residual store, so only k = 0 runs" in err
    assert "qdec residual --quantized" in err


def test_eval_scores_a_tool_directory_at_k0(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    out = tmp_path / "eval.json"
    tool = TOOLS / "autoawq-gemm-w4g64"
    rc = qdec_main(["eval", "--model", str(tool), "--text", str(text), "--seq-len", "32",
                    "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "AutoAWQ checkpoint, no residual store" in captured.err
    result = json.loads(out.read_text())
    assert result["format"] == "AutoAWQ" and result["quantized"]["windows"] == 5
    assert result["quantized"]["tokens"] == 5 * 31
    assert f"({result['quantized']['tokens']} tokens scored)" in captured.out
    # The same number as scoring the tool's checkpoint converted by hand.
    from transformers import AutoTokenizer

    from qdec.eval.perplexity import perplexity

    conv = tmp_path / "conv"
    read_quantized_checkpoint(tool).write(conv)
    ids = AutoTokenizer.from_pretrained(tool)(text.read_text(), return_tensors="pt").input_ids[0]
    r = perplexity(load_patched_checkpoint(str(conv)), ids, seq_len=32, progress=False)
    assert r["ppl"] == pytest.approx(result["quantized"]["ppl"], rel=1e-9)


def test_gptq_without_checkpoint_format_is_read_as_v1_and_logged(tmp_path, caplog):
    from qdec.formats import write_gptq_checkpoint
    from qdec.quant.grid import QuantizedWeight

    g = torch.Generator().manual_seed(0)
    w = QuantizedWeight(torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8),
                        torch.rand(32, 1, generator=g).half() + 0.5,
                        torch.randint(1, 16, (32, 1), generator=g).half(), 4, -1, 64)
    d = tmp_path / "gptq"
    write_gptq_checkpoint(d, {"l": w}, {}, {}, zero_convention="v1")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]["checkpoint_format"]
    (d / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="qdec.formats.gptq"):
        ckpt = read_quantized_checkpoint(d)
    assert "no checkpoint_format; reading zero points as v1" in caplog.text
    assert torch.equal(ckpt.linears["l"].to_quantized_weight().dequantize(), w.dequantize())


def test_compressed_tensors_g_idx_becomes_an_input_permutation(tmp_path):
    """An act-order layer (weight_g_idx, which llm-compressor 0.14 no longer writes)
    made from a tool layer by shuffling its input channels: the reader sorts them
    back into contiguous groups and returns the permutation."""
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    src = TOOLS / "llmcompressor-w4a16-gptq"
    d = tmp_path / "ct"
    shutil.copytree(src, d)
    state = {k: v.clone() for k, v in load_file(str(d / "model.safetensors")).items()}
    name = "model.layers.1.mlp.down_proj"
    N, K = state[f"{name}.weight_shape"].tolist()
    G = 64
    signed = unpack_from_int32(state[f"{name}.weight_packed"], 4, torch.Size([N, K]))
    pi = torch.randperm(K, generator=torch.Generator().manual_seed(0))
    state[f"{name}.weight_packed"] = pack_to_int32(signed[:, pi].contiguous(), 4)
    state[f"{name}.weight_g_idx"] = (pi // G).to(torch.int32)
    save_safetensors(state, d / "model.safetensors", {"format": "pt"}, overwrite=True)

    original = read_quantized_checkpoint(src).linears[name].to_quantized_weight().dequantize()
    layer = read_quantized_checkpoint(d).linears[name]
    perm = layer.input_permutation
    assert perm is not None and torch.equal(perm, torch.sort(pi // G, stable=True).indices)
    # Column j of the converted weight is file column perm[j], i.e. original column
    # pi[perm[j]].
    assert torch.equal(layer.to_quantized_weight().dequantize(), original[:, pi[perm]])

    state[f"{name}.weight_g_idx"] = torch.zeros(K, dtype=torch.int32)
    save_safetensors(state, d / "model.safetensors", {"format": "pt"}, overwrite=True)
    with pytest.raises(FormatError, match=rf"tensor {name}\.weight_g_idx puts {K} channels in "
                                          rf"group 0"):
        read_quantized_checkpoint(d)


def test_bias_of_quantized_linears_is_kept(tmp_path):
    """A checkpoint whose quantized linears have biases (mlp_bias=True): the QDEC
    checkpoint written by qdec residual stores them and the patched model adds them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = TOOLS / "llmcompressor-w4a16-gptq"
    d = tmp_path / "ct"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["mlp_bias"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    state = {k: v.clone() for k, v in load_file(str(d / "model.safetensors")).items()}
    g = torch.Generator().manual_seed(1)
    biases = {}
    for layer in range(2):
        for proj, n in (("gate_proj", 256), ("up_proj", 256), ("down_proj", 128)):
            biases[f"model.layers.{layer}.mlp.{proj}.bias"] = (
                torch.randn(n, generator=g) * 0.1).half()
    state.update(biases)
    save_safetensors(state, d / "model.safetensors", {"format": "pt"}, overwrite=True)
    ref = copy_reference(tmp_path)
    ref_state = {k: v.clone() for k, v in load_file(str(ref / "model.safetensors")).items()}
    ref_state.update(biases)
    save_safetensors(ref_state, ref / "model.safetensors", {"format": "pt"}, overwrite=True)

    out = tmp_path / "qdec"
    residual_checkpoint(d, ref, out)
    stored = load_file(str(out / "model.safetensors"))
    for k, b in biases.items():
        assert torch.equal(stored[k], b), k
    ids = expected("llmcompressor-w4a16-gptq")["input_ids"]
    patched = load_patched_checkpoint(str(out))
    with torch.no_grad():
        k0 = patched(ids).logits[0]

    ckpt = read_quantized_checkpoint(d)
    dense = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d)).float().eval()
    full = {k: v.float() for k, v in ckpt.tensors.items()}
    full.update({f"{n}.weight": w.to_quantized_weight().dequantize().float()
                 for n, w in ckpt.linears.items()})
    missing, unexpected = dense.load_state_dict(full, strict=False)
    assert not unexpected and all(m.endswith("rotary_emb.inv_freq") for m in missing)
    with torch.no_grad():
        want = dense(ids).logits[0]
    assert (k0.float() - want).abs().max().item() <= LOGIT_ATOL
    # Without the biases the output would be far off: they are really applied.
    assert (k0.float() - dense_logits(src, {n: w.to_quantized_weight().dequantize().float()
                                            for n, w in ckpt.linears.items()}, ids)
            ).abs().max().item() > 10 * LOGIT_ATOL


def test_residual_command_checks_paths_first(tmp_path, capsys):
    tool = str(TOOLS / "llmcompressor-w4a16-gptq")
    rc = qdec_main(["residual", "--quantized", str(tmp_path / "nope"), "--reference",
                    str(REFERENCE), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--quantized " in capsys.readouterr().err
    rc = qdec_main(["residual", "--quantized", tool, "--reference", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "o")])
    assert rc == 2 and "--reference " in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    rc = qdec_main(["residual", "--quantized", tool, "--reference", str(REFERENCE),
                    "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "--overwrite" in err
    assert list((tmp_path / "o").iterdir()) == []
