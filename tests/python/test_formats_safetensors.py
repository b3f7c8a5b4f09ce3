"""The strict safetensors reader, the atomic writers, sharded directories and the
pickle refusal (qdec.formats.safetensors_io)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from qdec.formats import safetensors_io as st
from qdec.formats.safetensors_io import (
    FormatError,
    SafetensorsFile,
    atomic_directory,
    load_safetensors,
    load_state_dict_dir,
    load_state_dict_file,
    read_header,
    save_safetensors,
)


def raw_file(path, header, data: bytes = b"", header_len: int | None = None) -> str:
    """Write a safetensors-like file by hand: ``header`` is a dict (JSON-encoded) or
    raw bytes; ``header_len`` overrides the length field."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if header_len is None else header_len))
        f.write(blob)
        f.write(data)
    return str(path)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w16": torch.randn(3, 5, generator=g).half(),
        "bf": torch.randn(2, 4, generator=g).bfloat16(),
        "i32": torch.arange(-3, 4, dtype=torch.int32),
        "u8": torch.arange(10, dtype=torch.uint8).reshape(2, 5),
        "f64": torch.randn(2, generator=g).double(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "flags": torch.tensor([True, False, True]),
        "i64": torch.tensor([1 << 40, -5]),
    }


# --- round trips and interoperability ----------------------------------------------


