"""Token-level perplexity, GPTQ/AWQ protocol: non-overlapping windows, exp(mean NLL).

The whole evaluation text is tokenized once (:func:`tokenize_for_ppl`), cut into
non-overlapping windows of ``seq_len`` tokens, and each window is scored on its
own (no context carried over). Every position but the first of a window is
predicted, so a window contributes ``seq_len - 1`` tokens. The last, partial
window is dropped, as in the reference implementations, so every score uses
full-length context windows and results stay comparable across methods.

The model is any callable ``model(input_ids [B, L]) -> logits [B, L, vocab]``
(or an object with ``.logits``, as transformers returns), so the QDEC variants
can wrap a Hugging Face model however they like. Hugging Face models are called
with ``use_cache=False``: a KV cache is useless when scoring whole windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

# Rows of logits turned into float32 log-probabilities at a time: bounds the
# extra memory of the loss to chunk x vocab floats (49152 x 2048 x 4 B would be
# 400 MB per window on top of the model's own logits).
LOSS_CHUNK = 256


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 1 GiB in the heap instead of
    unmapping them (process-wide; for commands that own their process).

    Each pass allocates a window's logits (2048 x 49152 float32 = 400 MB for
    SmolLM2) and other buffers above glibc's mmap threshold; unmapped on free,
    they are page-faulted and zeroed again by the kernel in the next pass. In
    the README main job system time fell from 6.5 to 2.6 CPU-s
    (benchmarks/results/main_job_cpu.json) and peak RSS stayed 2.8 GB: freed
    blocks are reused, not added. Returns whether the settings took (False
    off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 31))


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file; CRLF (and lone CR) line endings become LF.

    A leading UTF-8 byte-order mark is dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid UTF-8 (the message names the byte offset).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte offset {e.start}: {e.reason}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def tokenize_for_ppl(tokenizer: Any, text: str) -> Tensor:
    """Token ids of the whole ``text`` as one int64 ``[T]`` tensor.

    ``tokenizer`` is a Hugging Face tokenizer; its own special-token policy
    applies (SmolLM2 adds no BOS), as in the reference protocol, which tokenizes
    the joined test text in one call.
    """
    if not text:
        raise ValueError("cannot compute perplexity on an empty text")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _is_hf_model(model: Any) -> bool:
    return isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(
        model, "generate")


def _logits(model: Callable, ids: Tensor) -> Tensor:
    out = model(ids, use_cache=False) if _is_hf_model(model) else model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"model(input_ids {tuple(ids.shape)}) must return logits of shape "
                         f"[batch, seq, vocab] = [{ids.shape[0]}, {ids.shape[1]}, V], got {shape}")
    return logits


def window_nll(logits: Tensor, ids: Tensor, chunk: int = LOSS_CHUNK) -> Tensor:
    """Summed next-token NLL per window: float64 ``[B]`` from logits ``[B, L, V]``
    and ids ``[B, L]`` (position t predicts ``ids[:, t+1]``).

    The log-softmax is taken ``chunk`` positions at a time in float32, so a
    half-precision model's logits are never upcast all at once.
    """
    batch, length, vocab = logits.shape
    total = torch.zeros(batch, dtype=torch.float64, device=logits.device)
    for start in range(0, length - 1, chunk):
        end = min(start + chunk, length - 1)
        lg = logits[:, start:end].float().reshape(-1, vocab)
        target = ids[:, start + 1:end + 1].reshape(-1).to(logits.device)
        nll = F.cross_entropy(lg, target, reduction="none").view(batch, -1)
        total += nll.double().sum(1)
    return total


@torch.no_grad()
def perplexity(model: Callable, token_ids: Tensor, seq_len: int = 2048,
               max_windows: int | None = None, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity") -> dict:
    """Perplexity of ``model`` on ``token_ids`` over non-overlapping windows.

    Args:
        model: ``model(input_ids int64 [B, L]) -> logits [B, L, V]`` (or an object
            with ``.logits``); a transformers model is called with ``use_cache=False``.
            Inputs are sent to the device of the model's first parameter if it is a
            module, else left on the CPU.
        token_ids: the tokenized text, int64 ``[T]`` (or ``[1, T]``).
        seq_len: window length; ``T // seq_len`` windows are scored, the trailing
            ``T % seq_len`` tokens are dropped.
        max_windows: score only the first ``max_windows`` windows (``None``: all).
        batch_size: windows per model call.
        progress: show a progress bar.
        desc: progress-bar label.

    Returns:
        ``{"ppl": exp(nll), "nll": mean NLL in nats over predicted tokens,
        "tokens": predicted tokens (windows x (seq_len - 1)), "windows",
        "seq_len", "seconds": wall time of the scoring}``.
    """
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1 or token_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_ids must be an integer tensor of shape [T] or [1, T], got "
                         f"{token_ids.dtype} {tuple(token_ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one predicted token), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    windows = token_ids.numel() // seq_len
    if windows == 0:
        raise ValueError(f"need at least seq_len = {seq_len} tokens for one window, got "
                         f"{token_ids.numel()}")
    if max_windows is not None:
        windows = min(windows, max_windows)

    device = torch.device("cpu")
    if isinstance(model, torch.nn.Module):
        first = next(model.parameters(), None)
        device = first.device if first is not None else device
    all_windows = token_ids[:windows * seq_len].long().view(windows, seq_len)

    start_time = time.perf_counter()
    nll_sum = 0.0
    bar = tqdm(total=windows, desc=desc, disable=not progress, leave=False, unit="window")
    for first_window in range(0, windows, batch_size):
        ids = all_windows[first_window:first_window + batch_size].to(device)
        logits = _logits(model, ids)
        if first_window == 0 and int(all_windows.max()) >= logits.shape[-1]:
            raise ValueError(f"token id {int(all_windows.max())} is outside the model's "
                             f"vocabulary of {logits.shape[-1]}")
        nll_sum += float(window_nll(logits, ids).sum())
        del logits  # free the window's logits before the next forward pass
        bar.update(ids.shape[0])
        if bar.n:
            bar.set_postfix(ppl=f"{math.exp(nll_sum / (bar.n * (seq_len - 1))):.3f}")
    bar.close()
    tokens = windows * (seq_len - 1)
    mean = nll_sum / tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": tokens, "windows": windows,
            "seq_len": seq_len, "seconds": round(time.perf_counter() - start_time, 3)}
