"""The vLLM plugin (qdec.vllm) end to end on CPU: greedy tokens from vLLM equal
the patched transformers model's (what ``qdec generate`` runs) for 32 tokens,
on a tiny random checkpoint and on the embedded SmolLM2 (RTN W3 g128), at
k = 0 and k = 2 %; tensor parallel 2 equals TP 1 at k = 0 and, at k > 0, the
documented local selection (each row-parallel rank takes ceil(k/2) of its own
channels, simulated exactly by QDECLinear.selection_shards); malformed
checkpoints are refused, naming file and tensor, before any weight is used.

vLLM lives in its own virtual environment (created by .ci/run); in any other
environment these tests skip. Engines run in-process (no engine-core
subprocess), eager, float32, with prefix caching off (k changes between runs
of one prompt).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (CI runs these tests in "
                                          "the separate vLLM environment made by .ci/run)")

from qdec.formats import FormatError, save_safetensors  # noqa: E402
from qdec.formats.qdec_checkpoint import save_quantization_result  # noqa: E402
from qdec.formats.safetensors_io import SafetensorsFile  # noqa: E402
from qdec.patch import configure, load_patched_checkpoint, qdec_layers  # noqa: E402

STEPS = 32
ROW_PARALLEL = ("o_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    """Caches in a temporary folder (the compile cache key ignores plugin code),
    the engine in this process, a small KV cache, no CPU thread binding (vLLM's
    automatic binding wants one NUMA node per tensor-parallel rank; workers
    inherit OMP_NUM_THREADS instead)."""
    saved = dict(os.environ)
    tmp = tempfile.mkdtemp(prefix="qdec-vllm-")
    os.environ.update(VLLM_CACHE_ROOT=f"{tmp}/vllm", TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor",
                      VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                      VLLM_ALLOW_INSECURE_SERIALIZATION="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    os.environ.pop("QDEC_K", None)
    os.environ.pop("QDEC_TUNE_CONFIG", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


# ------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 256, GQA 4/2 heads, vocab 512), RTN W3 g64
    with a 4-bit residual store; shapes that split evenly for tensor parallel 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdec.quant.pipeline import quantize_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    result = quantize_model(model, "rtn", 3, 64, residual_bits=4, progress=False)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_quantization_result(path, result, model)
    return path


@pytest.fixture(scope="module")
def smol_ckpt(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M, RTN W3 g128, via ``qdec quantize``."""
    from qdec.cli import main

    path = tmp_path_factory.mktemp("smol") / "ckpt"
    assert main(["quantize", "--method", "rtn", "--bits", "3", "--group-size", "128",
                 "--calib-samples", "1", "--out", str(path)]) == 0
    return path


def make_llm(path: Path, tp: int = 1, tokenizer: bool = True):
    return vllm.LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=256,
                    max_num_seqs=4, enable_prefix_caching=False, tensor_parallel_size=tp,
                    distributed_executor_backend="mp" if tp > 1 else None,
                    skip_tokenizer_init=not tokenizer, seed=0)


def vllm_greedy(llm, prompt: list[int], k) -> list[int]:
    from qdec.vllm.method import configure

    assert all(n > 0 for n in llm.apply_model(functools.partial(configure, k=k)))
    params = vllm.SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True,
                                 detokenize=False)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


