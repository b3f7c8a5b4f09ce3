"""Argument checks of the ``qdec`` command line, run before any model is loaded.

A value that can be judged alone is checked while argparse parses it (the
``type=`` callables below raise :class:`argparse.ArgumentTypeError`, which
argparse reports as ``argument --flag: <message>``). Checks that need the file
system or several flags together are the ``check_*`` functions, which each
command calls first; they raise :class:`ValueError` / :class:`FileNotFoundError`
/ :class:`FileExistsError` whose message starts with the flag. Either way a
wrong flag fails within a second, not after a 150 s reference pass.

The meaning of ``--k`` (one rule for every command and for ``qdec_infer``,
whose ``KValue::parse`` in ``csrc/runtime/model.cpp`` implements the same):
a whole number written without a decimal point or exponent (``16``) is a
channel count; a number with one (``0.05``, ``1.0``, ``5e-2``) is a fraction
of each layer's input channels and must lie in ``[0, 1]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

#: The WikiText-2 excerpts shipped with the package (CC BY-SA 3.0; see
#: ``qdec/data/README.md``): the default ``--text`` and ``--calib``, so the
#: quick start runs from a clone alone.
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TEXT = DATA_DIR / "wikitext2_test_excerpt.txt"
DEFAULT_CALIB = DATA_DIR / "wikitext2_valid_excerpt.txt"

FULL_DATA_HINT = ("for the full WikiText-2 files pass --text PATH/wikitext-2-raw/wiki.test.raw "
                  "and --calib PATH/wikitext-2/valid.txt (the default is the short excerpt "
                  f"shipped in {DATA_DIR})")

K_RULE = ("a count of input channels (an integer such as 16) or a fraction of them "
          "(a number with a decimal point in [0, 1], such as 0.05; 1.0 = all)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (``None``,
    an unset flag) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or \
                action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


# ---- values checked while parsing (argparse type=) -----------------------------------------

def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected {what}") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """``type=`` for an integer ``>= low``."""
    def parse(text: str) -> int:
        value = _int(text, f"an integer >= {low}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


def nonnegative_float(text: str) -> float:
    """``type=`` for a finite number ``>= 0`` (e.g. ``--temperature``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def weight_bits(text: str) -> int:
    """``type=`` for the base quantization's bits (2..8, the packing's range)."""
    from .packing import MAX_BITS, MIN_BITS

    value = _int(text, f"bits in {MIN_BITS}..{MAX_BITS}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise argparse.ArgumentTypeError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {value}")
    return value


def residual_bits(allow_none: bool) -> Callable[[str], int]:
    """``type=`` for the residual's bits: 2..8, or 0 (no residual store) when
    ``allow_none``."""
    from .packing import MAX_BITS, MIN_BITS

    what = f"{MIN_BITS}..{MAX_BITS}" + (" or 0 for no residual store" if allow_none else "")

    def parse(text: str) -> int:
        value = _int(text, what)
        if not (MIN_BITS <= value <= MAX_BITS or (allow_none and value == 0)):
            raise argparse.ArgumentTypeError(f"residual bits must be {what}, got {value}")
        return value
    parse.__name__ = "residual bits"
    return parse


def group_size(text: str) -> int:
    """``type=`` for a group size: -1 (one group per row) or a positive multiple of 32."""
    from .quant.grid import check_group_size

    value = _int(text, "-1 or a positive multiple of 32")
    try:
        check_group_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def k_value(text: str) -> int | float:
    """``type=`` for ``--k``: an ``int`` channel count or a ``float`` fraction in
    ``[0, 1]``, by the rule in this module's docstring (the same as ``qdec_infer``);
    :class:`qdec.nn.QDECLinear` reads an int as a count and a float as a fraction."""
    text = text.strip()
    if text and not any(c in text for c in ".eE"):
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(f"k must be {K_RULE}; got {text!r}")
        return value
    try:
        fraction = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"k must be {K_RULE}; got {text!r}") from None
    if not 0.0 <= fraction <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"k as a fraction must be in [0, 1], got {text!r} (a count of channels is written "
            f"without a decimal point, e.g. 16)")
    return fraction


