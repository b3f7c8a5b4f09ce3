"""GGUF reader: synthetic files written here (every metadata type, hand-computed
Q4_0/Q4_1/Q8_0 blocks, corrupt variants), a cross-check of the real embedded
model against the ``gguf`` package's reader, and its Llama weights pinned to the
values of the project's previous dequantizer."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qdec.models.gguf import GGMLType, GGUFValueType, dequantize, metadata_summary, read_gguf

V = GGUFValueType


# ----------------------------------------------------------------------------
# A minimal GGUF writer (independent of the reader under test)
# ----------------------------------------------------------------------------

def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


_SCALAR_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I",
               V.INT32: "<i", V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q",
               V.FLOAT64: "<d"}


def _value(vtype: V, value, etype: V | None = None) -> bytes:
    if vtype == V.STRING:
        return _str(value)
    if vtype == V.ARRAY:
        assert etype is not None
        body = b"".join(_value(*v) if etype == V.ARRAY else _value(etype, v) for v in value)
        return struct.pack("<IQ", etype, len(value)) + body
    return struct.pack(_SCALAR_FMT[vtype], value)


def build_gguf(kvs: list[tuple], tensors: list[tuple[str, list[int], int, bytes]],
               version: int = 3, alignment: int = 32) -> tuple[bytes, dict[str, int]]:
    """GGUF bytes; ``kvs`` are ``(key, type, value[, element type])``, tensors
    ``(name, file dims fastest-first, ggml type, data bytes)``. Also returns the
    byte offset of each section, for targeted corruption."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    kv_bytes = b"".join(_str(k) + struct.pack("<I", t) + _value(t, v, *rest)
                        for k, t, v, *rest in kvs)
    infos, data, offsets = b"", b"", {}
    for name, dims, gtype, payload in tensors:
        data += b"\0" * (-len(data) % alignment)
        offsets[name] = len(data)
        infos += _str(name) + struct.pack("<I", len(dims)) + b"".join(
            struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", gtype, len(data))
        data += payload
    header = head + kv_bytes + infos
    pad = b"\0" * (-len(header) % alignment)
    sections = {"kv": len(head), "infos": len(head) + len(kv_bytes), "data": len(header) + len(pad)}
    return header + pad + data, sections


def _f16(x: float) -> bytes:
    return np.float16(x).tobytes()


# Q4_1 block: d = 0.5, m = -1; byte j holds weight j (low nibble, code j) and
# weight j+16 (high nibble, code 15-j).  y = code * d + m.
Q4_1_BLOCK = _f16(0.5) + _f16(-1.0) + bytes(j | ((15 - j) << 4) for j in range(16))
Q4_1_VALUES = [j * 0.5 - 1.0 for j in range(16)] + [(15 - j) * 0.5 - 1.0 for j in range(16)]
# Q4_0 block: d = 2; y = (code - 8) * d.
Q4_0_BLOCK = _f16(2.0) + bytes((j % 16) | (((j + 3) % 16) << 4) for j in range(16))
Q4_0_VALUES = [(j % 16 - 8) * 2.0 for j in range(16)] + [((j + 3) % 16 - 8) * 2.0
                                                         for j in range(16)]
# Q8_0 block: d = 0.25, int8 codes -128..127 spread.
Q8_0_CODES = [-128, -1, 0, 1, 127] + list(range(-40, 41, 3))[:27]
Q8_0_BLOCK = _f16(0.25) + np.array(Q8_0_CODES, dtype=np.int8).tobytes()
Q8_0_VALUES = [c * 0.25 for c in Q8_0_CODES]

ALL_KVS = [
    ("general.architecture", V.STRING, "llama"),
    ("t.u8", V.UINT8, 250), ("t.i8", V.INT8, -7), ("t.u16", V.UINT16, 65000),
    ("t.i16", V.INT16, -30000), ("t.u32", V.UINT32, 4_000_000_000), ("t.i32", V.INT32, -5),
    ("t.f32", V.FLOAT32, 1.5), ("t.bool", V.BOOL, True), ("t.str", V.STRING, "héllo ✓"),
    ("t.u64", V.UINT64, 2**63 + 5), ("t.i64", V.INT64, -(2**40)), ("t.f64", V.FLOAT64, -2.25),
    ("t.arr_u32", V.ARRAY, [1, 2, 3], V.UINT32),
    ("t.arr_f32", V.ARRAY, [0.5, -1.0], V.FLOAT32),
    ("t.arr_bool", V.ARRAY, [True, False], V.BOOL),
    ("t.arr_str", V.ARRAY, ["a", "", "Ġb c"], V.STRING),
    ("t.arr_arr", V.ARRAY, [(V.ARRAY, [1, 2], V.INT8), (V.ARRAY, [], V.INT8)], V.ARRAY),
    ("t.arr_empty", V.ARRAY, [], V.UINT64),
    ("general.alignment", V.UINT32, 64),
]

F32_DATA = np.arange(6, dtype=np.float32) - 2.5
F16_DATA = np.array([0.1, -2.0, 65504.0, 0.0], dtype=np.float16)
BF16_DATA = torch.tensor([1.0, -3.5, 1e20, 2**-10], dtype=torch.bfloat16)

ALL_TENSORS = [
    ("f32", [3, 2], GGMLType.F32, F32_DATA.tobytes()),
    ("f16", [4], GGMLType.F16, F16_DATA.tobytes()),
    ("bf16", [2, 2], GGMLType.BF16, BF16_DATA.view(torch.int16).numpy().tobytes()),
    ("q4_0", [32], GGMLType.Q4_0, Q4_0_BLOCK),
    ("q4_1", [32, 2], GGMLType.Q4_1, Q4_1_BLOCK * 2),
    ("q8_0", [64], GGMLType.Q8_0, Q8_0_BLOCK + Q8_0_BLOCK),
]


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, bytes, dict[str, int]]:
    blob, sections = build_gguf(ALL_KVS, ALL_TENSORS, alignment=64)
    path = tmp_path / "all.gguf"
    path.write_bytes(blob)
    return path, blob, sections


