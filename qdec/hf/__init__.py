"""transformers integration: load QDEC checkpoints with ``from_pretrained``.

After ``import qdec``::

    model = AutoModelForCausalLM.from_pretrained(qdec_checkpoint_dir, dtype=torch.float16,
                                                 device_map="cuda")
    qdec.configure(model, k=0.02)          # compensate 2 % of the channels per token
    model.generate(...)

A QDEC checkpoint's ``config.json`` carries ``quantization_config:
{"quant_method": "qdec", ...}`` (the block the vLLM plugin :mod:`qdec.vllm` reads
too), and the quantizer registered here for that method
(:class:`qdec.hf.quantizer.QDECHfQuantizer`) builds every quantized linear as a
:class:`qdec.nn.QDECLinear` with its residual store in host memory (pinned when
CUDA is present). ``save_pretrained`` writes a QDEC checkpoint again.

Registration is lazy: importing transformers' quantizer registry takes seconds,
which ``import qdec`` (the CLI, scripts that never touch transformers) should not
pay. :func:`install_import_hook` (called by ``import qdec``) registers the
method the moment ``transformers.quantizers.auto`` is imported, or at once if it
already is. :func:`register` does it explicitly and raises a clear
``ImportError`` where the installed transformers cannot host it.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

# The transformers module that holds the quantizer registry: registering when it
# has just been imported means every from_pretrained sees the "qdec" method.
REGISTRY_MODULE = "transformers.quantizers.auto"
# Oldest transformers whose loading API the quantizer is written against
# (``preprocess_model(checkpoint_files=...)``, ``get_state_dict_and_metadata``,
# weight loading through ``core_model_loading``); tested with 5.17 and 5.25.
MIN_TRANSFORMERS = (5, 0)

_registered = False
_refusal_registered = False


def _transformers_version() -> tuple[str, tuple[int, ...]]:
    import transformers

    text = getattr(transformers, "__version__", "0")
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return text, tuple(parts)


def register() -> None:
    """Register quantization method ``"qdec"`` with transformers (idempotent).

    Raises:
        ImportError: transformers is not installed, is older than
            :data:`MIN_TRANSFORMERS`, or has no public quantizer registry
            (``register_quantization_config`` / ``register_quantizer``).
    """
    global _registered
    if _registered:
        return
    try:
        text, version = _transformers_version()
    except ImportError as e:
        raise ImportError("loading QDEC checkpoints with from_pretrained needs transformers "
                          f">= {'.'.join(map(str, MIN_TRANSFORMERS))} (pip install -U "
                          "transformers); it is not installed") from e
    hint = (f"loading QDEC checkpoints with from_pretrained needs transformers >= "
            f"{'.'.join(map(str, MIN_TRANSFORMERS))} (pip install -U transformers); found "
            f"{text}. Without it, qdec.patch.load_patched_checkpoint(dir) builds the same model")
    if version < MIN_TRANSFORMERS:
        if _register_refusal(hint):
            hint += "; from_pretrained on a QDEC checkpoint stops with this message"
        raise ImportError(hint)
    try:
        from transformers.quantizers.auto import (  # noqa: F401
            register_quantization_config,
            register_quantizer,
        )
    except ImportError as e:
        raise ImportError(f"{hint}; this version has no public quantizer registry") from e
    from . import quantizer  # noqa: F401  (its import registers the config and quantizer)

    _registered = True


def _register_refusal(message: str) -> bool:
    """Where transformers has a quantizer registry but a loading API older than the
    quantizer's, register ``"qdec"`` as a method that refuses to load with
    ``message``: transformers would otherwise skip the unknown method and
    initialise every quantized linear at random, with only a warning. Returns
    whether the refusal is registered (False without a registry)."""
    global _refusal_registered
    if _refusal_registered:
        return True
    try:
        from transformers.quantizers.auto import register_quantization_config, register_quantizer
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return False

    class UnsupportedQDECConfig(QuantizationConfigMixin):
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            self.quant_method = "qdec"

    class UnsupportedQDECQuantizer(HfQuantizer):
        def validate_environment(self, *args, **kwargs):
            raise ImportError(message)

        def _process_model_before_weight_loading(self, model, **kwargs):
            raise ImportError(message)

        def _process_model_after_weight_loading(self, model, **kwargs):
            raise ImportError(message)

        def is_serializable(self, *args, **kwargs):
            return False

        @property
        def is_trainable(self):
            return False

    register_quantization_config("qdec")(UnsupportedQDECConfig)
    register_quantizer("qdec")(UnsupportedQDECQuantizer)
    _refusal_registered = True
    return True


def _register_or_warn() -> None:
    """:func:`register` from the import hook: a failure must not break the user's
    ``import transformers``, so it becomes a warning that says what to do (an
    ``ImportError``: the version; anything else, e.g. another package having
    registered "qdec" already: what happened)."""
    try:
        register()
    except ImportError as e:
        warnings.warn(f"qdec: {e}", stacklevel=3)
    except Exception as e:  # noqa: BLE001  (see above: never break the import)
        warnings.warn(f"qdec: could not register quantization method 'qdec' with "
                      f"transformers ({type(e).__name__}: {e}); from_pretrained will not "
                      f"load QDEC checkpoints", stacklevel=3)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` with the other finders and wraps its
    loader so that :func:`register` runs right after the module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module):
            execute(module)
            remove_import_hook()
            _register_or_warn()

        loader.exec_module = exec_module
        return spec


_hook = _RegisterAfterImport()


def install_import_hook() -> None:
    """Register now if transformers' quantizer registry is already imported,
    else as soon as it is (see the module docstring). Never raises."""
    if REGISTRY_MODULE in sys.modules:
        _register_or_warn()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def remove_import_hook() -> None:
    """Undo :func:`install_import_hook` (no-op when not installed)."""
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


__all__ = ["MIN_TRANSFORMERS", "install_import_hook", "register", "remove_import_hook"]
