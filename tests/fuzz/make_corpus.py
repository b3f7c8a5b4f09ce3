"""Writes the seed corpus of fuzz_safetensors_header (tests/fuzz/corpus/
safetensors_header/): small valid safetensors images and near-misses of each
kind the parser rejects. Deterministic; rerun after changing it:

    python tests/fuzz/make_corpus.py
"""

import json
import struct
from pathlib import Path

OUT = Path(__file__).parent / "corpus" / "safetensors_header"


def image(header, data=b"", length=None, pad=True):
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CASES = {
    "valid_two_tensors": image({"__metadata__": {"format": "pt"}, "a": entry("F32", [2, 2], 0, 16),
                                "b": entry("I32", [3], 16, 28)}, bytes(range(28))),
    "valid_all_dtypes": image({d: entry(d, [1], i * 8, i * 8 + s) if s == 8 else entry(d, [8 // s], i * 8, i * 8 + 8)
                               for i, (d, s) in enumerate([("F64", 8), ("F32", 4), ("F16", 2), ("BF16", 2),
                                                           ("I64", 8), ("I32", 4), ("I16", 2), ("I8", 1),
                                                           ("U64", 8), ("U32", 4), ("U16", 2), ("U8", 1),
                                                           ("BOOL", 1), ("F8_E4M3", 1), ("F8_E5M2", 1)])},
                              bytes(15 * 8)),
    "valid_empty": image({}),
    "valid_zero_size": image({"e": entry("F32", [0, 4], 0, 0), "u": entry("U8", [2], 0, 2)}, b"xy"),
    "valid_unpadded": image({"u": entry("U8", [3], 0, 3)}, b"abc", pad=False),
    "truncated": b"\x10\x00\x00",
    "length_too_large": image({}, length=1 << 40),
    "not_json": image(b"{\"a\":"),
    "not_object": image([1, 2, 3]),
    "bad_utf8": image(b"{\"\xff\":1}"),
    "deep": image(b"[" * 64 + b"]" * 64),
    "unknown_dtype": image({"w": entry("F17", [1], 0, 4)}, bytes(4)),
    "size_mismatch": image({"w": entry("F32", [3], 0, 8)}, bytes(8)),
    "out_of_range": image({"w": entry("U8", [8], 0, 8)}, bytes(4)),
    "overlap": image({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}, bytes(6)),
    "gap": image({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 4, 6)}, bytes(6)),
    "trailing": image({"a": entry("U8", [2], 0, 2)}, bytes(5)),
    "numel_overflow": image({"w": entry("F32", [1 << 32, 1 << 32, 4], 0, 0)}),
    "duplicate_key": image(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                           b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"ab"),
    "metadata_not_string": image({"__metadata__": {"n": 3}}),
}

# A small byte-level BPE tokenizer.json (the harness also feeds JSON inputs
# to the tokenizer reader).
_B2U = [*range(33, 127), *range(161, 173), *range(174, 256)]
_BYTE_SYMBOLS = {b: chr(b) for b in _B2U}
_BYTE_SYMBOLS.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in _B2U)})
_VOCAB = {_BYTE_SYMBOLS[b]: b for b in range(256)}
_VOCAB.update({"he": 256, "ll": 257, "hell": 258, "hello": 259})
CASES["tokenizer_json"] = json.dumps({
    "added_tokens": [{"id": 260, "content": "<s>", "special": True}],
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    "post_processor": {"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                  {"Sequence": {"id": "A", "type_id": 0}}],
                       "special_tokens": {"<s>": {"id": "<s>", "ids": [260], "tokens": ["<s>"]}}},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": _VOCAB,
              "merges": [["h", "e"], ["l", "l"], ["he", "ll"], ["hell", "o"]]},
}, ensure_ascii=False).encode()

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in CASES.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(CASES)} files to {OUT}")
