"""vLLM plugin: serve QDEC checkpoints with vLLM as quantization method ``qdec``.

vLLM calls :func:`register` in every process it starts (the
``vllm.general_plugins`` entry point in ``pyproject.toml``), before it reads a
model's config. Registration imports vLLM and :mod:`qdec.vllm.method` once; the
import of this package itself touches neither, so it stays cheap, and a second
call is a no-op.

A QDEC checkpoint's ``config.json`` carries ``quantization_config:
{"quant_method": "qdec", ...}`` (:func:`qdec.formats.qdec_checkpoint.quantization_config_block`),
so ``vllm.LLM(model=ckpt)`` picks the method by itself; a checkpoint written
before that block existed loads with ``quantization="qdec"``.

The number of compensated channels per token, ``k``, comes from (first match):

* ``QDEC_TUNE_CONFIG`` (a ``qdec tune`` config file) with ``QDEC_TUNE_TARGET``
  (e.g. ``2.5%``; default the file's smallest target): k per projection, and
  the CUDA compensation's SM budget per projection;
* ``QDEC_K``: a count (``16``), a fraction of each layer's input channels
  (``0.02``), or a JSON object from projection name to either
  (``{"down_proj": 0.05, "q_proj": 0.02}``; unnamed projections get 0);
* the checkpoint's ``quantization_config.k`` (same forms), default 0.

Environment variables reach the worker processes vLLM spawns for tensor
parallelism. See :mod:`qdec.vllm.method` for weights, sharding and selection.
"""

from __future__ import annotations

_REGISTERED = False


def register() -> None:
    """Register the ``qdec`` quantization method with vLLM (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from . import method  # noqa: F401  (its import registers QDECConfig)

    _REGISTERED = True


__all__ = ["register"]
