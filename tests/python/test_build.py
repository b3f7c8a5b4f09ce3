"""The build's single source list (csrc/sources.txt) covers every kernel file,
so setup.py and CMakeLists.txt, which both read it, cannot drift apart; and
the C++ standard reaches the compilers whatever torch's default."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[2]


def _listed() -> set[str]:
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return {ln.split("#")[0].strip() for ln in lines} - {"", "[cpu]", "[cuda]"}


def test_every_op_source_is_listed():
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "ops").rglob("*")
               if p.suffix in (".cpp", ".cu")}
    assert on_disk - _listed() == set(), "add these files to csrc/sources.txt"
    assert {p for p in _listed() if not (ROOT / p).exists()} == set(), "listed but missing"


def test_cmake_and_setup_read_the_same_list():
    assert "sources.txt" in (ROOT / "CMakeLists.txt").read_text()
    assert "sources.txt" in (ROOT / "setup.py").read_text()


def test_the_cxx_standard_is_ours_not_torchs_default():
    # Torch adds its default -std only when none is given (2.11: c++17, too
    # old for these sources; 2.13: c++20). .ci/torch_build_flags.py runs that
    # rule from torch's own cpp_extension.py, here the installed torch's;
    # .ci/check_torch211.sh runs it from torch 2.11's and compiles with it.
    sys.path[:0] = [str(ROOT / ".ci"), str(ROOT)]  # the scripts, not packages
    import setup
    import torch_build_flags

    cpp_extension = Path(torch.utils.cpp_extension.__file__)
    _, add_default_std = torch_build_flags.load_torch_rules(cpp_extension)
    bare = ["-O3"]
    add_default_std(bare)
    assert len(bare) == 2 and bare[1].startswith("-std=c++")  # the rule ran
    for kind in ("cxx", "nvcc"):
        flags = torch_build_flags.build_flags(cpp_extension, kind)
        assert [f for f in flags if f.startswith("-std=")] == [setup.CXX_STD], kind


def test_the_build_says_what_it_compiles(capsys, monkeypatch):
    """setup.py lists the sources it is about to compile before the minutes of
    compiling (pip install -v shows it)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import setup

    monkeypatch.setenv("QDEC_USE_CUDA", "0")
    monkeypatch.setenv("MAX_JOBS", "1")
    (ext,) = setup.extensions()
    err = capsys.readouterr().err
    assert f"building qdec._C (CPU only) from {len(ext.sources)} sources with MAX_JOBS=1" in err
    assert all(src in err for src in ext.sources)