def test_every_metadata_type(synthetic):
    path, _, _ = synthetic
    g = read_gguf(path)
    assert g.version == 3 and g.alignment == 64
    m = g.metadata
    expected_scalars = {"t.u8": 250, "t.i8": -7, "t.u16": 65000, "t.i16": -30000,
                        "t.u32": 4_000_000_000, "t.i32": -5, "t.f32": 1.5, "t.bool": True,
                        "t.str": "héllo ✓", "t.u64": 2**63 + 5, "t.i64": -(2**40),
                        "t.f64": -2.25, "general.architecture": "llama"}
    for key, value in expected_scalars.items():
        assert m[key] == value and type(m[key]) is type(value), key
    assert m["t.arr_u32"].tolist() == [1, 2, 3] and m["t.arr_u32"].dtype == np.uint32
    assert m["t.arr_f32"].tolist() == [0.5, -1.0]
    assert m["t.arr_bool"].tolist() == [True, False]
    assert m["t.arr_str"] == ["a", "", "Ġb c"]
    assert [a.tolist() for a in m["t.arr_arr"]] == [[1, 2], []]
    assert m["t.arr_empty"].size == 0
    assert g.metadata_types["t.arr_str"] == (V.ARRAY, V.STRING)
    assert g.metadata_types["t.f64"] == V.FLOAT64
    summary = metadata_summary(g, max_items=2)
    assert summary["t.arr_u32"].startswith("[3 items") and summary["t.u8"] == "250"


def test_tensor_infos_and_plain_types(synthetic):
    path, _, sections = synthetic
    g = read_gguf(path)
    assert list(g.tensors) == [t[0] for t in ALL_TENSORS]
    assert g.data_start == sections["data"] and g.data_start % 64 == 0
    info = g.tensors["f32"]
    assert info.shape == (2, 3)  # file dims [3, 2] fastest-first -> PyTorch [2, 3]
    assert info.ggml_type == GGMLType.F32 and info.n_elements == 6 and info.n_bytes == 24
    assert all(t.offset % 64 == 0 for t in g)
    torch.testing.assert_close(g.dequantize("f32"), torch.from_numpy(F32_DATA).reshape(2, 3),
                               rtol=0, atol=0)
    torch.testing.assert_close(g.dequantize("f16"), torch.from_numpy(F16_DATA.astype(np.float32)),
                               rtol=0, atol=0)
    torch.testing.assert_close(g.dequantize("bf16"), BF16_DATA.float().reshape(2, 2), rtol=0,
                               atol=0)
    assert g.dequantize("f16", torch.float16).dtype == torch.float16


def test_quantized_blocks_hand_computed(synthetic):
    path, _, _ = synthetic
    g = read_gguf(path)
    q41 = g.dequantize("q4_1")
    assert q41.shape == (2, 32)
    assert q41[0, 0] == -1.0 and q41[0, 15] == 6.5 and q41[0, 16] == 6.5 and q41[0, 31] == -1.0
    assert q41[0].tolist() == Q4_1_VALUES and q41[1].tolist() == Q4_1_VALUES
    assert g.dequantize("q4_0").tolist() == Q4_0_VALUES
    q80 = g.dequantize("q8_0")
    assert q80[:5].tolist() == [-32.0, -0.25, 0.0, 0.25, 31.75]
    assert q80.tolist() == Q8_0_VALUES * 2


