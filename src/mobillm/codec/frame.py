"""Activation frames: a fixed little-endian header plus a scheme payload, and a paranoid decoder.

A frame carries one float tensor of 1 to 8 dims, usually ``(rows, hidden)`` with one row per
selected token position, quantized along the last dim. Layout (integers little-endian):

======  ======  ==============================================================
offset  bytes   field
======  ======  ==============================================================
0       4       magic ``b"MBLA"``
4       1       version, u8, = 1
5       1       scheme id, u8 (fp16 = 1, int8 = 2, int4 = 3, nf4 = 4)
6       1       ndim, u8 in [1, 8]
7       1       reserved, u8, = 0
8       4       group_size, u32 (power of two in [8, 4096] for int4/nf4, else 0)
12      8       payload_nbytes, u64
20      8*ndim  dims, u64 each
20+8n   ...     payload, laid out as ``mobillm.codec.schemes`` describes
======  ======  ==============================================================

The payload length is a function of scheme, shape and group size, so ``encoded_nbytes`` is
exact and the decoder can check the header against itself. Decoding trusts nothing: it checks
every header field, refuses a frame whose actual or *declared* size exceeds ``max_frame_bytes``
before allocating anything, requires the buffer to hold exactly one frame, and rejects payloads
the encoder cannot produce (non-finite or negative scales, out-of-range codes). Every failure is
a ``CodecError`` subclass. There is no checksum: a flipped payload bit inside the valid range
decodes to a wrong value, so integrity is the transport's job.
"""

from __future__ import annotations

import math
import operator
import struct
from dataclasses import dataclass

import torch

from mobillm.codec.config import DEFAULT_MAX_FRAME_BYTES, CodecConfig
from mobillm.codec.errors import (
    CodecError,
    FrameTooLargeError,
    MalformedFrameError,
    TruncatedFrameError,
)
from mobillm.codec.schemes import (
    Scheme,
    check_stats,
    get_scheme,
    scheme_for_id,
    valid_group_size,
)

MAGIC = b"MBLA"
VERSION = 1
MAX_NDIM = 8
_FIXED = struct.Struct("<4sBBBBIQ")  # magic, version, scheme id, ndim, reserved, group, payload
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class FrameHeader:
    """A validated header: scheme name, tensor shape, group size (0 if unused), payload size."""

    scheme: str
    shape: tuple[int, ...]
    group_size: int
    payload_nbytes: int

    @property
    def header_nbytes(self) -> int:
        return _header_nbytes(len(self.shape))

    @property
    def frame_nbytes(self) -> int:
        return self.header_nbytes + self.payload_nbytes


