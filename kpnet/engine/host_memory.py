"""Host memory policy of kpnet's CPU training and inference: keep freed memory for reuse.

glibc serves every allocation at or above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps
it on free, so each large CPU tensor of a training step is page-faulted in again on every step: a fresh
(2, 256, 128, 128) float32 tensor costs about 4x copying into an existing one (benchmarks/ops.py, "fresh
floor"). `reuse_freed_memory` asks glibc to serve large blocks from its heap (M_MMAP_MAX = 0) and to keep
up to 1 GiB of freed heap (M_TRIM_THRESHOLD), so the process holds on to its peak heap as a caching
allocator does; the heap grows for the first few steps (posix_memalign's small remainders keep freed
blocks apart until neighbours coalesce), then steps take no fresh pages. Measured training the HG-52
CornerNet at 511x511 on 2 threads: batch 2, 9.6 s a step instead of 11.3 s (glibc's defaults take 1.26
million page faults a step) for 4.7 GiB resident instead of 3.5 GiB; batch 1 (activations under 32 MiB,
which glibc's defaults already reuse), 4.94 s instead of 5.06 s, 3.5 GiB instead of 3.3 GiB.
Training and inference on CPU call it; KPNET_MALLOC=system keeps glibc's defaults. It is process-wide, so
the library applies it only from those entry points, never on import.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

MALLOC_ENV = "KPNET_MALLOC"
# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
TRIM_THRESHOLD = 1 << 30


@dataclass(frozen=True)
class Policy:
    """Whether freed host memory is kept for reuse, and why (or why not)."""

    reuse: bool
    reason: str


_applied: Policy | None = None


def policy() -> Policy:
    """What `reuse_freed_memory` does (or did) in this process, without applying it."""
    if _applied is not None:
        return _applied
    if os.environ.get(MALLOC_ENV, "").strip().lower() == "system":
        return Policy(False, f"{MALLOC_ENV}=system: glibc's allocator defaults")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return Policy(False, f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'}): system defaults")
    return Policy(True, "CPU training and inference keep freed memory for reuse (glibc mallopt: no mmap for "
                        "large blocks, trim above 1 GiB)")


def reuse_freed_memory() -> Policy:
    """Apply the policy of this module's docstring once per process; returns what is in effect."""
    global _applied
    if _applied is not None:
        return _applied
    wanted = policy()
    if wanted.reuse:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        wanted = wanted if ok else Policy(False, "glibc refused mallopt: allocator defaults")
    _applied = wanted
    return wanted
