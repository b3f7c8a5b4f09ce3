"""QDEC: dynamic error compensation for low-bit LLM decoding.

Importing ``qdec`` loads the compiled extension ``qdec._C``, which registers the
``torch.ops.qdec.*`` operators (CPU, and CUDA when built with it), and the fake
kernels of :mod:`qdec.ops` for ``torch.compile`` and export. It also arranges for
quantization method ``"qdec"`` to be registered with transformers when its
quantizer registry is imported (:mod:`qdec.hf`), so that
``AutoModelForCausalLM.from_pretrained(qdec_checkpoint_dir)`` builds ``QDECLinear``
layers; :func:`configure` then sets ``k`` and the selection policy.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (loads the shared library: registers the ops)
from . import ops
from .ops import (
    compensated_linear,
    cpu_activations,
    cpu_isa,
    dequantize,
    lowrank_linear,
    outlier_select,
    parallel_threads,
    quantized_matmul,
    residual_gather,
    set_cpu_activations,
    set_cpu_isa,
)
from .patch import configure
from . import hf as _hf

_hf.install_import_hook()  # registers "qdec" with transformers once it is imported

__version__ = "0.1.0"

__all__ = [
    "compensated_linear",
    "configure",
    "cpu_activations",
    "cpu_isa",
    "dequantize",
    "lowrank_linear",
    "ops",
    "outlier_select",
    "parallel_threads",
    "quantized_matmul",
    "residual_gather",
    "set_cpu_activations",
    "set_cpu_isa",
]
