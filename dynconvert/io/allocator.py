"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

glibc's malloc serves every allocation above 32 MB (often less) with its own mmap and unmaps it
on free, so a network's activations are zero-filled pages again on every forward pass. On
EfficientNet-Lite2, 16 images at 260 x 260, one thread: 5.9 s of kernel time against 4.0 s of
compute per 5 passes, and half the CPU time of a whole `--keep` conversion (988 s sys, 928 s
user). With mmap off and the heap trimmed only above 1 GB free, the same passes take 0.0 s of
kernel time, for about 15% more peak memory (959 -> 1119 MB there).
``DYNCONVERT_SYSTEM_MALLOC=1`` leaves the allocator as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
TRIM_ABOVE = 2**30
_done = False
_libc = None  # the handle keep_freed_memory opened: find_library runs ldconfig in a subprocess each call


def keep_freed_memory() -> bool:
    """Tell glibc's malloc not to mmap and not to trim; True when it took the settings. Once per process."""
    global _done, _libc
    if _done or not sys.platform.startswith("linux") or os.environ.get("DYNCONVERT_SYSTEM_MALLOC") == "1":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt settings of this kind
        _done = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE) == 1
        _libc = libc if _done else None
    except (OSError, AttributeError):
        _done = False
    return _done


def release_freed() -> None:
    """Hand the freed pages in the middle of the heap back to the kernel (glibc's ``malloc_trim``),
    when ``keep_freed_memory`` holds them: between the phases of a large network's conversion,
    whose passes free hundreds of MB of moments and candidates that the next phase, of other
    sizes, does not reuse (ViT-L/16: 0.3 GB). 50 ms for a 2 GB heap."""
    if _libc is not None:
        _libc.malloc_trim(0)
