"""The build's single source list (csrc/sources.txt) covers every kernel file,
so setup.py and CMakeLists.txt, which both read it, cannot drift apart."""

from __future__ import annotations

from pathlib import Path

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