@torch.no_grad()
def hf_greedy(model, prompt: list[int]) -> list[int]:
    """Greedy decoding with a KV cache, one token per step, no EOS stop."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(STEPS):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def hf_model(path: Path, k: float, shards: int = 1):
    model = load_patched_checkpoint(str(path), k=k)
    for name, layer in qdec_layers(model):
        if name.rsplit(".", 1)[-1] in ROW_PARALLEL:
            layer.selection_shards = shards
    return model


TINY_PROMPT = [5, 77, 301, 12, 9, 480, 33, 150]


# ------------------------------------------------------------------ tests
def test_tiny_checkpoint_tp1_greedy_equals_hf(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "qdec"  # no flag needed
    llm = make_llm(tiny_ckpt, tokenizer=False)
    try:
        runs = {}
        for k in (0.0, 0.02):
            runs[k] = vllm_greedy(llm, TINY_PROMPT, k)
            want = hf_greedy(hf_model(tiny_ckpt, k), TINY_PROMPT)
            assert runs[k] == want, f"k={k}"
        assert runs[0.0] != runs[0.02]  # compensation reaches the tokens
        # k per projection: the fused qkv and gate_up layers then run per part.
        per_proj = {"q_proj": 0.05, "v_proj": 0.02, "gate_proj": 0.03, "down_proj": 0.05}
        hf = hf_model(tiny_ckpt, 0.0)
        configure(hf, k=per_proj)
        assert vllm_greedy(llm, TINY_PROMPT, per_proj) == hf_greedy(hf, TINY_PROMPT)
    finally:
        del llm


def test_smollm2_greedy_equals_hf(smol_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_ckpt)
    prompt = tok("The capital of France is")["input_ids"]
    llm = make_llm(smol_ckpt)
    try:
        for k in (0.0, 0.02):
            got = vllm_greedy(llm, prompt, k)
            want = hf_greedy(hf_model(smol_ckpt, k), prompt)
            assert got == want, f"k={k}: {tok.decode(got)!r} != {tok.decode(want)!r}"
    finally:
        del llm


def test_tiny_checkpoint_tensor_parallel_2(tiny_ckpt):
    """TP 2: k = 0 equals TP 1 (the HF model); k = 5 % equals the HF model whose
    row-parallel layers select ceil(k/2) channels per half of their input."""
    llm = make_llm(tiny_ckpt, tp=2, tokenizer=False)
    try:
        assert vllm_greedy(llm, TINY_PROMPT, 0.0) == hf_greedy(hf_model(tiny_ckpt, 0.0),
                                                                TINY_PROMPT)
        got = vllm_greedy(llm, TINY_PROMPT, 0.05)
        local = hf_greedy(hf_model(tiny_ckpt, 0.05, shards=2), TINY_PROMPT)
        assert got == local
        # ... which is not the global top-k on this model (the test tells them apart).
        assert local != hf_greedy(hf_model(tiny_ckpt, 0.05), TINY_PROMPT)
    finally:
        del llm


def test_older_checkpoint_loads_with_quantization_flag(tiny_ckpt, tmp_path):
    """A checkpoint written before config.json had the quantization_config block
    loads with quantization="qdec" (the plugin reads its "qdec" section)."""
    path = _copy(tiny_ckpt, tmp_path / "old")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    llm = vllm.LLM(model=str(path), quantization="qdec", dtype="float32", enforce_eager=True,
                   max_model_len=256, max_num_seqs=4, enable_prefix_caching=False,
                   skip_tokenizer_init=True, seed=0)
    try:
        assert vllm_greedy(llm, TINY_PROMPT, 0.0) == hf_greedy(hf_model(tiny_ckpt, 0.0),
                                                                TINY_PROMPT)
    finally:
        del llm


def test_k_from_environment_and_tune_config(tmp_path, monkeypatch):
    """QDEC_TUNE_CONFIG beats QDEC_K beats the checkpoint's quantization_config.k."""
    from qdec.vllm.method import k_for, resolve_k_spec, resolve_sm_budgets

    assert resolve_k_spec(0.01) == 0.01 and resolve_sm_budgets() == {}
    monkeypatch.setenv("QDEC_K", '{"down_proj": 0.05, "q_proj": 3}')
    spec = resolve_k_spec(0.01)
    assert spec == {"down_proj": 0.05, "q_proj": 3}
    assert k_for(spec, "model.layers.0.mlp.down_proj", 512) == round(0.05 * 512)
    assert k_for(spec, "model.layers.0.self_attn.q_proj", 256) == 3
    assert k_for(spec, "model.layers.0.self_attn.k_proj", 256) == 0
    monkeypatch.setenv("QDEC_K", "1.5")
    with pytest.raises(FormatError, match="QDEC_K: quantization_config.k as a fraction"):
        resolve_k_spec(0)
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps({"format_version": "qdec-tune/1", "targets": {
        "2.5%": {"fraction": {"down_proj": 0.02}, "sm_budget": {"down_proj": 8}},
        "5%": {"fraction": {"down_proj": 0.04}}}}))
    monkeypatch.setenv("QDEC_TUNE_CONFIG", str(tune))
    assert resolve_k_spec(0) == {"down_proj": 0.02}
    assert resolve_sm_budgets() == {"down_proj": 8}
    monkeypatch.setenv("QDEC_TUNE_TARGET", "5%")
    assert resolve_k_spec(0) == {"down_proj": 0.04} and resolve_sm_budgets() == {}


# --------------------------------------------------------- malformed input
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    f = SafetensorsFile(path)
    tensors = {k: f.get(k).clone() for k in f.keys()}
    meta = dict(f.metadata)
    edit(tensors, meta)
    save_safetensors(tensors, path, meta, overwrite=True)


def _refused(path: Path, pattern: str) -> None:
    """Refused by the plugin's config step, and by vLLM before any weight loads."""
    from qdec.vllm.method import QDECConfig

    cfg = QDECConfig.from_config(json.loads((path / "config.json").read_text()))
    with pytest.raises(FormatError, match=pattern):
        cfg.maybe_update_config(str(path))
    with pytest.raises(Exception, match=pattern):
        make_llm(path, tokenizer=False)


def test_malformed_missing_residual(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "c")
    name = "model.layers.1.mlp.down_proj"

    def drop(tensors, meta):
        del tensors[f"{name}.residual"], tensors[f"{name}.residual_scales"]
        m = json.loads(meta["qdec"])
        del m["layers"][name]
        meta["qdec"] = json.dumps(m)

    _rewrite(path / "residual.safetensors", drop)
    _refused(path, rf"residual\.safetensors: tensor {name}\.residual missing")


def test_malformed_wrong_shape(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "c")
    name = "model.layers.0.self_attn.k_proj.qweight"

    def cut(tensors, meta):
        tensors[name] = tensors[name][:-1].contiguous()

    _rewrite(path / "model.safetensors", cut)
    _refused(path, rf"model\.safetensors.*{name}")


def test_malformed_bits_out_of_range(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "c")
    name = "model.layers.0.mlp.up_proj"

    def bits(tensors, meta):
        m = json.loads(meta["qdec"])
        m["layers"][name]["bits"] = 9
        meta["qdec"] = json.dumps(m)

    cfg = json.loads((path / "config.json").read_text())
    cfg["qdec"]["bits"] = cfg["quantization_config"]["bits"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    _rewrite(path / "model.safetensors", bits)
    _refused(path, rf"model\.safetensors: metadata of layer '{name}'.*bits")
