"""What the front's process shares between requests: the decoding lanes, the engine's turn, and
how glibc hands memory back. Each is made on first use (in the service's event loop), none at
import."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import anyio

from serving.settings import (
    INFERENCE_CALLS,
    LARGE_DECODE_NICENESS,
    MALLOC_ARENAS,
    MMAP_THRESHOLD_BYTES,
    SMALL_DECODE_THREADS,
)


@functools.cache
def small_decode_limiter() -> anyio.CapacityLimiter:
    """The lane of small uploads: a few worker threads at once."""
    return anyio.CapacityLimiter(SMALL_DECODE_THREADS)


def lower_this_threads_priority() -> None:
    # Linux schedules threads as tasks: a thread's own id sets its niceness alone.
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_DECODE_NICENESS)


@functools.cache
def large_decode_pool() -> ThreadPoolExecutor:
    """The lane of large uploads: one thread, at a lower CPU priority."""
    return ThreadPoolExecutor(1, "large-decode", initializer=lower_this_threads_priority)


@functools.cache
def inference_limiter() -> anyio.CapacityLimiter:
    """The engine's turn, when it runs in this process."""
    return anyio.CapacityLimiter(INFERENCE_CALLS)


def return_freed_memory_to_the_system() -> None:
    """Make glibc give back the memory of large uploads and decodes once they are freed.

    By default glibc raises its mmap threshold after a large block is freed, so later large
    blocks (an uploaded photo's bytes, its decoded pixels) come from per-thread arenas, which
    keep their peak (docs/serving.md, *Faults and overload*). A fixed threshold keeps large
    blocks in mmap, returned when freed, and few arenas bound what the threads hold. Same as
    the environment variables MALLOC_MMAP_THRESHOLD_ and MALLOC_ARENA_MAX, but set where the
    service starts.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return
    m_arena_max, m_mmap_threshold = -8, -3  # glibc's mallopt parameters (malloc.h)
    libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)
    libc.mallopt(m_arena_max, MALLOC_ARENAS)
