"""One line per long phase of a command (model load, tokenizing, calibration
windows): what it is doing, then how long it took, on stderr so JSON or text
on stdout stays clean. The per-window and per-layer work has tqdm bars; these
are the phases before and between them, which otherwise look like a hang."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def phase(what: str, enabled: bool = True) -> Iterator[None]:
    """Print ``"<what> ..."`` before the block and ``"<what>: done in X s"`` after it
    (nothing when ``enabled`` is false). An exception propagates unprinted."""
    if not enabled:
        yield
        return
    print(f"{what} ...", file=sys.stderr, flush=True)
    t0 = time.time()
    yield
    print(f"{what}: done in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