def describe_k(k: int | float) -> str:
    """``"16 channels"`` or ``"2.0% of input channels"``, for messages."""
    return f"{k} channels" if isinstance(k, int) else f"{k:.1%} of input channels"


def _items(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def fraction_list(text: str) -> list[float]:
    """``type=`` for comma-separated fractions of the input channels, each in [0, 1]."""
    values = []
    for item in _items(text):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a number; expected comma-separated fractions of the input "
                f"channels in [0, 1], e.g. 0.01,0.05") from None
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a fraction in [0, 1] (0.05 = 5 % of the input channels)")
        values.append(value)
    return values


def positive_int_list(text: str) -> list[int]:
    """``type=`` for comma-separated integers >= 1 (e.g. ``--ranks 8,32``)."""
    values = []
    for item in _items(text):
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not an integer >= 1; expected comma-separated integers, e.g. 8,32")
        values.append(value)
    return values


def nonnegative_int_list(text: str) -> list[int]:
    """``type=`` for comma-separated integers >= 0 (e.g. ``--sm-budgets 0,4,8``)."""
    values = []
    for item in _items(text):
        try:
            value = int(item)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not an integer >= 0; expected comma-separated integers, e.g. 0,4,8")
        values.append(value)
    return values


def choice_list(name: str, allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """``type=`` for a comma-separated subset of ``allowed`` (may be empty)."""
    def parse(text: str) -> list[str]:
        values = _items(text)
        if unknown := [v for v in values if v not in allowed]:
            raise argparse.ArgumentTypeError(
                f"unknown {name} {', '.join(map(repr, unknown))}; choose from "
                f"{', '.join(allowed)} (comma-separated)")
        return values
    parse.__name__ = f"{name} list"
    return parse


def policy_list(text: str) -> list[str]:
    """``type=`` for ``--policies``: a comma-separated subset of
    :data:`qdec.nn.POLICIES` ('' = no sweep)."""
    from .nn import POLICIES

    return choice_list("policy", POLICIES)(text)


def lowrank_method_list(text: str) -> list[str]:
    """``type=`` for ``--lowrank-methods``: a subset of :data:`qdec.lowrank.METHODS`."""
    from .lowrank import METHODS

    return choice_list("low-rank method", METHODS)(text)


def variant_list(text: str) -> list:
    """``type=`` for ``--variants``: comma-separated ``method:bits:group[:sym|asym]``,
    each checked (method, bits, group size) as :class:`qdec.eval.sweep.Variant`."""
    from .eval.sweep import Variant
    from .quant.pipeline import METHODS

    variants = []
    for spec in _items(text):
        parts = spec.split(":")
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in ("sym", "asym")):
            raise argparse.ArgumentTypeError(
                f"{spec!r} must look like method:bits:group[:sym|asym], e.g. awq:3:128")
        if parts[0] not in METHODS:
            raise argparse.ArgumentTypeError(
                f"{spec!r}: method {parts[0]!r} is not one of {', '.join(METHODS)}")
        try:
            weight_bits(parts[1])
            group_size(parts[2])
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{spec!r}: {e}") from None
        variants.append(Variant.parse(spec))
    return variants


def target_list(text: str) -> list[str]:
    """``type=`` for slowdown targets such as ``2.5%,5%`` (or ``0.025``), each > 0;
    returned as given (``qdec.tune`` reads both forms)."""
    from .tune import _parse_target

    for item in _items(text):
        try:
            value = _parse_target(item)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}; expected e.g. 2.5%,5%") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"target {item!r} must be a slowdown > 0, e.g. 2.5%")
    return _items(text)


# ---- checks that need the file system or several flags --------------------------------------

