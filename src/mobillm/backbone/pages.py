"""Hand the pages of weights the device has read but will not need soon back to the kernel,
and ask for the ones it will read next.

Weights load as a memory map of the safetensors file (transformers maps it copy-on-write), so
a tensor costs resident memory only once it is read, and its pages are the file's as long as
nothing writes them; nothing writes a frozen weight. The device reads the final norm and LM
head once, to hash them for the session fingerprint (and, for causal-LM tuning, to upload
them), and then never again while training; a split learner's top layers likewise, to hash
and upload them. Those reads hand each piece back as soon as it is used (``releaser``), so
hundreds of MB pass through without becoming resident together. Streamed weights
(``BackboneConfig.stream``) do the same per decoder layer: once a layer has run, ``release``
its weights; before it runs, ``prefetch`` (``MADV_WILLNEED``) the next layer's, so the
kernel reads them while this one computes.

How a page is handed back depends on what backs it:

* **File pages never written** (checked once, from ``/proc/self/smaps``: the mapping holds no
  anonymous, copied-on-write page): ``MADV_DONTNEED`` unmaps them. They leave the process's
  RSS and stay in the page cache, so the next read is a minor fault (**warm**). With
  ``cold=True`` the file's range is also dropped from the page cache
  (``POSIX_FADV_DONTNEED``), so the next read goes to storage, as on a phone under memory
  pressure (**cold**).
* **Anything else** (anonymous memory, a mapping with written pages): ``MADV_PAGEOUT``, a
  request to reclaim that never changes contents. Without swap, or where the kernel ignores
  it (this project's CI VMs do), it frees nothing; it is never unsafe.

``MADV_DONTNEED`` on anonymous or written memory would zero it; that is why the backing is
checked, and why only whole pages inside one clean file mapping are ever advised so.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import sys
from collections.abc import Callable, Iterable

import torch

_MADV_DONTNEED = 4
_MADV_WILLNEED = 3
_MADV_PAGEOUT = 21  # Linux >= 5.4
_MIN_BYTES = 1 << 20
_PAGE = mmap.PAGESIZE


def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def _malloc_trim() -> ctypes._CFuncPtr | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give freed heap memory back to the system. glibc keeps freed blocks of a few MB in its
    heap (its threshold for mapping blocks of their own rises as big ones are freed), so
    replacing a model's weights piece by piece would keep much of what was freed resident."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclasses.dataclass(frozen=True)
class Region:
    """Whole pages ``[start, start + length)`` behind one tensor; ``path``/``offset`` name the
    clean file range that backs them, or ``path`` is "" (anonymous, or written to)."""

    start: int
    length: int
    path: str = ""
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    offset: int
    path: str
    clean: bool


def _mappings() -> list[_Mapping]:
    """This process's file mappings, each marked clean when none of its pages was written."""
    out: list[_Mapping] = []
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    current: dict | None = None
    for line in lines:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            if current is not None:
                out.append(_Mapping(**current))
            a, b = (int(x, 16) for x in head[0].split("-"))
            path = head[5] if len(head) > 5 and head[5].startswith("/") else ""
            current = {"start": a, "end": b, "offset": int(head[2], 16), "path": path}
            current["clean"] = bool(path)
        elif current is not None and head[:1] == ["Anonymous:"] and int(head[1]) > 0:
            current["clean"] = False  # a written (copied) page: DONTNEED would lose it
    if current is not None:
        out.append(_Mapping(**current))
    return [m for m in out if m.path]


def regions(tensors: Iterable[torch.Tensor], maps: list[_Mapping] | None = None) -> list[Region]:
    """The page ranges behind large contiguous CPU ``tensors`` and what backs them (``maps``:
    this process's mappings, read from ``/proc/self/smaps`` when needed if not given)."""
    out = []
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            continue
        n = t.numel() * t.element_size()
        if n < _MIN_BYTES:
            continue
        if maps is None:
            maps = _mappings()
        lo, hi = t.data_ptr(), t.data_ptr() + n
        m = next((m for m in maps if m.start <= lo and hi <= m.end), None)
        if m is not None and m.clean:
            # only whole pages inside the tensor: a shared edge page may hold another tensor
            start = -(-lo // _PAGE) * _PAGE
            end = hi // _PAGE * _PAGE
            if end > start:
                out.append(Region(start, end - start, m.path, m.offset + start - m.start))
            continue
        start = lo & ~(_PAGE - 1)
        out.append(Region(start, hi - start))
    return out


def release_regions(found: Iterable[Region], cold: bool = False) -> int:
    """Hand ``found`` back (see the module doc); returns bytes advised."""
    if _MADVISE is None:
        return 0
    advised = 0
    for r in found:
        advice = _MADV_DONTNEED if r.path else _MADV_PAGEOUT
        if _MADVISE(r.start, r.length, advice) == 0:
            advised += r.length
        if cold and r.path:
            try:
                fd = os.open(r.path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, r.offset, r.length, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return advised


def prefetch_regions(found: Iterable[Region]) -> int:
    """Ask the kernel to start reading ``found``; returns bytes advised."""
    if _MADVISE is None:
        return 0
    return sum(r.length for r in found if _MADVISE(r.start, r.length, _MADV_WILLNEED) == 0)


def release(tensors: Iterable[torch.Tensor], cold: bool = False) -> int:
    """Hand the pages behind large CPU ``tensors`` back; returns bytes advised. A hint: it
    fails quietly (0 bytes) where the platform has no ``madvise``."""
    return release_regions(regions(tensors), cold)


def releaser(cold: bool = False) -> Callable[[torch.Tensor], int]:
    """``release`` for one tensor at a time, many in a row: a stream handing back each piece
    of the weights it has read. Reads the process's mappings once, not per tensor (tens of
    ms each with a model mapped); use it for one pass, while no weights are mapped anew."""
    maps: list[_Mapping] | None = None

    def release_one(t: torch.Tensor) -> int:
        nonlocal maps
        if maps is None and t.numel() * t.element_size() >= _MIN_BYTES:
            maps = _mappings()
        return release_regions(regions([t], maps), cold)

    return release_one


def prefetch(tensors: Iterable[torch.Tensor]) -> int:
    """Ask the kernel to start reading the pages behind large CPU ``tensors``; bytes advised."""
    return prefetch_regions(regions(tensors))