def _header_nbytes(ndim: int) -> int:
    return _FIXED.size + 8 * ndim


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(rows, cols)`` view every scheme works on: leading dims flattened, last dim kept."""
    return math.prod(shape[:-1]), shape[-1]


def _scheme_group(cfg: CodecConfig) -> tuple[Scheme, int]:
    scheme = get_scheme(cfg.scheme)
    return scheme, cfg.group_size if scheme.grouped else 0


def _check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    try:
        shape = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise CodecError(f"shape must be a sequence of ints, got {shape!r}") from None
    if not 1 <= len(shape) <= MAX_NDIM:
        raise CodecError(f"can only encode tensors with 1 to {MAX_NDIM} dims, got shape {shape}")
    if min(shape) < 0:
        raise CodecError(f"shape must be non-negative, got {shape}")
    return shape


def encoded_nbytes(shape: tuple[int, ...], cfg: CodecConfig) -> int:
    """Exact ``len(encode(x, cfg))`` for any tensor ``x`` of this shape."""
    shape = _check_shape(shape)
    scheme, group_size = _scheme_group(cfg)
    return _header_nbytes(len(shape)) + scheme.payload_nbytes(*_rows_cols(shape), group_size)


def encode(x: torch.Tensor, cfg: CodecConfig) -> bytes:
    """Encode a float tensor of any shape with 1 to 8 dims, quantized along its last dim.

    fp16, int4 and nf4 clamp values to the float16 range ±65504. NaN or infinite values (also
    float64 values beyond the float32 range) raise CodecError rather than travel; so does a frame
    over ``cfg.max_frame_bytes``. ``x`` may be on any device; the work happens on the CPU.
    """
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"encode expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise CodecError(f"encode expects a floating-point tensor, got dtype {x.dtype}")
    shape = _check_shape(tuple(x.shape))
    scheme, group_size = _scheme_group(cfg)
    rows, cols = _rows_cols(shape)
    payload_nbytes = scheme.payload_nbytes(rows, cols, group_size)
    frame_nbytes = _header_nbytes(len(shape)) + payload_nbytes
    if frame_nbytes > cfg.max_frame_bytes:
        raise FrameTooLargeError(
            f"a {cfg.scheme} frame for shape {shape} takes {frame_nbytes} bytes, over "
            f"max_frame_bytes={cfg.max_frame_bytes}; send fewer rows per frame or raise the limit"
        )
    header = _FIXED.pack(MAGIC, VERSION, scheme.id, len(shape), 0, group_size, payload_nbytes)
    header += struct.pack(f"<{len(shape)}Q", *shape)
    if x.numel() == 0:
        return header + bytes(payload_nbytes)
    x2 = x.detach().to(device="cpu", dtype=torch.float32).reshape(rows, cols).contiguous()
    lo, hi = torch.aminmax(x2)  # one pass; NaN propagates into both
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        bad = int((~torch.isfinite(x2)).sum())
        raise CodecError(
            f"refusing to encode {bad} non-finite value(s) (NaN/inf, or beyond the float32 "
            f"range) out of {x2.numel()} in a tensor of shape {shape}"
        )
    frame = b"".join([header, *scheme.encode_payload(x2, group_size)])
    if len(frame) != frame_nbytes:  # a scheme bug must not ship a frame the decoder rejects
        raise CodecError(f"internal: {cfg.scheme} wrote {len(frame)} bytes, not {frame_nbytes}")
    return frame


def _byte_view(buf: bytes | bytearray | memoryview) -> memoryview:
    """A flat unsigned-byte view of ``buf``, or CodecError for anything that is not bytes-like."""
    if not isinstance(buf, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, bytearray or memoryview, got {type(buf).__name__}")
    try:
        mv = memoryview(buf)
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    except (TypeError, ValueError) as e:  # released or non-contiguous views
        raise CodecError(f"cannot read the buffer as contiguous bytes: {e}") from None


def _limit(max_frame_bytes: int | None) -> int:
    if max_frame_bytes is None:
        return DEFAULT_MAX_FRAME_BYTES
    if isinstance(max_frame_bytes, bool) or not isinstance(max_frame_bytes, int):
        raise CodecError(f"max_frame_bytes must be an int, got {type(max_frame_bytes).__name__}")
    if max_frame_bytes <= 0:
        raise CodecError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
    return max_frame_bytes


def _parse_header(mv: memoryview, limit: int) -> FrameHeader:
    """Validate the header at the start of ``mv``; the payload need not be there yet."""
    n = mv.nbytes
    if n < len(MAGIC):
        if bytes(mv) != MAGIC[:n]:
            raise MalformedFrameError(f"bad magic {bytes(mv)!r}: not an activation frame")
        raise TruncatedFrameError(f"buffer of {n} bytes ends inside the magic")
    if bytes(mv[: len(MAGIC)]) != MAGIC:
        raise MalformedFrameError(
            f"bad magic {bytes(mv[: len(MAGIC)])!r}, expected {MAGIC!r}: not an activation frame"
        )
    if n < _FIXED.size:
        raise TruncatedFrameError(f"buffer of {n} bytes ends inside the {_FIXED.size}-byte header")
    _, version, scheme_id, ndim, reserved, group_size, payload_nbytes = _FIXED.unpack_from(mv)
    if version != VERSION:
        raise MalformedFrameError(f"version {version} unsupported; this codec reads {VERSION}")
    scheme = scheme_for_id(scheme_id)
    if not 1 <= ndim <= MAX_NDIM:
        raise MalformedFrameError(f"frame declares ndim={ndim}, allowed 1..{MAX_NDIM}")
    if reserved:
        raise MalformedFrameError(f"reserved header byte is {reserved}, must be 0")
    if scheme.grouped and not valid_group_size(group_size):
        raise MalformedFrameError(
            f"{scheme.name} frame has group_size={group_size}; must be a power of two in [8, 4096]"
        )
    if not scheme.grouped and group_size:
        raise MalformedFrameError(f"{scheme.name} frame has group_size={group_size}, must be 0")
    header_nbytes = _header_nbytes(ndim)
    if header_nbytes + payload_nbytes > limit:
        raise FrameTooLargeError(
            f"frame declares {header_nbytes + payload_nbytes} bytes, over max_frame_bytes={limit}"
        )
    if n < header_nbytes:
        raise TruncatedFrameError(
            f"buffer of {n} bytes ends inside the {header_nbytes}-byte header of a {ndim}-dim frame"
        )
    shape = struct.unpack_from(f"<{ndim}Q", mv, _FIXED.size)
    # torch sizes are int64 and its stride maths multiplies max(d, 1), even for empty tensors.
    if math.prod(max(d, 1) for d in shape) > _INT64_MAX:
        raise MalformedFrameError(f"frame shape {shape} overflows int64 element counts")
    rows, cols = _rows_cols(shape)
    implied = scheme.payload_nbytes(rows, cols, group_size)
    if header_nbytes + implied > limit:
        raise FrameTooLargeError(
            f"frame shape {shape} needs a {implied}-byte {scheme.name} payload, over "
            f"max_frame_bytes={limit}"
        )
    if implied != payload_nbytes:
        raise MalformedFrameError(
            f"frame declares a {payload_nbytes}-byte payload but a {scheme.name} tensor of shape "
            f"{shape} takes {implied}"
        )
    return FrameHeader(scheme.name, shape, group_size, payload_nbytes)


def read_header(
    buf: bytes | bytearray | memoryview, max_frame_bytes: int | None = None
) -> FrameHeader:
    """Parse and validate the header at the start of ``buf`` (the payload may still be missing).

    Lets a reader learn ``frame_nbytes`` from the first ``header_nbytes`` bytes, and refuse an
    oversized frame before receiving it. Raises the same errors as ``decode``.
    """
    return _parse_header(_byte_view(buf), _limit(max_frame_bytes))


def decode(buf: bytes | bytearray | memoryview, max_frame_bytes: int | None = None) -> torch.Tensor:
    """Decode one frame into a float32 CPU tensor of the encoded shape.

    ``buf`` must hold exactly one frame. ``max_frame_bytes`` (default 256 MiB) bounds the frame;
    the decoded tensor is at most 8x the payload (int4/nf4 to float32). Raises only CodecError
    subclasses: TruncatedFrameError, MalformedFrameError, FrameTooLargeError, UnknownSchemeError.
    """
    mv = _byte_view(buf)
    limit = _limit(max_frame_bytes)
    if mv.nbytes > limit:
        raise FrameTooLargeError(f"buffer of {mv.nbytes} bytes is over max_frame_bytes={limit}")
    header = _parse_header(mv, limit)
    if mv.nbytes < header.frame_nbytes:
        raise TruncatedFrameError(
            f"frame needs {header.frame_nbytes} bytes ({header.header_nbytes} header + "
            f"{header.payload_nbytes} payload), buffer has {mv.nbytes}"
        )
    if mv.nbytes > header.frame_nbytes:
        raise MalformedFrameError(
            f"{mv.nbytes - header.frame_nbytes} trailing bytes after the "
            f"{header.frame_nbytes}-byte frame"
        )
    if math.prod(header.shape) == 0:
        return torch.zeros(header.shape)
    rows, cols = _rows_cols(header.shape)
    payload = mv[header.header_nbytes :]
    out = get_scheme(header.scheme).decode_payload(payload, rows, cols, header.group_size)
    # finite statistics can still decode to infinity (an int8 scale of 1e38 times 127)
    check_stats(out, f"decoded {header.scheme} values")
    return out.reshape(header.shape)
