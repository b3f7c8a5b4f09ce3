"""benchmarks/gpu_run.sh, the GPU machine's one call, checked without a GPU:
the dry run end to end (steps in order, CUDA steps skipped cleanly, at most 8
files in $OUT), the runner's timeout and failure handling on real processes,
the commit without git, and the test selections of its pytest steps."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["build", "cuda_tests", "bench_gemv", "bench_decode_layer", "tune", "profile",
         "memcheck"]


def load_gpu_run():
    """A fresh copy of benchmarks/gpu_run.py (tests patch its globals)."""
    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "benchmarks" / "gpu_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_run"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "QDEC_GPU_WORK": str(work), "QDEC_GPU_DRY_RUN": "1",
           "QDEC_COMMIT": "abc1234", "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    files = sorted(f.name for f in out.iterdir())
    assert files == ["gpu_run.tar.gz", "summary.json"]  # the device tool returns <= 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["env"]["commit"] == "abc1234"
    assert [s["name"] for s in summary["steps"]] == STEPS
    for s in summary["steps"]:
        assert "wall_s" not in s, s  # nothing but the environment probe ran
        if not torch.cuda.is_available():
            assert (s["status"], s["reason"]) == ("skipped", "no CUDA device"), s
        else:
            assert s["status"] in ("dry_run", "skipped"), s
    with tarfile.open(out / "gpu_run.tar.gz") as tar:
        env_json = json.load(tar.extractfile("gpu_run/env.json"))
    assert env_json["commit"] == "abc1234" and env_json["torch"] == torch.__version__


def test_steps_time_out_fail_and_skip_without_stopping_the_run(tmp_path):
    gpu_run = load_gpu_run()
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    runner = gpu_run.Runner(out, work, budget_s=120, dry_run=False, py=sys.executable)
    runner.summary["env"] = {"cuda_available": False}
    Step = gpu_run.Step
    # The hanging step's child would outlive a plain kill of bash: timeout
    # ends the whole process group.
    hang = Step("hang", 1, ["bash", "-c", "sleep 60 & wait"], needs_cuda=False)
    fail = Step("fail", 30, ["bash", "-c", "echo boom; exit 3"], needs_cuda=False)
    after = Step("after_fail", 30, ["true"], needs_cuda=False, needs_ok=("fail",))
    cuda = Step("cuda", 30, ["true"])
    ok = Step("ok", 30, ["bash", "-c", "echo fine"], needs_cuda=False)
    recs = [runner.run(s) for s in (hang, fail, after, cuda, ok)]
    assert [r["status"] for r in recs] == ["timeout", "failed", "skipped", "skipped", "ok"]
    assert recs[0]["rc"] == 124 and recs[0]["wall_s"] < gpu_run.KILL_AFTER_S
    assert recs[1]["rc"] == 3 and "boom" in recs[1]["log_tail"]
    assert recs[2]["reason"] == "fail did not succeed" and recs[3]["reason"] == "no CUDA device"
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == [r["status"] for r in recs]
    with tarfile.open(out / "gpu_run.tar.gz") as tar:
        assert {"gpu_run/hang.log", "gpu_run/fail.log", "gpu_run/ok.log"} <= set(tar.getnames())
    runner.deadline = 0  # a spent budget skips the step instead of starting it
    assert runner.run(ok)["reason"] == "run budget spent"


def test_commit_without_git(tmp_path, monkeypatch):
    gpu_run = load_gpu_run()
    monkeypatch.setattr(gpu_run, "ROOT", tmp_path)  # a copied tree: no .git
    monkeypatch.delenv("QDEC_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert gpu_run.resolve_commit() == "unknown"
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert gpu_run.resolve_commit() == "unknown"
    (tmp_path / ".qdec_commit").write_text("1234abc\n")  # written before the call
    assert gpu_run.resolve_commit() == "1234abc"
    monkeypatch.setenv("QDEC_COMMIT", "feed123")
    assert gpu_run.resolve_commit() == "feed123"


def _collect_as_if_cuda(*args: str) -> list[str]:
    """Test ids pytest selects with `args`, collected as on a CUDA machine
    (torch.cuda.is_available patched: collection runs no CUDA code)."""
    code = ("import sys, torch, pytest\n"
            "torch.cuda.is_available = lambda: True\n"
            "sys.exit(pytest.main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", code, "--collect-only", "-q",
                        "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [ln for ln in p.stdout.splitlines() if "::" in ln]


def test_cuda_test_step_selects_the_cuda_tests():
    ids = _collect_as_if_cuda("tests/python", "-m", "cuda")
    assert ids and not any("[cpu" in i or "-cpu-" in i or "-cpu]" in i for i in ids)
    for expected in ("test_cuda_ops.py::test_lowrank_linear_cuda_matches_float64",
                     "test_ops.py::test_compensated_linear_matches_reference[cuda",
                     "test_ops.py::test_strided_residual_store_gives_the_contiguous_bits[cuda",
                     "test_ops.py::test_error_on_mixed_devices",
                     "test_lowrank_op.py::test_matches_references_odd_sizes[cuda",
                     "test_lowrank_op.py::test_error_on_mixed_devices",
                     "test_tune.py::test_measure[cuda]"):
        assert any(expected in i for i in ids), expected
    assert not any("test_model.py" in i or "test_gguf.py" in i for i in ids)


def test_memcheck_step_leaves_out_the_large_shapes():
    gpu_run = load_gpu_run()
    ids = _collect_as_if_cuda("tests/python/test_cuda_ops.py", "tests/python/test_ops.py",
                              "-m", "cuda", "-k", gpu_run.MEMCHECK_FILTER)
    assert any("test_lowrank_linear_cuda_matches_float64" in i and "33x100r5" in i for i in ids)
    assert any("strided" in i for i in ids)
    assert not any("4096" in i or "14336" in i for i in ids)
