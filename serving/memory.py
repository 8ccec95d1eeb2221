"""Give freed array memory back to the system, so that a burst of large inputs does not leave the worker's RSS
at its peak (glibc only; a no-op elsewhere).

glibc serves an allocation from its heap unless it is over the mmap threshold, and it raises that threshold to
the size of every mmapped block freed (up to 32 MiB). After one large request, the next requests' decoded
images and float32 copies (a few MiB each) then land on the heap, whose free holes glibc keeps: the fuzz
campaign left a worker 1.7 GiB above its start. A fixed threshold keeps arrays of 1 MiB and more in their own
mappings, returned on free, and `malloc_trim` after a request returns what the heap holds free.

glibc also gives each thread that meets a locked heap an arena of its own (up to 8 per core), and keeps what
each arena once held: 32 clients left a worker 11.5 % above its start after a 60 s soak, 3.1 % with two arenas.
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 16 << 20
ARENAS = 2


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


LIBC = _libc()


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds and its arena count for this process (before its threads start);
    False where the C library is not glibc."""
    if LIBC is None:
        return False
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_ARENA_MAX, ARENAS),
    )
    return all(LIBC.mallopt(option, value) for option, value in settings)


def release_free_memory() -> None:
    """Return the heap's free pages to the system (cheap when little is free)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)