def test_dequantize_matches_gguf_package_quantizer():
    """Random data quantized by the ``gguf`` package, dequantized by us vs by it."""
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as T

    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for ours, theirs in [(GGMLType.Q4_0, T.Q4_0), (GGMLType.Q4_1, T.Q4_1),
                         (GGMLType.Q8_0, T.Q8_0), (GGMLType.F16, T.F16), (GGMLType.BF16, T.BF16)]:
        packed = gq.quantize(x, theirs)
        mine = dequantize(packed.view(np.uint8), ours, x.size)
        ref = gq.dequantize(packed, theirs).astype(np.float32).reshape(-1)
        np.testing.assert_array_equal(mine, ref, err_msg=ours.name)


def test_reader_accepts_gguf_package_writer(tmp_path):
    """A file written by the ``gguf`` package (v3) parses identically."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("x.u32", 7)
    w.add_string("x.s", "text")
    w.add_array("x.a", [1.5, 2.5])
    w.add_token_list(["<a>", "b"])
    data = np.arange(64, dtype=np.float32).reshape(2, 32)
    w.add_tensor("w", gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("v", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = read_gguf(path)
    assert g.metadata["x.u32"] == 7 and g.metadata["x.s"] == "text"
    assert g.metadata["x.a"].tolist() == [1.5, 2.5]
    assert g.metadata["tokenizer.ggml.tokens"] == ["<a>", "b"]
    assert g.tensors["w"].shape == (2, 32) and g.tensors["w"].ggml_type == GGMLType.Q8_0
    torch.testing.assert_close(g.dequantize("v"), torch.from_numpy(data), rtol=0, atol=0)
    # Q8_0 rounding error is at most half a step: d/2 = max|x| / 254 (~0.25 for rows up to 63).
    torch.testing.assert_close(g.dequantize("w"), torch.from_numpy(data), rtol=0, atol=0.26)


# ----------------------------------------------------------------------------
# Corrupt and hostile files
# ----------------------------------------------------------------------------

def _write(tmp_path: Path, blob: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def _expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ValueError) as exc:
        read_gguf(path)
    msg = str(exc.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def test_bad_magic_and_versions(tmp_path, synthetic):
    _, blob, _ = synthetic
    _expect_error(_write(tmp_path, b"GGML" + blob[4:]), "magic", "offset 0", "b'GGML'")
    _expect_error(_write(tmp_path, b""), "empty")
    for version, hint in [(1, "v1"), (4, "unsupported GGUF version 4"),
                          (3 << 24, "big-endian")]:
        bad = blob[:4] + struct.pack("<I", version) + blob[8:]
        _expect_error(_write(tmp_path, bad), "version", "offset 4", hint)
    blob2, _ = build_gguf(ALL_KVS, ALL_TENSORS, version=2, alignment=64)
    assert read_gguf(_write(tmp_path, blob2)).version == 2


@pytest.mark.parametrize("cut", [2, 10, 30, 100, 400, -1])
def test_truncated_files(tmp_path, synthetic, cut):
    _, blob, sections = synthetic
    end = len(blob) - 1 if cut == -1 else cut
    msg = _expect_error(_write(tmp_path, blob[:end]), "offset")
    assert any(w in msg for w in ("truncated", "past the end", "left", "magic")), msg


def test_absurd_counts_and_lengths(tmp_path, synthetic):
    _, blob, sections = synthetic
    # KV count: u64 at offset 16.
    bad = blob[:16] + struct.pack("<Q", 10**12) + blob[24:]
    _expect_error(_write(tmp_path, bad), "metadata KV count", "offset 16")
    bad = blob[:8] + struct.pack("<Q", 10**15) + blob[16:]
    _expect_error(_write(tmp_path, bad), "tensor count", "offset 8")
    # First key's string length (first bytes of the KV section) larger than the file.
    at = sections["kv"]
    bad = blob[:at] + struct.pack("<Q", 2**40) + blob[at + 8:]
    _expect_error(_write(tmp_path, bad), "metadata KV #0 key", f"offset {at}", "string length")


def test_absurd_array_length_and_unknown_types(tmp_path):
    kvs = [("a", V.ARRAY, [1, 2], V.UINT32)]
    blob, sec = build_gguf(kvs, [])
    count_at = sec["kv"] + 8 + 1 + 4 + 4  # key len, "a", value type, element type
    bad = blob[:count_at] + struct.pack("<Q", 2**50) + blob[count_at + 8:]
    _expect_error(_write(tmp_path, bad), "metadata 'a'", "array of", f"offset {count_at}")
    type_at = sec["kv"] + 8 + 1
    bad = blob[:type_at] + struct.pack("<I", 77) + blob[type_at + 4:]
    _expect_error(_write(tmp_path, bad), "unknown value type 77", f"offset {type_at}")
    blob, sec = build_gguf([], [("t", [32], 999, b"\0" * 64)])
    _expect_error(_write(tmp_path, blob), "tensor 't' type", "unknown ggml type 999")


def test_bad_tensor_infos(tmp_path):
    good = ("t", [32], GGMLType.Q8_0, Q8_0_BLOCK)
    # Data runs past the end of the file.
    blob, _ = build_gguf([], [good])
    _expect_error(_write(tmp_path, blob[:-10]), "tensor 't' data", "past the end")
    # Offset not aligned, and offset far outside the file.
    blob, sec = build_gguf([], [good])
    # name (u64 + "t"), n_dims, one dim, type, then the u64 offset.
    off_at = sec["infos"] + 8 + 1 + 4 + 8 + 4
    for offset, fragment in [(3, "not a multiple of the alignment"), (2**40, "past the end")]:
        bad = blob[:off_at] + struct.pack("<Q", offset) + blob[off_at + 8:]
        _expect_error(_write(tmp_path, bad), "tensor 't'", fragment)
    # Too many dimensions, zero-sized dims, block-size mismatch, duplicates.
    blob, _ = build_gguf([], [("t", [32, 1, 1, 1, 1], GGMLType.F32, b"\0" * 128)])
    _expect_error(_write(tmp_path, blob), "tensor 't' n_dims", "5 dimensions")
    blob, _ = build_gguf([], [("t", [0], GGMLType.F32, b"")])
    _expect_error(_write(tmp_path, blob), "zero-sized")
    blob, _ = build_gguf([], [("t", [16], GGMLType.Q4_1, b"\0" * 20)])
    _expect_error(_write(tmp_path, blob), "not a multiple of the Q4_1 block size 32")
    blob, _ = build_gguf([], [good, good])
    _expect_error(_write(tmp_path, blob), "duplicate tensor name")
    blob, _ = build_gguf([("k", V.UINT8, 1), ("k", V.UINT8, 2)], [])
    _expect_error(_write(tmp_path, blob), "duplicate key")
    blob, _ = build_gguf([("general.alignment", V.UINT32, 48)], [])
    _expect_error(_write(tmp_path, blob), "general.alignment", "power-of-two")


def test_overlapping_tensors(tmp_path):
    blob, sec = build_gguf([], [("a", [32], GGMLType.F32, b"\0" * 128),
                                ("b", [32], GGMLType.F32, b"\0" * 128)])
    # Point "b" at offset 32, inside "a".
    info_len = 8 + 1 + 4 + 8 + 4 + 8  # name, n_dims, one dim, type, offset
    b_off_at = sec["infos"] + 2 * info_len - 8
    bad = blob[:b_off_at] + struct.pack("<Q", 32) + blob[b_off_at + 8:]
    _expect_error(_write(tmp_path, bad), "tensor 'b'", "overlaps tensor 'a'")


def test_unsupported_type_and_missing_tensor(tmp_path):
    # Q8_1 is llama.cpp's activation-only type: the gguf package cannot dequantize it.
    # Q6_K can be (through the package), and the reader sizes both from the block table.
    blob, _ = build_gguf([], [("k", [64], GGMLType.Q8_1, b"\0" * 80),
                              ("six", [256], GGMLType.Q6_K, b"\0" * 210)])
    g = read_gguf(_write(tmp_path, blob))
    assert g.tensors["k"].n_bytes == 80 and g.tensors["six"].n_bytes == 210
    with pytest.raises(NotImplementedError, match=r"bad\.gguf: tensor 'k'.*Q8_1"):
        g.dequantize("k")
    assert g.dequantize("six").tolist() == [0.0] * 256
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        g.dequantize("nope")
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "missing.gguf")


# ----------------------------------------------------------------------------
# The real embedded model
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_path() -> Path:
    from qdec.models.llama import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_real_file_header(real_path):
    g = read_gguf(real_path)
    assert g.version == 3 and len(g.tensors) == 272
    types = {t.ggml_type for t in g}
    assert types == {GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.F32}
    assert g.tensors["token_embd.weight"].ggml_type == GGMLType.Q8_0
    assert g.tensors["token_embd.weight"].shape == (49152, 576)
    assert g.tensors["blk.0.attn_q.weight"].shape == (576, 576)
    assert g.tensors["blk.0.attn_k.weight"].shape == (192, 576)
    assert g.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
    assert g.metadata["llama.block_count"] == 30
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152


def test_real_tensors_match_gguf_package(real_path):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize as ref_dequantize

    ours = read_gguf(real_path)
    reader = gguf.GGUFReader(str(real_path))
    wanted = {"blk.3.attn_q.weight", "blk.0.ffn_norm.weight", "token_embd.weight"}
    for t in reader.tensors:
        if t.name not in wanted:
            continue
        ref = np.asarray(ref_dequantize(t.data, t.tensor_type), dtype=np.float32)
        mine = ours.dequantize(t.name)
        assert int(t.data_offset) == ours.tensors[t.name].file_offset
        np.testing.assert_array_equal(mine.numpy(), ref.reshape(mine.shape), err_msg=t.name)
    for key in ("llama.rope.freq_base", "general.name", "tokenizer.ggml.bos_token_id"):
        assert ours.metadata[key] == reader.fields[key].contents()


# sha256 of the float32 bytes of Hugging Face-named weights of the embedded SmolLM2
# GGUF after dequantization and the Q/K row un-permutation, as computed by the
# project's own numpy dequantizer before it was replaced by gguf.quants (commit
# 3e14ae1, qdec.models.llama.llama_state_dict_from_gguf). The replacement must be
# bit-identical, Q/K order included.
PINNED_SHA256 = {
    "model.layers.0.self_attn.q_proj.weight":
        "54b377bbfa2deab945dfdba7fb59e0ca3eb74329358bd1b53b635b3ff37c1a56",
    "model.layers.0.self_attn.k_proj.weight":
        "814d239237d0643a10d9468d42e617b687ef032f85ad617389de27cf27f6fd34",
    "model.layers.29.self_attn.q_proj.weight":
        "2f39f8002e96772faadb7667719e615167fe314589ce699ce97a007e33f2f298",
    "model.layers.29.self_attn.k_proj.weight":
        "8e99b2450d5f3d53731f52790cc82f80b04341e533306bcfee6669ffa3c79921",
    "model.layers.7.mlp.down_proj.weight":
        "9d3af8b67d13c727ae5ffe470464163b9cac42eb494525392bd3e79c8db73880",
    "model.embed_tokens.weight":
        "3fd491c8066dd9dc1a2bf6796701526c82817d95c0ecabacdef3013c2b8bbbaa",
    "model.norm.weight": "3b87f8e27335e67fc08f159cabfd2d18f205d6c5b225a6f978153552bf01d559",
}
# The same over every tensor (names sorted, each name's bytes then its float32 data).
PINNED_ALL_SHA256 = "785e20b3e653276b0579b744214a1186d730ba80af04f397f642d6432e5e0154"


def test_real_llama_weights_bit_identical_to_the_previous_dequantizer(real_path):
    import hashlib

    from qdec.models.llama import llama_state_dict_from_gguf

    state = llama_state_dict_from_gguf(read_gguf(real_path))
    assert len(state) == 272

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()

    for name, expected in PINNED_SHA256.items():
        assert digest(state[name]) == expected, name
    everything = hashlib.sha256()
    for name in sorted(state):
        everything.update(name.encode())
        everything.update(state[name].contiguous().numpy().tobytes())
    assert everything.hexdigest() == PINNED_ALL_SHA256


def test_plain_types_the_gguf_package_does_not_dequantize(tmp_path):
    # F64 and I8..I64 are converted by this module (gguf.quants raises for them).
    f64 = np.array([1.5, -2.25], dtype="<f8")
    i8 = np.array([-128, 0, 127, 5], dtype="<i1")
    i32 = np.array([-(2**31), 7], dtype="<i4")
    i64 = np.array([2**40, -3], dtype="<i8")
    blob, _ = build_gguf([], [("f64", [2], GGMLType.F64, f64.tobytes()),
                              ("i8", [4], GGMLType.I8, i8.tobytes()),
                              ("i32", [2], GGMLType.I32, i32.tobytes()),
                              ("i64", [2], GGMLType.I64, i64.tobytes())])
    g = read_gguf(_write(tmp_path, blob, "plain.gguf"))
    for name, values in [("f64", f64), ("i8", i8), ("i32", i32), ("i64", i64)]:
        got = g.dequantize(name)
        assert got.dtype == torch.float32 and got.tolist() == values.astype(np.float32).tolist()
    with pytest.raises(ValueError, match="expected 8 bytes"):
        dequantize(np.zeros(5, np.uint8), GGMLType.F64, 1)
