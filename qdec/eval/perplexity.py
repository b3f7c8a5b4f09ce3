"""WikiText-style perplexity: non-overlapping windows, exp(mean NLL)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm


def load_text(path: str | Path) -> str:
    """Read a text file as UTF-8 with CRLF normalised to LF."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def _logits(model: Callable, ids: Tensor) -> Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perplexity(model: Callable, token_ids: Tensor, seq_len: int = 2048,
               max_windows: int | None = None, progress: bool = True,
               desc: str = "perplexity") -> dict:
    """Perplexity of ``model`` on ``token_ids`` (int64 ``[T]``).

    The text is cut into non-overlapping windows of ``seq_len`` tokens (the
    last, partial window is dropped, as in the GPTQ/AWQ protocol); each window
    is scored independently and every position but the first is predicted.
    ``model(ids [1, L])`` may return an object with ``.logits`` or the logits.
    The log-softmax is taken one window at a time, so memory stays at one
    window's ``[L, vocab]`` logits.

    Returns ``{"ppl", "nll", "tokens", "windows", "seq_len", "seconds"}``.
    """
    token_ids = token_ids.reshape(-1)
    windows = token_ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"need at least {seq_len} tokens for one window, got {token_ids.numel()}")
    start = time.time()
    nll_sum, count = 0.0, 0
    for w in tqdm(range(windows), desc=desc, disable=not progress, leave=False):
        ids = token_ids[w * seq_len:(w + 1) * seq_len].unsqueeze(0)
        logits = _logits(model, ids)[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        nll_sum += nll.item()
        count += seq_len - 1
    mean = nll_sum / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": windows,
            "seq_len": seq_len, "seconds": round(time.time() - start, 2)}
