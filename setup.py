"""Builds the qdec._C extension from the sources listed in csrc/sources.txt.

Build knobs (environment variables):
  QDEC_USE_CUDA         auto (default) | 1 | 0. auto builds the CUDA kernels when
                        torch is a CUDA build AND a CUDA toolkit (nvcc) is found;
                        it never looks at whether a GPU is visible, so a GPU-less
                        build machine still builds CUDA.
  TORCH_CUDA_ARCH_LIST  CUDA architectures, default "8.0;8.6;8.9;9.0+PTX".
  QDEC_DEBUG            1 for -O0 -g (default 0: -O3).
  NVCC_THREADS          parallel nvcc threads per file (default 4).
  MAX_JOBS              parallel compile jobs (torch's ninja knob).
Install with `pip install --no-build-isolation -e .` so the build uses the torch
already installed (an isolated build would download another torch).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_sources() -> dict[str, list[str]]:
    """Sections of csrc/sources.txt: {"cpu": [...], "cuda": [...]}."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections[current] = []
        elif current is None:
            raise SystemExit(f"csrc/sources.txt: source {line!r} before any [section]")
        else:
            sections[current].append(line)
    return sections


def use_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("QDEC_USE_CUDA", "auto").lower()
    if mode in ("0", "off", "false"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("1", "on", "true"):
        if not available:
            raise SystemExit(
                "QDEC_USE_CUDA=1 but torch is a CPU build or no CUDA toolkit was found "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    if mode != "auto":
        raise SystemExit(f"QDEC_USE_CUDA must be auto, 1 or 0, got {mode!r}")
    return available


# The sources are C++20 (template lambdas, designated initializers). Passed
# explicitly because torch's BuildExtension adds its own default standard only
# when none is given, and that default is -std=c++17 in torch 2.11 (the GPU
# machine's) but -std=c++20 in 2.13 (CI's). nvcc refuses two -std flags, which
# is why torch looks for one before adding its own.
CXX_STD = "-std=c++20"
# torch's Linux wheels use GNU OpenMP (libgomp), which -fopenmp links too.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []


def compile_args(cuda: bool) -> dict[str, list[str]]:
    """extra_compile_args of the extension; .ci/torch_build_flags.py reads it
    to compile the sources with the flags an older torch would pass."""
    debug = os.environ.get("QDEC_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # OpenMP: at::parallel_for is a header template whose OpenMP backend is a
    # `#pragma omp parallel`; compiled without -fopenmp it runs every loop on
    # one thread, whatever torch.set_num_threads says. (So it did until this
    # flag: the CPU kernels never used a second thread.)
    args = {"cxx": opt + [CXX_STD, "-fvisibility=hidden"] + OPENMP_FLAGS}
    if cuda:
        args["nvcc"] = opt + [CXX_STD, "--threads", os.environ.get("NVCC_THREADS", "4"),
                              "-lineinfo", "--expt-relaxed-constexpr"]
    return args


def announce(files: list[str], cuda: bool) -> None:
    """Say what is about to be compiled: the build is silent for minutes
    otherwise (``pip install -v`` also shows ninja's ``[i/n]`` line per file)."""
    print(f"qdec: building qdec._C ({'CPU + CUDA' if cuda else 'CPU only'}) from "
          f"{len(files)} sources with MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}: "
          f"{', '.join(files)}", file=sys.stderr, flush=True)


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = read_sources()
    include_dirs = [str(ROOT / "csrc" / "include"), str(ROOT / "csrc")]
    files = sources["cpu"] + ["csrc/python/module.cpp"]
    cuda = use_cuda()
    announce(files + (sources.get("cuda", []) if cuda else []), cuda)
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
        return [
            CUDAExtension(
                "qdec._C",
                files + sources.get("cuda", []),
                include_dirs=include_dirs,
                define_macros=[("QDEC_WITH_CUDA", "1")],
                extra_compile_args=compile_args(cuda=True),
                extra_link_args=OPENMP_FLAGS,
            )
        ]
    return [CppExtension("qdec._C", files, include_dirs=include_dirs,
                         extra_compile_args=compile_args(cuda=False),
                         extra_link_args=OPENMP_FLAGS)]


def main() -> None:
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=find_packages(include=["qdec", "qdec.*"]),
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
