"""The C allocator's one setting: large blocks go back to the system when freed.

glibc serves a block of at least ``M_MMAP_THRESHOLD`` bytes with a mapping of
its own, unmapped when the block is freed. By default that threshold is
dynamic: it rises to the size of the largest mapped block freed so far (up to
32 MiB). After the first large event frame is freed, every later one (a
3.5 MiB ``agent_data``, its JSON for the database, a 4 MiB batch, a page of
events for a reader) comes from the heap instead, and the heap keeps what is
freed in its middle: a run of 60 such events left the process 60-150 MiB
above its configured byte bounds, and by a different amount each time
(``tests/e2e/test_hostile_process.py``). A fixed threshold keeps RSS to what
is alive. 1 MiB leaves the socket reads (256 KiB) and everything smaller on
the heap, so the frequent path pays no mapping.
"""

from __future__ import annotations

import ctypes
import sys

# Blocks of this many bytes or more are mapped on their own (glibc's default
# starts at 128 KiB and then follows the largest block freed).
LARGE_BLOCK_BYTES = 1024 * 1024
# mallopt's parameter number for the threshold (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3


def return_large_blocks_when_freed(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold``; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbols, libc's among them: no library search (which
        # runs ldconfig) at start-up.
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # a libc without mallopt (musl)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
