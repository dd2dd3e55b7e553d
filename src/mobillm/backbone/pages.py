"""Hand the pages of weights the device has read once but will not use back to the kernel,
and ask for the ones it will read next.

Weights load as a memory map of the safetensors file, so a tensor costs resident memory only
once it is read. The device reads the final norm and LM head once, to hash them for the
session fingerprint (and, for causal-LM tuning, to upload them), and then never again while
training: no LM logits are computed. Left alone, those pages stay counted in the device's RSS
(890 MB for Qwen2.5-1.5B's untied head). ``MADV_PAGEOUT`` asks the kernel to reclaim them; it
never changes contents (file-backed pages fault back in from the file, anonymous ones would go
to swap or stay), so it is safe for any tensor.

Streamed weights (``BackboneConfig.stream``) use the same two calls per decoder layer: once a
layer has run, ``release`` its weights; before it runs, ``prefetch`` (``MADV_WILLNEED``) the
next layer's, so the kernel reads them from storage while this one computes.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterable

import torch

_MADV_WILLNEED = 3
_MADV_PAGEOUT = 21  # Linux >= 5.4
_MIN_BYTES = 1 << 20


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


def _advise(tensors: Iterable[torch.Tensor], advice: int) -> int:
    if _MADVISE is None:
        return 0
    advised = 0
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            continue
        n = t.numel() * t.element_size()
        if n < _MIN_BYTES:
            continue
        start = t.data_ptr() & ~(mmap.PAGESIZE - 1)
        length = t.data_ptr() + n - start
        if _MADVISE(start, length, advice) == 0:
            advised += length
    return advised


def release(tensors: Iterable[torch.Tensor]) -> int:
    """Ask the kernel to reclaim the pages behind large CPU ``tensors``; returns bytes advised.

    A hint: it fails quietly (0 bytes) where the platform has no ``MADV_PAGEOUT``.
    """
    return _advise(tensors, _MADV_PAGEOUT)


def prefetch(tensors: Iterable[torch.Tensor]) -> int:
    """Ask the kernel to start reading the pages behind large CPU ``tensors``; bytes advised."""
    return _advise(tensors, _MADV_WILLNEED)
