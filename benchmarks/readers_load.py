"""Load time and peak memory of the file readers against the libraries they build on.

Why parts of :mod:`qdec.models.gguf` and :mod:`qdec.formats.safetensors_io` are
still the project's own rests on these numbers. Each case runs in a fresh Python
process (one thread) and records seconds and the process's peak RSS
(``VmHWM``) beside its RSS after the imports:

* ``gguf_ours``: :func:`qdec.models.gguf.read_gguf` (our header parser), then every
  tensor dequantized (through ``gguf.quants``);
* ``gguf_library``: ``gguf.GGUFReader`` and ``gguf.quants.dequantize`` alone;
* ``safetensors_ours``: :class:`qdec.formats.safetensors_io.SafetensorsFile`
  (``safe_open`` plus our checks) opening a ~100 MB file, then every tensor read;
* ``safetensors_library``: ``safetensors.safe_open`` alone;
* ``write_ours`` / ``write_library``: :func:`~qdec.formats.safetensors_io.save_safetensors`
  vs ``safetensors.torch.save_file`` for the same ~100 MB of tensors.

    python benchmarks/readers_load.py          # writes benchmarks/results/readers_load.json
    python benchmarks/readers_load.py --gguf model.gguf --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("gguf_ours", "gguf_library", "safetensors_ours", "safetensors_library", "write_ours",
         "write_library")


def _rss_mb() -> float:
    """Peak RSS of this process image in MB: VmHWM, which exec resets (ru_maxrss
    would carry over the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tensors_100mb() -> dict:
    """~100 MB in 72 tensors: F16 [1024, 1024] and F32 [512, 1024] matrices, F32 vectors."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(24):
        out[f"model.layers.{i}.mlp.weight"] = torch.randn(1024, 1024, generator=g).half()
        out[f"model.layers.{i}.attn.weight"] = torch.randn(512, 1024, generator=g)
        out[f"model.layers.{i}.norm.weight"] = torch.randn(1024, generator=g)
    return out


def run_case(case: str, gguf_path: str, st_path: str) -> dict:
    """One measurement, in this process (the parent starts a fresh one per case)."""
    import numpy as np

    result: dict = {"case": case}
    if case.startswith("gguf"):
        import gguf
        from gguf.quants import dequantize

        from qdec.models.gguf import read_gguf

        result["rss_after_imports_mb"] = round(_rss_mb(), 1)
        t0 = time.perf_counter()
        if case == "gguf_ours":
            g = read_gguf(gguf_path)
            t1 = time.perf_counter()
            n = sum(g.dequantize(name).numel() for name in g.tensors)
        else:
            reader = gguf.GGUFReader(gguf_path)
            t1 = time.perf_counter()
            n = sum(np.asarray(dequantize(t.data, t.tensor_type)).size for t in reader.tensors)
        result.update(open_s=round(t1 - t0, 3), dequantize_all_s=round(time.perf_counter() - t1, 3),
                      elements=int(n))
    elif case.startswith("safetensors"):
        from safetensors import safe_open

        from qdec.formats.safetensors_io import SafetensorsFile

        result["rss_after_imports_mb"] = round(_rss_mb(), 1)
        t0 = time.perf_counter()
        if case == "safetensors_ours":
            f = SafetensorsFile(st_path)
            tensors = f.tensors()
        else:
            f = safe_open(st_path, framework="pt")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        t1 = time.perf_counter()
        total = sum(float(t.double().sum()) for t in tensors.values())  # touch every page
        result.update(open_s=round(t1 - t0, 4), read_all_s=round(time.perf_counter() - t1, 3),
                      checksum=total)
    else:
        from safetensors.torch import save_file

        from qdec.formats.safetensors_io import save_safetensors

        tensors = _tensors_100mb()
        result["rss_after_imports_mb"] = round(_rss_mb(), 1)  # and after making the tensors
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "w.safetensors")
            t0 = time.perf_counter()
            if case == "write_ours":
                save_safetensors(tensors, out)
            else:
                save_file(tensors, out)
            result.update(write_s=round(time.perf_counter() - t0, 3),
                          bytes=os.path.getsize(out))
    result["peak_rss_mb"] = round(_rss_mb(), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default=None,
                        help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/readers_load.json"),
                        help="result JSON (default: %(default)s)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--safetensors", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.gguf, args.safetensors)))
        return

    from qdec.formats.safetensors_io import save_safetensors, write_json_atomic
    from qdec.models.llama import default_model_path

    gguf_path = args.gguf or str(default_model_path())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        st_path = os.path.join(tmp, "big.safetensors")
        save_safetensors(_tensors_100mb(), st_path)
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--case", case, "--gguf", gguf_path,
                                  "--safetensors", st_path], env=env, check=True,
                                 capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(results[-1], flush=True)
        st_bytes = os.path.getsize(st_path)
    write_json_atomic({"gguf_file": os.path.basename(gguf_path), "safetensors_bytes": st_bytes,
                       "versions": {name: importlib.metadata.version(name)
                                    for name in ("gguf", "safetensors", "torch")},
                       "machine": platform.processor() or platform.machine(),
                       "threads": 1, "results": results}, args.out, overwrite=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