def test_round_trip_and_metadata(tmp_path):
    t = sample_tensors()
    path = tmp_path / "a.safetensors"
    save_safetensors(t, path, {"format": "pt", "note": "ü"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt", "note": "ü"}
    assert sorted(f.keys()) == sorted(t)
    for name, tensor in t.items():
        got = f.get(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor), name
    # The header is padded to 8 bytes, and every tensor is aligned to its item size.
    h = read_header(path)
    assert h.data_start % 8 == 0
    for info in h.tensors.values():
        assert (h.data_start + info.begin) % st.DTYPES[info.dtype][1] == 0


def test_interop_with_the_safetensors_package(tmp_path):
    from safetensors.torch import load_file, save_file

    t = sample_tensors()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_safetensors(t, ours, {"k": "v"})
    save_file(t, str(theirs), metadata={"k": "v"})
    for name, tensor in load_file(str(ours)).items():
        assert torch.equal(tensor, t[name])
    for name, tensor in load_safetensors(theirs).items():
        assert torch.equal(tensor, t[name])
    assert read_header(theirs).metadata == {"k": "v"}


def test_writes_non_contiguous_and_returned_tensors_do_not_write_through(tmp_path):
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = tmp_path / "x.safetensors"
    save_safetensors({"xt": x.t()}, path)
    got = load_safetensors(path)["xt"]
    assert torch.equal(got, x.t())
    got[0, 0] = 99.0  # copy-on-write mapping: the file keeps its bytes
    assert load_safetensors(path)["xt"][0, 0] == 0.0


def test_misaligned_offsets_are_read_by_copy(tmp_path):
    # Legal but unusual: an F32 tensor at data offset 2.
    data = torch.tensor([7], dtype=torch.int16).numpy().tobytes()
    data += torch.tensor([1.5, -2.0]).numpy().tobytes()
    header = {"a": entry("I16", [1], 0, 2), "b": entry("F32", [2], 2, 10)}
    path = raw_file(tmp_path / "m.safetensors", header, data)
    out = load_safetensors(path)
    assert out["a"].item() == 7 and out["b"].tolist() == [1.5, -2.0]


def test_writer_refuses_existing_file_and_bad_input(tmp_path):
    path = tmp_path / "a.safetensors"
    save_safetensors({"a": torch.ones(2)}, path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_safetensors({"a": torch.zeros(2)}, path)
    save_safetensors({"a": torch.zeros(2)}, path, overwrite=True)
    assert load_safetensors(path)["a"].tolist() == [0.0, 0.0]
    with pytest.raises(FormatError, match="metadata"):
        save_safetensors({"a": torch.ones(1)}, tmp_path / "b.safetensors", {"k": 1})
    with pytest.raises(FormatError, match="invalid tensor name"):
        save_safetensors({"__metadata__": torch.ones(1)}, tmp_path / "c.safetensors")
    with pytest.raises(FormatError, match="not a torch.Tensor"):
        save_safetensors({"a": [1, 2]}, tmp_path / "d.safetensors")
    with pytest.raises(FormatError, match="no safetensors encoding"):
        save_safetensors({"a": torch.ones(1, dtype=torch.complex64)}, tmp_path / "e.safetensors")


def test_writer_failure_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(st.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"a": torch.ones(4)}, path)
    assert os.listdir(tmp_path) == []


# --- corrupt files -------------------------------------------------------------------


def valid_file(tmp_path) -> str:
    path = tmp_path / "v.safetensors"
    save_safetensors({"alpha": torch.ones(4), "beta": torch.arange(6, dtype=torch.int32)}, path)
    return str(path)


def test_truncated_data(tmp_path):
    path = valid_file(tmp_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(FormatError, match=r"v\.safetensors.*tensor '(alpha|beta)'.*truncated"):
        read_header(path)


def test_header_length_larger_than_file(tmp_path):
    path = raw_file(tmp_path / "h.safetensors", {"a": entry("F32", [1], 0, 4)}, b"\0" * 4,
                    header_len=10_000)
    with pytest.raises(FormatError,
                       match=r"h\.safetensors: .*invalid header length.*says 10000 header bytes"):
        read_header(path)


def test_header_over_100_mb(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(100_000_100)  # sparse: costs no disk space
    with pytest.raises(FormatError, match=r"big\.safetensors: .*header too large"):
        read_header(path)


def test_file_too_short(tmp_path):
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(FormatError,
                       match=r"s\.safetensors: .*header too small.*the file has 2 bytes"):
        read_header(path)


def test_offsets_out_of_range(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 8, 16)}
    path = raw_file(tmp_path / "o.safetensors", header, b"\0" * 12)
    with pytest.raises(FormatError, match=r"tensor 'b': data_offsets end 16 lies beyond"):
        read_header(path)


def test_overlapping_offsets(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}
    path = raw_file(tmp_path / "o.safetensors", header, b"\0" * 12)
    with pytest.raises(FormatError, match=r"o\.safetensors: tensor 'b': .*invalid offset"):
        read_header(path)


def test_gap_and_trailing_bytes(tmp_path):
    header = {"a": entry("F32", [1], 4, 8)}
    path = raw_file(tmp_path / "g.safetensors", header, b"\0" * 8)
    with pytest.raises(FormatError, match=r"g\.safetensors: tensor 'a': .*invalid offset"):
        read_header(path)
    path = raw_file(tmp_path / "t.safetensors", {"a": entry("F32", [1], 0, 4)}, b"\0" * 6)
    with pytest.raises(FormatError, match=r"t\.safetensors: .*not fully covered"):
        read_header(path)


def test_size_mismatch(tmp_path):
    header = {"w": entry("F16", [2, 3], 0, 8)}
    path = raw_file(tmp_path / "z.safetensors", header, b"\0" * 8)
    with pytest.raises(FormatError, match=r"tensor 'w'.*span 8 bytes; F16 \[2, 3\] needs 12"):
        read_header(path)


def test_not_json_not_utf8_not_object(tmp_path):
    path = raw_file(tmp_path / "j.safetensors", b"{not json")
    with pytest.raises(FormatError, match=r"j\.safetensors: .*invalid JSON"):
        read_header(path)
    path = raw_file(tmp_path / "u.safetensors", b'{"\xff\xfe": 1}')
    with pytest.raises(FormatError, match=r"u\.safetensors: .*invalid UTF-8"):
        read_header(path)
    path = raw_file(tmp_path / "l.safetensors", b"[1, 2]")
    with pytest.raises(FormatError, match=r"l\.safetensors: .*invalid type: sequence"):
        read_header(path)


@pytest.mark.parametrize("bad, message", [
    ({"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}, "unknown variant `F12`"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "integer `-1`, expected usize"),
    ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "floating point `1.0`"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "invalid offset for tensor `t`"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "expected a tuple of size 2"),
    ({"dtype": "F32", "shape": [1]}, "missing field `data_offsets`"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}, r"unexpected \['x'\]"),
    ([1, 2], "expected string or map"),
])
def test_bad_entries(tmp_path, bad, message):
    path = raw_file(tmp_path / "e.safetensors", {"t": bad}, b"\0" * 4)
    with pytest.raises(FormatError, match=rf"e\.safetensors: tensor 't'.*{message}"):
        read_header(path)


def test_bad_metadata_and_duplicate_keys(tmp_path):
    path = raw_file(tmp_path / "m.safetensors", {"__metadata__": {"a": 1}})
    with pytest.raises(FormatError, match="__metadata__ must map strings to strings"):
        read_header(path)
    blob = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, ' \
           b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    path = raw_file(tmp_path / "d.safetensors", blob, b"\0")
    with pytest.raises(FormatError, match="key 'a' twice"):
        read_header(path)


def test_missing_tensor_and_wrong_dtype_or_shape(tmp_path):
    f = SafetensorsFile(valid_file(tmp_path))
    with pytest.raises(FormatError, match=r"v\.safetensors: missing tensor 'gamma'"):
        f.get("gamma")
    with pytest.raises(FormatError, match=r"tensor 'alpha' has dtype F32; expected F16"):
        f.get("alpha", torch.float16)
    with pytest.raises(FormatError, match=r"tensor 'beta' has shape \[6\]; expected \[2, 3\]"):
        f.get("beta", torch.int32, (2, 3))


# --- pickle refusal, sharded directories ----------------------------------------------


@pytest.mark.parametrize("name", ["w.pt", "w.bin", "w.pth", "disguised.safetensors"])
def test_pickle_refused_unless_allowed(tmp_path, name):
    path = tmp_path / name
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(FormatError, match="refusing to load a pickle checkpoint"):
        load_state_dict_file(path)
    assert load_state_dict_file(path, allow_pickle=True)["a"].tolist() == [1.0, 1.0]


def test_directory_with_only_pickle_weights(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FormatError, match="only pickle weights"):
        load_state_dict_dir(tmp_path)
    assert set(load_state_dict_dir(tmp_path, allow_pickle=True)) == {"a"}


def write_sharded(tmp_path, weight_map=None):
    save_safetensors({"a": torch.ones(2), "b": torch.zeros(3)}, tmp_path / "s1.safetensors",
                     overwrite=True)
    save_safetensors({"c": torch.arange(4)}, tmp_path / "s2.safetensors", overwrite=True)
    weight_map = weight_map or {"a": "s1.safetensors", "b": "s1.safetensors",
                                "c": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_directory(tmp_path):
    write_sharded(tmp_path)
    state = load_state_dict_dir(tmp_path)
    assert sorted(state) == ["a", "b", "c"] and state["c"].tolist() == [0, 1, 2, 3]


def test_sharded_directory_errors(tmp_path):
    write_sharded(tmp_path, {"a": "s1.safetensors", "z": "s1.safetensors"})
    with pytest.raises(FormatError, match=r"s1\.safetensors: missing tensor 'z'"):
        load_state_dict_dir(tmp_path)
    write_sharded(tmp_path, {"a": "s9.safetensors"})
    with pytest.raises(FormatError, match=r"shard 's9\.safetensors'.*does not exist"):
        load_state_dict_dir(tmp_path)
    write_sharded(tmp_path, {"a": "../s1.safetensors"})
    with pytest.raises(FormatError, match="plain file name"):
        load_state_dict_dir(tmp_path)
    write_sharded(tmp_path)
    save_safetensors({"a": torch.ones(1), "c": torch.arange(4)}, tmp_path / "s2.safetensors",
                     overwrite=True)
    with pytest.raises(FormatError, match="tensor 'a' also appears in"):
        load_state_dict_dir(tmp_path)


# --- atomic directories ------------------------------------------------------------------


def test_atomic_directory(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_directory(out) as tmp:
        (tmp / "f.txt").write_text("one")
        assert not out.exists()
    assert (out / "f.txt").read_text() == "one"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError, match="mid-way"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "f.txt").write_text("two")
            raise RuntimeError("mid-way")
    assert (out / "f.txt").read_text() == "one"  # untouched
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "g.txt").write_text("two")
    assert sorted(os.listdir(out)) == ["g.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporaries left


def test_atomic_directory_failure_leaves_no_output(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ValueError):
        with atomic_directory(out) as tmp:
            save_safetensors({"a": torch.ones(1)}, tmp / "x.safetensors")
            raise ValueError("fail")
    assert os.listdir(tmp_path) == []


def test_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    # A header of exactly 128 bytes makes the file start with 0x80 0x00, the first
    # byte of a pickle PROTO opcode; the reader must not mistake it for one.
    blob = json.dumps({"a": entry("F32", [1], 0, 4)}).encode()
    blob += b" " * (128 - len(blob))
    path = raw_file(tmp_path / "p.safetensors", blob, torch.tensor([3.0]).numpy().tobytes())
    assert open(path, "rb").read(1) == b"\x80"
    assert load_state_dict_file(path)["a"].tolist() == [3.0]


def test_checks_the_library_does_not_make(tmp_path):
    # The safetensors library accepts these; the project refuses them, naming file and tensor.
    path = raw_file(tmp_path / "n.safetensors", {"": entry("F32", [1], 0, 4)}, b"\0" * 4)
    with pytest.raises(FormatError, match=r"n\.safetensors: a tensor has an empty name"):
        read_header(path)
    path = raw_file(tmp_path / "c.safetensors", {"z": entry("C64", [1], 0, 8)}, b"\0" * 8)
    with pytest.raises(FormatError, match=r"c\.safetensors: tensor 'z' has dtype C64, which "
                                          r"torch cannot hold"):
        read_header(path)


def test_reads_after_close_and_missing_file(tmp_path):
    f = SafetensorsFile(valid_file(tmp_path))
    alpha = f.get("alpha")
    f.close()
    assert alpha.tolist() == [1.0] * 4 and f.get("beta").tolist() == list(range(6))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_header(tmp_path / "nope.safetensors")
