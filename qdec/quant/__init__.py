"""Weight quantizers (RTN, AWQ, GPTQ), the residual quantizer and the
layer-streaming pipeline that produces QDEC's packed weights and residual stores.

* :mod:`.grid`: the uniform grids and :class:`QuantizedWeight` (codes, scales,
  zeros; ``pack()`` / ``dequantize()``).
* :mod:`.rtn`, :mod:`.gptq`, :mod:`.awq`: the quantizers.
* :mod:`.residual`: ``R = W_ref - W_hat`` to a per-row-scaled symmetric grid,
  stored transposed (one input channel per row).
* :mod:`.pipeline`: :func:`quantize_model`, one decoder layer at a time.
"""

from __future__ import annotations

from .awq import AWQLayerResult, AWQScale, apply_clip, apply_scale, awq_layer, search_clip, search_scale
from .gptq import HessianAccumulator, accumulate_hessians, quantize_gptq
from .grid import QuantizedWeight, compute_grid, fake_quantize, num_groups, quantize_to_grid
from .pipeline import LinearResult, QuantizationResult, quantize_model
from .residual import dequantize_residual, quantize_residual, residual_scale_search
from .rtn import quantize_rtn

__all__ = [
    "AWQLayerResult", "AWQScale", "HessianAccumulator", "LinearResult", "QuantizationResult",
    "QuantizedWeight", "accumulate_hessians", "apply_clip", "apply_scale", "awq_layer",
    "compute_grid", "dequantize_residual", "fake_quantize", "num_groups", "quantize_gptq",
    "quantize_model", "quantize_residual", "quantize_rtn", "quantize_to_grid",
    "residual_scale_search", "search_clip", "search_scale",
]
