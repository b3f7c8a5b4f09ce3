"""Checkpoint formats: reading, writing and converting quantized models.

* :mod:`.safetensors_io`: safetensors through the ``safetensors`` library plus the
  checks it lacks (errors naming file and tensor), an atomic writer, HF sharded directories,
  and refusal of pickle files unless explicitly allowed.
* :mod:`.autoawq`: AutoAWQ ``gemm`` checkpoints (4-bit), lossless to/from the
  project layout.
* :mod:`.gptq`: GPTQ checkpoints at 2/3/4/8 bits, the v1/v2 zero-point
  conventions, act-order ``g_idx`` (turned into an explicit input permutation).
* :mod:`.compressed_tensors`: compressed-tensors ``pack-quantized`` (llm-compressor)
  int weight-only checkpoints, through the ``compressed-tensors`` library.
* :mod:`.foreign`: detects which tool made a quantized directory, reads it, and
  adds a residual store from the original weights (``qdec residual``).
* :mod:`.omniquant`: OmniQuant real-quant (GPTQ layout, v2 zeros) and fake-quant
  FP16 checkpoints (grid recovery).
* :mod:`.qdec_checkpoint`: the project's own checkpoint directory (layout in its
  docstring), and :mod:`.residual_store`: the residual file and its host-memory
  (pinned when a GPU is present) loader.

Every malformed input raises :class:`FormatError` (a ``ValueError``) naming the file,
the tensor, and the expected and found values.
"""

from __future__ import annotations

from .safetensors_io import (
    FormatError,
    SafetensorsFile,
    atomic_directory,
    load_safetensors,
    load_state_dict_dir,
    load_state_dict_file,
    read_header,
    save_safetensors,
)
from .qdec_checkpoint import (
    ImportedCheckpoint,
    PackedWeight,
    QDECCheckpoint,
    read_qdec_checkpoint,
    save_quantization_result,
    write_qdec_checkpoint,
)
from .residual_store import (
    ResidualLayer,
    ResidualStore,
    load_residual_store,
    read_residual_file,
    save_residual_file,
)
from .autoawq import read_autoawq_checkpoint, write_autoawq_checkpoint
from .gptq import read_gptq_checkpoint, write_gptq_checkpoint
from .compressed_tensors import read_compressed_tensors_checkpoint
from .foreign import detect_quantized_format, read_quantized_checkpoint, residual_checkpoint
from .omniquant import (
    GridRecovery,
    read_omniquant_fake_checkpoint,
    read_omniquant_real_checkpoint,
    recover_grid,
)

__all__ = [
    "FormatError", "GridRecovery", "ImportedCheckpoint", "PackedWeight", "QDECCheckpoint",
    "ResidualLayer", "ResidualStore", "SafetensorsFile", "atomic_directory",
    "load_residual_store", "load_safetensors", "load_state_dict_dir", "load_state_dict_file",
    "read_autoawq_checkpoint", "read_gptq_checkpoint", "read_header",
    "read_omniquant_fake_checkpoint", "read_omniquant_real_checkpoint", "read_qdec_checkpoint",
    "read_residual_file", "recover_grid", "save_quantization_result", "save_residual_file",
    "save_safetensors", "write_autoawq_checkpoint", "write_gptq_checkpoint",
    "write_qdec_checkpoint",
    "detect_quantized_format", "read_compressed_tensors_checkpoint",
    "read_quantized_checkpoint", "residual_checkpoint",
]
