"""Memory-layout helpers and the prefetcher contract from the seed.

The seed's prefetcher is a no-op trait; ``NullPrefetcher`` keeps that contract for tests and
portable builds. The real prefetcher over memory-mapped shards is ``moeray.shards.residency``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from moeray.policy._validate import check_int

__all__ = [
    "CACHE_LINE_BYTES",
    "Prefetcher",
    "NullPrefetcher",
    "align_to_cache_line",
    "expert_memory_footprint",
]

CACHE_LINE_BYTES = 64


@runtime_checkable
class Prefetcher(Protocol):
    """Hints that ``data[offset:offset+length]`` will be read soon.

    A hint only: implementations must not fail when the range runs past the end of ``data``.
    """

    def prefetch(self, data, offset: int, length: int) -> None: ...


class NullPrefetcher:
    """A prefetcher that does nothing."""

    def prefetch(self, data, offset: int, length: int) -> None:
        return None


def align_to_cache_line(n: int) -> int:
    """n (bytes, >= 0) rounded up to a multiple of 64."""
    n = check_int(n, "n", 0)
    return (n + CACHE_LINE_BYTES - 1) & ~(CACHE_LINE_BYTES - 1)


def expert_memory_footprint(rows: int, cols: int, block_size: int) -> int:
    """Bytes of one 2-bit packed ternary projection [rows, cols] plus one float32 scale per block.

    ceil(rows * cols / 4) + ceil(rows * cols / block_size) * 4; rows, cols >= 0, block_size >= 1.
    """
    rows = check_int(rows, "rows", 0)
    cols = check_int(cols, "cols", 0)
    block_size = check_int(block_size, "block_size", 1)
    total = rows * cols
    return (total + 3) // 4 + (total + block_size - 1) // block_size * 4
