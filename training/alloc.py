"""glibc allocator settings for training: keep freed buffers in the heap instead of unmapping them.

A training step allocates and frees the same large temporaries every time (the (B, B + M) logit
matrix and its gradient, the sparse gradients' index and value buffers, the calibration's
(1024, 4097) logits). glibc serves every request above `M_MMAP_THRESHOLD` (dynamic, at most
32 MiB on 64-bit) with a fresh `mmap` and returns it with `munmap` on free, so each step paid
the kernel for zeroing and page-faulting the same memory again: on 1M items, with 2 threads, the
training loop spent about as much time in the kernel (`sys`) as in user code. With mmap off for
the main arena (`M_MMAP_MAX = 0`) and a high trim threshold, freed memory stays in the heap and
the next step reuses it; the cost is up to `TRIM_BYTES` of freed memory kept resident.

These are process-wide settings (the trainer is its own process); on a libc other than glibc
`tune_allocator` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("trainer")

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_BYTES = 1 << 30

_done = False


def tune_allocator() -> bool:
    """Apply the settings once per process; True if glibc took them."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1
    _done = ok
    log.debug("glibc mallopt (mmap off, trim threshold %d): %s", TRIM_BYTES, ok)
    return ok
