"""Prints, one per line, the flags that a given torch's BuildExtension passes
when it compiles qdec's sources (`cxx` for the C++ files, `nvcc` for the CUDA
ones), read from that torch's cpp_extension.py without importing that torch:
so CI, which has torch 2.13, can compile against torch 2.11's headers with the
flags torch 2.11 would use (the GPU machine's torch).

    python .ci/torch_build_flags.py path/to/torch/utils/cpp_extension.py cxx|nvcc

Our own flags come from setup.compile_args; torch's part is its
COMMON_NVCC_FLAGS and its rule for the C++ standard (add a default -std only
when none is given), which this script runs from the file itself, not from a
copy, so that a torch whose rule differs is seen as it is. Where torch adds
further flags (include paths, -fPIC, the architecture), check_cuda.sh passes
its own.
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STD_RULE = "append_std17_if_no_std_present"  # its name in torch 2.11 and 2.13 alike


def load_torch_rules(cpp_extension: Path):
    tree = ast.parse(cpp_extension.read_text(), str(cpp_extension))
    common_nvcc = rule = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "COMMON_NVCC_FLAGS" for t in node.targets):
            common_nvcc = ast.literal_eval(node.value)
        if isinstance(node, ast.FunctionDef) and node.name == STD_RULE and rule is None:
            rule = node
    if common_nvcc is None or rule is None:
        raise SystemExit(f"{cpp_extension}: no COMMON_NVCC_FLAGS or {STD_RULE}(); "
                         "this torch builds extensions differently, update this script")
    # The rule is a closure over BuildExtension's `self` (it asks for the
    # compiler type); run on its own, `self` resolves to this stand-in.
    namespace = {"self": types.SimpleNamespace(
        compiler=types.SimpleNamespace(compiler_type="unix"))}
    exec(compile(ast.Module(body=[rule], type_ignores=[]), str(cpp_extension), "exec"), namespace)
    return common_nvcc, namespace[STD_RULE]


def build_flags(cpp_extension: Path, kind: str) -> list[str]:
    sys.path.insert(0, str(ROOT))
    import setup  # noqa: E402  (the repository's setup.py; main() runs only as a script)

    common_nvcc, add_default_std = load_torch_rules(cpp_extension)
    ours = setup.compile_args(cuda=True)
    # BuildExtension (ninja, unix): cxx = extension flags; nvcc = COMMON_NVCC_FLAGS
    # + extension flags; then the default standard into each if none is there.
    flags = list(ours["cxx"]) if kind == "cxx" else common_nvcc + ours["nvcc"]
    flags = ["-DTORCH_API_INCLUDE_EXTENSION_H", *flags]
    add_default_std(flags)
    stds = [f for f in flags if f.startswith("-std=")]
    if len(stds) != 1:  # nvcc refuses a second -std
        raise SystemExit(f"{kind}: expected one -std flag, got {stds}")
    return flags


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("cxx", "nvcc"):
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(build_flags(Path(argv[0]), argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
