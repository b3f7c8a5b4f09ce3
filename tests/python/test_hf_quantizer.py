"""The transformers integration (qdec.hf): ``AutoModelForCausalLM.from_pretrained``
on a QDEC checkpoint builds QDECLinear layers whose logits equal the patch path's
(``qdec.patch.load_patched_checkpoint``, what ``qdec generate`` runs) exactly on
CPU in float32, at k = 0 and k > 0; ``qdec.configure`` steers it (k = 0 is the
plain quantized model, k = all channels the quantized model plus the whole
residual); ``generate`` works; ``save_pretrained`` writes a QDEC checkpoint that
loads back to identical logits and tensors; malformed checkpoints are refused
naming file and tensor. Two tiny random checkpoints: a Llama (W3 g64 asymmetric,
untied head) and a Qwen2 (biases on q/k/v, W4 g32 symmetric, tied embeddings,
two layers with an act-order input permutation).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import qdec
from qdec import hf as qdec_hf
from qdec.formats import FormatError
from qdec.formats.qdec_checkpoint import (
    PackedWeight,
    read_qdec_checkpoint,
    save_quantization_result,
    verify_qdec_checkpoint,
    write_qdec_checkpoint,
)
from qdec.formats.residual_store import RESIDUAL_FILE, save_residual_file
from qdec.nn import QDECLinear
from qdec.patch import DECODER_LINEARS, load_patched_checkpoint, qdec_layers

PROMPT = torch.tensor([[5, 77, 301, 12, 9, 480, 33, 150, 7, 64]])
REPO = Path(__file__).resolve().parents[2]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         initializer_range=0.2)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # visible biases (transformers initialises them to 0)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from qdec.quant.pipeline import quantize_model

    root = tmp_path_factory.mktemp("hf")
    llama = _tiny_llama()
    result = quantize_model(llama, "rtn", 3, 64, residual_bits=4, progress=False)
    save_quantization_result(root / "llama", result, llama)

    qwen = _tiny_qwen2()
    result = quantize_model(qwen, "rtn", 4, 32, symmetric=True, residual_bits=3, progress=False)
    g = torch.Generator().manual_seed(2)
    permuted = ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj")
    linears = {name: PackedWeight.from_quantized_weight(
        r.weight, torch.randperm(r.weight.in_features, generator=g) if name in permuted else None)
        for name, r in result.linears.items()}
    state = qwen.state_dict()
    tensors = {k: t for k, t in state.items()
               if k.rpartition(".")[0] not in linears or k.endswith(".bias")}
    del tensors["lm_head.weight"]  # tied to the embedding
    write_qdec_checkpoint(root / "qwen2", hf_config=qwen.config.to_dict(), linears=linears,
                          tensors=tensors, method="rtn",
                          residuals={n: (r.residual, r.residual_scales)
                                     for n, r in result.linears.items()},
                          residual_bits=3)
    return {"llama": root / "llama", "qwen2": root / "qwen2"}


@pytest.fixture(params=["llama", "qwen2"])
def ckpt(request, checkpoints) -> Path:
    return checkpoints[request.param]


def load(path: Path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


@torch.no_grad()
def logits(model, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    return model(ids).logits


# ------------------------------------------------------------------ loading
def test_from_pretrained_builds_qdec_linears(ckpt):
    model = load(ckpt)
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in DECODER_LINEARS]
    layers = dict(qdec_layers(model))
    assert sorted(layers) == sorted(names)
    for name, layer in layers.items():
        assert type(layer) is QDECLinear, name  # the loading stand-in is gone
        assert "input_perm" not in layer._buffers
        assert layer.k == 0 and layer.policy == "dynamic"
        assert layer.residual is not None and layer.residual.device.type == "cpu"
        assert layer.residual.is_pinned() == torch.cuda.is_available()
    assert model.config.quantization_config.quant_method == "qdec"
    assert model.is_quantized and model.hf_quantizer.is_serializable()
    ref = load_patched_checkpoint(str(ckpt))
    for name, layer in layers.items():
        want = ref.get_submodule(name)
        for attr in ("qweight", "scales", "zeros", "bias", "residual_scales",
                     "input_permutation", "residual"):
            a, b = getattr(layer, attr), getattr(want, attr)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (name, attr)
        assert layer.residual_bits == want.residual_bits


@pytest.mark.parametrize("k, policy", [(0, "dynamic"), (0.05, "dynamic"), (0.1, "oracle"),
                                       (3, "dynamic")])
def test_logits_equal_patch_path(ckpt, k, policy):
    model, ref = load(ckpt), load_patched_checkpoint(str(ckpt))
    qdec.configure(model, k=k, policy=policy)
    qdec.configure(ref, k=k, policy=policy)
    assert torch.equal(logits(model), logits(ref))


def _dense_model(path: Path, with_residual: bool):
    """The checkpoint's model with every QDECLinear replaced by an nn.Linear holding
    W_hat (plus the whole residual R when ``with_residual``), in float32."""
    model = load_patched_checkpoint(str(path))
    for name, layer in list(qdec_layers(model)):
        w = qdec.dequantize(layer.qweight, layer.scales.float(), None if layer.zeros is None
                            else layer.zeros.float(), layer.bits, layer.group_size,
                            layer.in_features)
        if with_residual:
            rows = qdec.residual_gather(layer.residual, layer.residual_scales,
                                        torch.arange(layer.in_features), layer.residual_bits)
            w = w + rows.t()
        if layer.input_permutation is not None:  # column j multiplies x[perm[j]]
            w = torch.empty_like(w).index_copy_(1, layer.input_permutation, w)
        dense = torch.nn.Linear(layer.in_features, layer.out_features,
                                bias=layer.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(w)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dense)
    return model


def test_configure_k_steers_compensation(ckpt):
    model = load(ckpt)
    base = logits(model)
    plain = logits(_dense_model(ckpt, with_residual=False))
    full = logits(_dense_model(ckpt, with_residual=True))
    assert torch.allclose(base, plain, rtol=1e-4, atol=1e-4)  # k = 0: the quantized model
    assert not torch.allclose(base, full, rtol=1e-2, atol=1e-2)
    qdec.configure(model, k=1.0)  # every channel: the quantized model plus all of R
    assert torch.allclose(logits(model), full, rtol=1e-4, atol=1e-4)
    errors = []
    for k in (0.0, 0.25, 0.5, 1.0):
        qdec.configure(model, k=k)
        errors.append((logits(model) - full).abs().mean().item())
    assert errors[0] > errors[1] > errors[2] > errors[3]
    # Per projection, as for the patch path; unnamed projections keep their k.
    qdec.configure(model, k={"down_proj": 8, "q_proj": 0.5})
    for name, layer in qdec_layers(model):
        want = {"down_proj": 8, "q_proj": layer.in_features // 2}.get(name.rsplit(".", 1)[1],
                                                                       layer.in_features)
        assert layer.k == want, name


def test_dequantize_gives_the_k0_model_dense(ckpt, tmp_path):
    model = load(ckpt)
    base = logits(model)
    dense = model.dequantize()
    assert not list(qdec_layers(dense)) and not dense.is_quantized
    assert isinstance(dense.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert torch.allclose(logits(dense), base, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits(dense), logits(_dense_model(ckpt, with_residual=False)))
    dense.save_pretrained(tmp_path / "dense")  # an ordinary dense checkpoint
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "qdec" not in cfg and "quantization_config" not in cfg
    assert torch.equal(logits(load(tmp_path / "dense")), logits(dense))


def test_generate_equals_greedy_loop_of_patch_path(ckpt):
    model, ref = load(ckpt), load_patched_checkpoint(str(ckpt))
    qdec.configure(model, k=0.05)
    qdec.configure(ref, k=0.05)
    steps = 12
    with torch.no_grad():
        out = model.generate(PROMPT, max_new_tokens=steps, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        ids = PROMPT
        for _ in range(steps):  # greedy without a KV cache: every step from scratch
            nxt = ref(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert out.shape == (1, PROMPT.shape[1] + steps)
    assert torch.equal(out, ids)


def test_quantization_config_k_sets_initial_k(checkpoints, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoints["llama"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["k"] = {"down_proj": 0.25, "q_proj": 5}
    (path / "config.json").write_text(json.dumps(cfg))
    model = load(path)
    for name, layer in qdec_layers(model):
        proj = name.rsplit(".", 1)[1]
        assert layer.k == {"down_proj": layer.in_features // 4, "q_proj": 5}.get(proj, 0), name
    assert model.config.quantization_config.to_dict()["k"] == {"down_proj": 0.25, "q_proj": 5}


# ------------------------------------------------------------------- saving
def test_save_pretrained_round_trip(ckpt, tmp_path):
    model = load(ckpt)
    qdec.configure(model, k=0.05)
    want = logits(model)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert {"config.json", "model.safetensors", RESIDUAL_FILE} <= {p.name for p in out.iterdir()}
    verify_qdec_checkpoint(out, require_residual=True)
    original, saved = read_qdec_checkpoint(ckpt), read_qdec_checkpoint(out)
    assert saved.qdec == original.qdec
    assert saved.config["quantization_config"] == original.config["quantization_config"]
    assert set(saved.tensors) == set(original.tensors)
    for name, t in original.tensors.items():
        assert torch.equal(saved.tensors[name], t), name
    for name, w in original.linears.items():
        s = saved.linears[name]
        assert torch.equal(s.qweight, w.qweight) and torch.equal(s.scales, w.scales), name
        assert (s.zeros is None) == (w.zeros is None)
        assert (s.input_permutation is None) == (w.input_permutation is None)
        if w.input_permutation is not None:
            assert torch.equal(s.input_permutation, w.input_permutation)
        ra, rb = saved.residual.layers[name], original.residual.layers[name]
        assert torch.equal(ra.residual, rb.residual) and torch.equal(ra.scales, rb.scales)
    again = load(out)
    qdec.configure(again, k=0.05)
    assert torch.equal(logits(again), want)


def test_copied_and_pickled_model_saves_itself(checkpoints, tmp_path):
    """save_pretrained is attached to the loaded model (the residual file); a deep
    copy or a torch.save/torch.load of the model must save the copy, not the original."""
    import copy
    import io

    model = load(checkpoints["llama"])
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        qdec.configure(other, k=0.05)
        other.model.layers[0].mlp.down_proj.residual_scales.mul_(2)  # only in the copy
        want = logits(other)
        other.save_pretrained(tmp_path / "copy")
        again = load(tmp_path / "copy")
        qdec.configure(again, k=0.05)
        assert torch.equal(logits(again), want)
        shutil.rmtree(tmp_path / "copy")


def test_save_pretrained_refuses_shards_and_lowrank(checkpoints, tmp_path):
    from qdec.lowrank import LowRankTerm

    model = load(checkpoints["llama"])
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "a", max_shard_size="1MB")
    layer = model.model.layers[0].mlp.down_proj
    layer.set_lowrank(LowRankTerm(torch.zeros(layer.out_features, 2),
                                  torch.zeros(2, layer.in_features)))
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj has a low-rank term"):
        model.save_pretrained(tmp_path / "b")


# ------------------------------------------------------------------- errors
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_residual_file_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints["llama"], tmp_path / "ckpt")
    (path / RESIDUAL_FILE).unlink()
    with pytest.raises(FormatError, match=rf"{RESIDUAL_FILE}: file missing .*residual_bits"):
        load(path)


def test_mismatched_residual_file_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints["llama"], tmp_path / "ckpt")
    store = read_qdec_checkpoint(path).residual
    pairs = {n: (r.residual, r.scales) for n, r in store.layers.items()}
    name = "model.layers.1.self_attn.k_proj"  # [64, 128]: give it o_proj's [128, 128]
    pairs[name] = pairs["model.layers.1.self_attn.o_proj"]
    save_residual_file(path / RESIDUAL_FILE, pairs, store.residual_bits, overwrite=True)
    with pytest.raises(FormatError, match=rf"{RESIDUAL_FILE}.*{name}"):
        load(path)


def test_mismatched_model_tensor_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints["llama"], tmp_path / "ckpt")
    ckpt = read_qdec_checkpoint(path, load_residual=False)
    name = "model.layers.0.mlp.up_proj"
    w = ckpt.linears[name]
    linears = dict(ckpt.linears)
    linears[name] = PackedWeight(w.qweight[:-32].clone(), w.scales[:-32].clone(),
                                 w.zeros[:-32].clone(), w.bits, w.group_size, w.in_features)
    write_qdec_checkpoint(tmp_path / "bad", hf_config=ckpt.hf_config(), linears=linears,
                          tensors={k: v.clone() for k, v in ckpt.tensors.items()},
                          method="rtn")
    with pytest.raises(FormatError, match=rf"model.safetensors: tensor {name}.qweight is for a "
                                          r"\[224, 128\] weight .* \[256, 128\]"):
        load(tmp_path / "bad")


def test_not_pre_quantized_is_refused(tmp_path):
    from qdec.hf.quantizer import QDECConfig

    _tiny_llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=QDECConfig())


def test_config_block_is_validated():
    from qdec.hf.quantizer import QDECConfig

    with pytest.raises(FormatError, match=r"quantization_config.k as a fraction must be in"):
        QDECConfig(bits=3, k=1.5)
    with pytest.raises(FormatError, match=r"quantization_config.bits must be null or an int"):
        QDECConfig(bits=9)


# ------------------------------------------------------------- registration
def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_qdec_registers_lazily():
    out = _python(
        "import sys, qdec\n"
        "print('imported' if 'transformers.quantizers.auto' in sys.modules else 'lazy')\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as C\n"
        "print(Q['qdec'].__name__, C['qdec'].__name__)\n")
    assert out.split() == ["lazy", "QDECHfQuantizer", "QDECConfig"]
    out = _python("import transformers.quantizers.auto as a, qdec\n"
                  "print(a.AUTO_QUANTIZER_MAPPING['qdec'].__name__)\n")
    assert out.split() == ["QDECHfQuantizer"]
    # Without transformers, import qdec still works; register() says what is missing.
    out = _python("import sys; sys.modules['transformers'] = None\n"
                  "import qdec\n"
                  "try:\n    qdec.hf.register()\nexcept ImportError as e:\n    print(e)\n")
    assert "needs transformers >= 5.0" in out and "not installed" in out


def test_old_transformers_gives_a_clear_message(monkeypatch, checkpoints):
    """An older transformers (checked for real with 4.51.3) has a registry but not
    the loading API: "qdec" is registered as a method that refuses with the message,
    rather than left unknown (transformers would then skip it and initialise the
    quantized linears at random)."""
    import transformers.quantizers.auto as auto

    for table in ("AUTO_QUANTIZER_MAPPING", "AUTO_QUANTIZATION_CONFIG_MAPPING"):
        monkeypatch.setattr(auto, table, {k: v for k, v in getattr(auto, table).items()
                                          if k != "qdec"})
    monkeypatch.setattr(qdec_hf, "_registered", False)
    monkeypatch.setattr(qdec_hf, "_refusal_registered", False)
    monkeypatch.setattr(qdec_hf, "_transformers_version", lambda: ("4.44.0", (4, 44)))
    with pytest.raises(ImportError, match=r"needs transformers >= 5\.0 .* found 4\.44\.0.*"
                                          r"from_pretrained on a QDEC checkpoint stops"):
        qdec_hf.register()
    assert auto.AUTO_QUANTIZER_MAPPING["qdec"].__name__ == "UnsupportedQDECQuantizer"
    with pytest.raises(ImportError, match=r"found 4\.44\.0\. Without it, "
                                          r"qdec.patch.load_patched_checkpoint"):
        load(checkpoints["llama"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qdec_hf._register_or_warn()  # what the import hook does: warn, never raise
    assert any("load_patched_checkpoint" in str(w.message) for w in caught)


def test_a_failing_registration_never_breaks_the_import(monkeypatch):
    def taken():
        raise ValueError("Quantizer 'qdec' already registered")

    monkeypatch.setattr(qdec_hf, "register", taken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qdec_hf._register_or_warn()
    assert any("could not register quantization method 'qdec'" in str(w.message)
               and "already registered" in str(w.message) for w in caught)
