"""Giving freed memory back to the system (no torch: the API side and the workers both use it)."""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Give the free pages of the C heap back to the system (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps what a process frees for its next allocations. A worker frees a lot at two moments:
    loading, which reads every weight in float32 (the default model: 540 MB) before the quantised
    forms replace them, and a busy spell's activations: about 180 MB of the default model's worker
    after loading, 60-120 MB after a burst of requests. Trimming takes 1-10 ms."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
