"""Twin of ``src/prefetch.hpp``: moves experts' weight bytes into memory and drops them."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from moeray.native._reference._checks import check_num_experts, index

__all__ = ["PrefetcherCore"]

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))


class PrefetcherCore:
    """The native prefetcher's twin, synchronous: ``prefetch`` populates at once (a read of
    one byte per page after MADV_WILLNEED), so every later ``wait`` finds the expert ready.
    ``release`` drops the pages wholly inside the expert's ranges (MADV_DONTNEED, then
    POSIX_FADV_DONTNEED) and ``resident_bytes`` asks mincore, as the native one does."""

    def __init__(self, paths: list[str], num_experts: int):
        n = check_num_experts(num_experts)
        if isinstance(paths, (str, bytes)):
            raise TypeError("paths: expected a list of paths, got str")
        self._files = []
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise ValueError(f"paths: {path}: {exc.strerror}") from None
            size = os.fstat(fd).st_size
            view = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
            if view is not None:
                view.madvise(mmap.MADV_RANDOM)  # no fault readahead into neighbouring experts
            self._files.append((fd, view, size))
        self._ranges: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
        self._ready = [False] * n
        self._stats = dict(
            bytes_populated=0,
            bytes_released=0,
            prefetches_completed=0,
            in_time=0,
            late=0,
            queue_wait_s=0.0,
        )

    def __del__(self):
        for fd, view, _ in getattr(self, "_files", ()):
            if view is not None:
                try:
                    view.close()
                except BufferError:  # a file_array still reads it: it unmaps with that array
                    pass
            os.close(fd)

    def num_experts(self) -> int:
        return len(self._ready)

    def _expert(self, e) -> int:
        e = index(e, "expert_id")
        if not 0 <= e < len(self._ready):
            raise ValueError(f"expert_id: expected an id in [0, {len(self._ready)}), got {e}")
        return e

    def set_ranges(self, expert_id: int, ranges) -> None:
        e = self._expert(expert_id)
        checked = []
        for file, offset, length in ranges:
            file, offset, length = (index(v, "ranges") for v in (file, offset, length))
            if not 0 <= file < len(self._files):
                raise ValueError(f"ranges: file index {file} not in [0, {len(self._files)})")
            size = self._files[file][2]
            if offset < 0 or length < 0 or offset > size or length > size - offset:
                raise ValueError(
                    f"ranges: bytes [{offset}, +{length}) run past file {file} of {size} bytes"
                )
            checked.append((file, offset, length))
        self._ranges[e] = checked

    def expert_bytes(self, expert_id: int) -> int:
        return sum(length for _, _, length in self._ranges[self._expert(expert_id)])

    def _populate(self, e: int) -> None:
        for file, offset, length in self._ranges[e]:
            _, view, size = self._files[file]
            if length == 0:
                continue
            start, end = _outer_pages(offset, length, size)
            view.madvise(mmap.MADV_WILLNEED, start, end - start)
            for page in range(start, end, _PAGE):
                view[page]
            self._stats["bytes_populated"] += length

    def prefetch(self, expert_id: int) -> None:
        e = self._expert(expert_id)
        if not self._ready[e]:
            self._populate(e)
            self._ready[e] = True
            self._stats["prefetches_completed"] += 1

    def ready(self, expert_id: int) -> bool:
        return self._ready[self._expert(expert_id)]

    def wait(self, expert_id: int) -> bool:
        e = self._expert(expert_id)
        if self._ready[e]:
            self._stats["in_time"] += 1
            return True
        self._stats["late"] += 1
        self._populate(e)
        self._ready[e] = True
        return False

    def release(self, expert_id: int) -> None:
        e = self._expert(expert_id)
        self._ready[e] = False
        for file, offset, length in self._ranges[e]:
            fd, view, size = self._files[file]
            start = -(-offset // _PAGE) * _PAGE
            end = offset + length if offset + length >= size else (offset + length) // _PAGE * _PAGE
            if end <= start:
                continue
            view.madvise(mmap.MADV_DONTNEED, start, end - start)
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            self._stats["bytes_released"] += end - start

    def resident_bytes(self, expert_id: int) -> int:
        e = self._expert(expert_id)
        total = 0
        for file, offset, length in self._ranges[e]:
            _, view, size = self._files[file]
            if length == 0:
                continue
            start, end = _outer_pages(offset, length, size)
            pages = -(-(end - start) // _PAGE)
            vec = (ctypes.c_ubyte * pages)()
            base = _mapping_address(view) + start
            if _libc.mincore(ctypes.c_void_p(base), end - start, vec) != 0:
                continue
            total += sum(min(_PAGE, end - (start + i * _PAGE)) for i in range(pages) if vec[i] & 1)
        return total

    def read_ahead(self, expert_id: int, bytes: int) -> None:
        self._expert(expert_id)
        if index(bytes, "bytes") < 0:
            raise ValueError(f"bytes: expected an int >= 0, got {bytes}")

    def file_array(self, file: int) -> np.ndarray:
        """uint8 [file size], a read-only view of this prefetcher's mapping of file ``file``."""
        file = index(file, "file")
        if not 0 <= file < len(self._files):
            raise ValueError(f"file: expected an index in [0, {len(self._files)}), got {file}")
        _, view, _ = self._files[file]
        return np.frombuffer(view, dtype=np.uint8) if view is not None else np.zeros(0, np.uint8)

    def stats(self) -> dict:
        return dict(self._stats)


def _outer_pages(offset: int, length: int, size: int) -> tuple[int, int]:
    """[start, end) of the pages a byte range touches, within a file of ``size`` bytes."""
    return offset // _PAGE * _PAGE, min(size, -(-(offset + length) // _PAGE) * _PAGE)


def _mapping_address(view: mmap.mmap) -> int:
    """The address of a read-only mmap's first byte (for mincore), without copying it."""
    array = np.frombuffer(view, dtype=np.uint8, count=1)
    address = array.ctypes.data
    del array  # an exported buffer would keep the mmap from closing
    return address
