"""Keep freed host memory in the process for reuse: glibc's allocator tuned for CPU training.

glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MiB on 64-bit) with a
fresh ``mmap`` and gives it back to the kernel on ``free``. A CPU training step allocates and frees
gigabytes of such blocks (activations, gradients: an ``ir_50`` feature map at batch 32 is ~100 MiB),
so every step page-faults them in again and the kernel zeroes every page: ~1.2x of the step time of
``ir_50`` on the 2-core machine of ``bench/README.md``. :func:`keep_freed_host_memory` tells glibc
to serve them from its heap and never to return free heap memory to the kernel: after the first step
the same pages are reused. The values do not change (only where the bytes live); the cost is that
the process's resident memory stays at its peak.

Applied by ``main.py`` when it trains on the CPU (``--no-keep_host_memory`` turns it off); GPU
training allocates its large tensors on the device (PyTorch's CUDA caching allocator already reuses
them) and is left unchanged.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER = -1          # as size_t: SIZE_MAX, i.e. never trim the heap


def _glibc():
    """The C library if it is glibc (has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None   # musl and others: no such tuning
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_host_memory() -> bool:
    """Serve large allocations from the heap (no ``mmap`` per block) and never trim it, for the
    rest of this process and the processes it forks. True if applied; False (with a debug message)
    where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        logger.debug("not glibc: freed host memory is handled by the system allocator")
        return False
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _NEVER) != 1:
        logger.warning("glibc refused the allocator settings; freed host memory goes back to the system")
        return False
    logger.info("host allocator: freed memory is kept for reuse (resident memory stays at its peak; "
                "--no-keep_host_memory turns this off)")
    return True
