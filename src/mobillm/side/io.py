"""Save and load a side network: ``side.safetensors`` (trainable weights) + ``side.json``.

``side.json`` holds the side config, the backbone fingerprint it was trained against, the tapped
layer indices and the task metadata (labels, prompt template) the device needs for inference.
Loading against a different backbone fails with a message that says what differs.

``safetensors_stream`` writes safetensors bytes piece by piece instead (the frozen head a
device uploads: hundreds of MB for a split learner's top layers).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save

from mobillm.errors import MobiLLMError
from mobillm.fingerprint import BackboneFingerprint
from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead, tensor_pieces
from mobillm.side.learner import Learner, build_learner

FORMAT = "mobillm-side/1"
WEIGHTS = "side.safetensors"
META = "side.json"

# safetensors' dtype names, in the order its writer lays tensors out: by its dtype ranking,
# widest first (every tensor stays aligned), then by name. tests/side/test_io.py checks both
# against ``safetensors.torch.save`` for every dtype here.
_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
    torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32",
    torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_RANK = {dtype: i for i, dtype in enumerate(_DTYPES)}


class SideFileError(MobiLLMError):
    """A saved side network is missing, malformed, or was trained for another backbone."""


@dataclasses.dataclass
class SideMeta:
    """Everything about a side network except its weights."""

    side: SideConfig
    fingerprint: BackboneFingerprint
    taps: tuple[int, ...]
    task: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "side": self.side.to_dict(),
            "fingerprint": self.fingerprint.to_dict(),
            "taps": list(self.taps),
            "task": self.task,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SideMeta:
        if d.get("format") != FORMAT:
            raise SideFileError(f"unknown side-network format {d.get('format')!r}; want {FORMAT}")
        try:
            return cls(
                side=SideConfig.from_dict(d["side"]),
                fingerprint=BackboneFingerprint.from_dict(d["fingerprint"]),
                taps=tuple(int(t) for t in d["taps"]),
                task=dict(d.get("task", {})),
            )
        except KeyError as e:
            raise SideFileError(f"side metadata lacks field {e}") from None


def weights_to_bytes(net: Learner) -> bytes:
    """Trainable weights as safetensors bytes: what ``side.safetensors`` holds, byte for byte."""
    state = {k: v.detach().contiguous().cpu() for k, v in net.trainable_state().items()}
    return save(state, metadata={"format": FORMAT})


def safetensors_header(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The header ``safetensors.torch.save(tensors)`` starts with (8-byte little-endian length,
    JSON padded with spaces to 8 bytes) and the order the tensors' bytes follow it in."""
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in _DTYPES})
    if unknown:
        raise ValueError(f"safetensors cannot store dtypes {unknown}")
    order = sorted(tensors, key=lambda name: (_RANK[tensors[name].dtype], name))
    entries, offset = {}, 0
    for name in order:
        t = tensors[name]
        end = offset + t.numel() * t.element_size()
        entries[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def safetensors_stream(
    tensors: dict[str, torch.Tensor], release: Callable[[torch.Tensor], object] | None = None
) -> Iterator[memoryview]:
    """``safetensors.torch.save(tensors)``, byte for byte, as pieces: the header, then each
    tensor's bytes in pieces of at most ``side.head.PIECE_BYTES``.

    A piece is read only when asked for, and ``release`` is called with it once the next one
    is asked for, so a consumer that copies each piece out (``transport.serde.head_parts``)
    holds one piece of the tensors at a time, never the whole payload.
    """
    header, order = safetensors_header(tensors)
    yield memoryview(header)
    for name in order:
        for piece in tensor_pieces(tensors[name]):
            yield memoryview(piece.view(torch.uint8).numpy())
            if release is not None:
                release(piece)


def weights_from_bytes(blob: bytes | str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors payload, given as bytes or as the path of a file (read
    through a memory map: no second copy of the bytes in memory)."""
    try:
        return load(blob) if isinstance(blob, bytes | bytearray) else load_file(str(blob))
    except (SafetensorError, ValueError, OSError) as e:
        raise SideFileError(f"side weights are not valid safetensors: {e}") from None


def save_side(net: Learner, meta: SideMeta, folder: str | Path) -> Path:
    """Write ``side.safetensors`` and ``side.json`` into ``folder`` (created if needed)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS).write_bytes(weights_to_bytes(net))
    (out / META).write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n")
    return out


def read_meta(folder: str | Path) -> SideMeta:
    p = Path(folder)
    if not p.is_dir():
        raise SideFileError(f"side network folder not found: {p}")
    mp = p / META
    if not mp.is_file():
        raise SideFileError(f"{p} has no {META}: not a saved side network")
    try:
        return SideMeta.from_dict(json.loads(mp.read_text()))
    except (json.JSONDecodeError, MobiLLMError, ValueError) as e:
        raise SideFileError(f"{mp} is malformed: {e}") from None


def load_weights_into(net: Learner, state: dict[str, torch.Tensor]) -> None:
    """Copy trainable weights into ``net``, refusing missing, extra or mis-shaped tensors."""
    own = net.trainable_state()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise SideFileError(f"side weights do not fit: missing {missing[:5]}, extra {extra[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise SideFileError(
                f"side weight {k} has shape {tuple(v.shape)}, want {tuple(own[k].shape)}"
            )
    net.load_state_dict(state, strict=False)


def check_fingerprint(meta: SideMeta, expect: BackboneFingerprint | None, where: str) -> None:
    if expect is not None and (diff := meta.fingerprint.mismatch(expect)):
        raise SideFileError(
            f"side network in {where} was trained for another backbone "
            f"({meta.fingerprint.short()}) than the one loaded ({expect.short()}): {diff}"
        )


def side_from_bytes(
    meta: SideMeta,
    weights: bytes,
    head: FrozenHead,
    expect: BackboneFingerprint | None = None,
    where: str = "the download",
    layers: dict[str, torch.Tensor] | None = None,
) -> Learner:
    """Rebuild a side network from its metadata and safetensors bytes (e.g. a download).

    ``layers``: a split learner's frozen top layers (the device's own, shared).
    """
    check_fingerprint(meta, expect, where)
    net = build_learner(meta.side, head, layers, cast=False)
    load_weights_into(net, weights_from_bytes(weights))
    return net.eval()


def load_side(
    folder: str | Path,
    head: FrozenHead,
    expect: BackboneFingerprint | None = None,
    layers: dict[str, torch.Tensor] | None = None,
) -> tuple[Learner, SideMeta]:
    """Rebuild a saved side network on ``head``; ``expect``: the fingerprint it must match."""
    meta = read_meta(folder)
    check_fingerprint(meta, expect, str(folder))
    wp = Path(folder) / WEIGHTS
    if not wp.is_file():
        raise SideFileError(f"{folder} has no {WEIGHTS}")
    net = side_from_bytes(meta, wp.read_bytes(), head, expect, str(folder), layers)
    return net, meta
