"""QDEC: dynamic error compensation for low-bit LLM decoding.

Importing ``qdec`` loads the compiled extension ``qdec._C``, which registers the
``torch.ops.qdec.*`` operators (CPU, and CUDA when built with it), and the fake
kernels of :mod:`qdec.ops` for ``torch.compile`` and export.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (loads the shared library: registers the ops)
from . import ops
from .ops import (
    compensated_linear,
    cpu_isa,
    dequantize,
    lowrank_linear,
    outlier_select,
    quantized_matmul,
    residual_gather,
    set_cpu_isa,
)

__version__ = "0.1.0"

__all__ = [
    "compensated_linear",
    "cpu_isa",
    "dequantize",
    "lowrank_linear",
    "ops",
    "outlier_select",
    "quantized_matmul",
    "residual_gather",
    "set_cpu_isa",
]
