"""Frozen heads on the server: parsed from an upload, checked against the spec, shared.

A head upload is safetensors bytes holding the frozen head's tensors and, for a split learner,
the top layers' tensors under ``layers.``; one hash covers both. Heads are shared across
sessions by their tensors *and* the settings that say how to apply them (the same tensors with
another norm epsilon are another head), least recently used out past a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from mobillm.side.head import FrozenHead, tensors_sha256
from mobillm.side.io import SideFileError, weights_from_bytes
from mobillm.transport.messages import RemoteError, SessionSpec

Frozen = tuple[FrozenHead, dict[str, Any]]
HeadKey = tuple[str, str]


def head_key(spec: SessionSpec) -> HeadKey:
    return spec.head_sha256, spec.head.to_json(indent=None)


def parse_head(spec: SessionSpec, blob: bytes | Path) -> Frozen:
    """The head and top layers in ``blob`` (bytes, or a file of them); INVALID_ARGUMENT unless
    they hash as promised."""
    try:
        tensors = weights_from_bytes(blob)
        layers = {k: v for k, v in tensors.items() if k.startswith("layers.")}
        head = FrozenHead(spec.head, {k: v for k, v in tensors.items() if k not in layers})
    except (SideFileError, ValueError) as e:
        raise RemoteError("INVALID_ARGUMENT", f"uploaded head rejected: {e}") from None
    digest = tensors_sha256({**head.tensors(), **layers})
    if digest != spec.head_sha256:
        raise RemoteError(
            "INVALID_ARGUMENT",
            f"uploaded head hashes to {digest[:16]}, the session spec promised "
            f"{spec.head_sha256[:16]}",
        )
    return head, layers


def _nbytes(frozen: Frozen) -> int:
    head, layers = frozen
    tensors = [*head.tensors().values(), *layers.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class HeadCache:
    """Parsed heads by ``head_key``, at most ``budget`` bytes of tensors (not thread-safe:
    the session manager calls it under its lock)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.nbytes = 0
        self._heads: OrderedDict[HeadKey, tuple[Frozen, int]] = OrderedDict()

    def get(self, key: HeadKey) -> Frozen | None:
        entry = self._heads.get(key)
        if entry is None:
            return None
        self._heads.move_to_end(key)
        return entry[0]

    def put(self, key: HeadKey, frozen: Frozen) -> None:
        size = _nbytes(frozen)
        if key in self._heads or size > self.budget:
            return
        self._heads[key] = (frozen, size)
        self.nbytes += size
        while self.nbytes > self.budget:
            _, (_, old) = self._heads.popitem(last=False)
            self.nbytes -= old