def budget_value(text: str) -> str:
    """``type=`` for one fetch budget: ``2%`` / ``0.02`` (the bytes of that
    uniform fraction) or ``40000B`` (bytes per token); qdec.budget.parse_budget
    checks it, the text is kept (that is what the budget functions take)."""
    from .budget import parse_budget

    try:
        parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def budget_list(text: str) -> list[str]:
    """``type=`` for comma-separated fetch budgets (:func:`budget_value`)."""
    return [budget_value(item) for item in _items(text)]


def check_input_file(flag: str, path: str | os.PathLike, hint: str = "") -> Path:
    """``path`` as a Path if it is a readable file; else FileNotFoundError naming ``flag``."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "not found"
        raise FileNotFoundError(f"{flag} {p}: {what}" + (f"; {hint}" if hint else ""))
    if not os.access(p, os.R_OK):
        raise FileNotFoundError(f"{flag} {p}: not readable")
    return p


def check_text_files(text: str | os.PathLike | None, calib: str | os.PathLike | None) -> None:
    """``--text`` / ``--calib`` exist (either may be None: the command has no such flag)."""
    if text is not None:
        check_input_file("--text", text, FULL_DATA_HINT)
    if calib is not None:
        check_input_file("--calib", calib, FULL_DATA_HINT)


def check_model_path(flag: str, path: str | os.PathLike | None) -> None:
    """A ``--model`` (None = the embedded model): a file or a directory that exists."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {p}: no such file or directory")
    if p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {p}: a directory without config.json "
                                f"(expected a .gguf file or a model directory)")


def _writable_parent(flag: str, p: Path) -> None:
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"{flag} {p}: {parent} is a file, so nothing can be created under it")
    if not os.access(parent, os.W_OK):
        raise FileExistsError(f"{flag} {p}: {parent} is not writable")


def check_output_file(flag: str, path: str | os.PathLike) -> Path:
    """An output file (replaced if it exists) that can be written: not a directory,
    under a writable directory (created later if missing)."""
    p = Path(path)
    if p.is_dir():
        raise FileExistsError(f"{flag} {p}: is a directory; give a file name, "
                              f"e.g. {p / 'eval.json'}")
    _writable_parent(flag, p)
    return p


def check_output_dir(flag: str, path: str | os.PathLike, overwrite: bool) -> Path:
    """An output directory: absent (or present with ``overwrite``, and a directory),
    under a writable directory."""
    p = Path(path)
    if p.exists():
        if not overwrite:
            raise FileExistsError(f"{flag} {p}: exists; pass --overwrite to replace it")
        if not p.is_dir():
            raise FileExistsError(f"{flag} {p}: exists and is not a directory")
    _writable_parent(flag, p)
    return p


def check_checkpoint_k(checkpoint: str | os.PathLike, k: int | float | None,
                       default_k: int | float) -> int | float:
    """The ``--k`` to run ``qdec generate`` with, checked against the checkpoint
    before it is loaded: ``None`` (not given) is ``default_k``, or 0 with a note
    when the checkpoint has no residual store; an explicit ``k > 0`` on such a
    checkpoint is an error. A directory without a ``qdec`` section is left to the
    loader (it says what it accepts)."""
    p = Path(checkpoint)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {p}: no such directory")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint {p}: no config.json (not a model directory)")
    try:
        section = json.loads(cfg_path.read_text()).get("qdec")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {cfg_path}: not a JSON object ({e})") from None
    has_residual = not isinstance(section, dict) or section.get("residual_bits") is not None
    if has_residual:
        return default_k if k is None else k
    if k:
        raise ValueError(f"--k {k}: {p} has no residual store (config.json qdec.residual_bits "
                         f"is null), so only --k 0 runs; write one with qdec quantize "
                         f"--residual-bits 4")
    if k is None:
        print(f"note: {p} has no residual store; running k = 0 only (write one with "
              f"qdec quantize --residual-bits 4)")
    return 0
