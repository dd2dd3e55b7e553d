"""The decoder against hostile input: every failure is a typed CodecError, never a crash."""

from __future__ import annotations

import array
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mobillm.codec import (
    SCHEMES,
    CodecConfig,
    CodecError,
    FrameHeader,
    FrameTooLargeError,
    MalformedFrameError,
    TruncatedFrameError,
    UnknownSchemeError,
    decode,
    encode,
    read_header,
)

FUZZ = settings(max_examples=300, deadline=None)
SCHEME_ID = {"fp16": 1, "int8": 2, "int4": 3, "nf4": 4}


def _header(
    scheme_id: int = 1,
    dims: tuple[int, ...] = (2, 3),
    payload: int = 12,
    group_size: int = 0,
    *,
    magic: bytes = b"MBLA",
    version: int = 1,
    ndim: int | None = None,
    reserved: int = 0,
) -> bytes:
    """A frame header built field by field, independently of the codec's own packer."""
    ndim = len(dims) if ndim is None else ndim
    fixed = struct.pack("<4sBBBBIQ", magic, version, scheme_id, ndim, reserved, group_size, payload)
    return fixed + b"".join(struct.pack("<Q", d) for d in dims)


def _frames() -> list[tuple[bytes, tuple[int, ...]]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for scheme in SCHEMES:
        for shape in [(3, 70), (5,), (2, 3, 9), (1, 1)]:
            x = torch.randn(shape, generator=gen) * 5
            out.append((encode(x, CodecConfig(scheme=scheme, group_size=16)), shape))
    return out


FRAMES = _frames()


def _decode_or_codec_error(buf: bytes) -> torch.Tensor | None:
    try:
        return decode(buf)
    except Exception as e:
        assert isinstance(e, CodecError), f"{type(e).__name__}: {e}"
        return None


def test_valid_frames_decode_and_headers_read() -> None:
    for frame, shape in FRAMES:
        assert decode(frame).shape == shape
        assert decode(bytearray(frame)).shape == shape
        assert decode(memoryview(b"xx" + frame)[2:]).shape == shape
        header = read_header(frame)
        assert header.shape == shape and header.frame_nbytes == len(frame)
        assert read_header(frame[: header.header_nbytes]) == header  # payload not needed yet
    frame = encode(torch.randn(1, 576), CodecConfig(scheme="int4", group_size=64))
    assert read_header(frame) == FrameHeader("int4", (1, 576), 64, 324)


@pytest.mark.parametrize("index", range(len(FRAMES)))
def test_every_truncation_is_reported(index: int) -> None:
    frame, _ = FRAMES[index]
    for cut in range(len(frame)):
        with pytest.raises(TruncatedFrameError):
            decode(frame[:cut])


@pytest.mark.parametrize("index", range(len(FRAMES)))
def test_trailing_bytes_are_malformed(index: int) -> None:
    frame, _ = FRAMES[index]
    for extra in (b"\x00", b"MBLA", bytes(100)):
        with pytest.raises(MalformedFrameError, match="trailing"):
            decode(frame + extra)


@FUZZ
@given(data=st.data())
def test_header_byte_flips_fail_cleanly(data: st.DataObject) -> None:
    frame, shape = data.draw(st.sampled_from(FRAMES))
    header_nbytes = read_header(frame).header_nbytes
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, header_nbytes - 1))
        buf[pos] ^= data.draw(st.integers(1, 255))
    y = _decode_or_codec_error(bytes(buf))
    assert y is None or y.shape == shape


@FUZZ
@given(data=st.data())
def test_payload_byte_flips_never_change_shape(data: st.DataObject) -> None:
    frame, shape = data.draw(st.sampled_from(FRAMES))
    buf = bytearray(frame)
    pos = data.draw(st.integers(0, len(buf) - 1))
    buf[pos] ^= data.draw(st.integers(1, 255))
    y = _decode_or_codec_error(bytes(buf))
    assert y is None or (y.shape == shape and y.dtype == torch.float32)


@FUZZ
@given(
    st.binary(max_size=300), st.sampled_from([b"", b"MBLA", b"MBLA\x01", b"MBLA\x01\x03\x02\x00"])
)
def test_garbage_is_a_codec_error(tail: bytes, prefix: bytes) -> None:
    with pytest.raises(CodecError):
        decode(prefix + tail)


@FUZZ
@given(
    scheme_id=st.integers(0, 6),
    dims=st.lists(st.integers(0, 40) | st.integers(0, 2**64 - 1), min_size=0, max_size=9),
    group_size=st.sampled_from([0, 8, 16, 64, 7, 2**32 - 1]),
    payload=st.integers(0, 2**64 - 1) | st.integers(0, 4000),
    body=st.binary(max_size=2000),
)
def test_random_headers_fail_cleanly_or_match_their_shape(
    scheme_id: int, dims: list[int], group_size: int, payload: int, body: bytes
) -> None:
    hdr = _header(scheme_id, tuple(dims), payload, group_size)
    for buf in (hdr + body, hdr + bytes(min(payload, 4000))):
        y = _decode_or_codec_error(buf)
        assert y is None or (tuple(y.shape) == tuple(dims) and y.dtype == torch.float32)


@pytest.mark.parametrize(
    ("dims", "payload"),
    [((2**20, 2**20), 2 * 2**40), ((2**20, 2**20), 0), ((2**40,), 2), ((1, 2**27), 2**28)],
)
def test_huge_declared_shapes_are_refused_before_allocation(
    dims: tuple[int, ...], payload: int
) -> None:
    hdr = _header(SCHEME_ID["fp16"], dims, payload)
    with pytest.raises(FrameTooLargeError):
        decode(hdr)  # header alone: refused on what it declares, not on the missing payload
    with pytest.raises(FrameTooLargeError):
        read_header(hdr)


def test_a_generous_limit_still_waits_for_the_payload() -> None:
    hdr = _header(SCHEME_ID["fp16"], (2**20, 2**20), 2 * 2**40)
    with pytest.raises(TruncatedFrameError):
        decode(hdr, max_frame_bytes=2**62)  # would need 2 TiB: proves nothing was allocated


@pytest.mark.parametrize(
    "dims", [(2**40, 2**40), (2**63, 1), (2**64 - 1,), (2**62, 2**62, 0), (0, 2**63)]
)
def test_shape_overflow_is_malformed(dims: tuple[int, ...]) -> None:
    with pytest.raises(MalformedFrameError, match="overflow"):
        decode(_header(SCHEME_ID["int8"], dims, 0), max_frame_bytes=2**63)


def test_max_frame_bytes_is_enforced() -> None:
    frame, shape = FRAMES[0]
    assert decode(frame, max_frame_bytes=len(frame)).shape == shape
    with pytest.raises(FrameTooLargeError):
        decode(frame, max_frame_bytes=len(frame) - 1)
    with pytest.raises(FrameTooLargeError):  # an oversized buffer, even of garbage
        decode(bytes(300), max_frame_bytes=100)
    for bad in (0, -5, True, 1.5, "big"):
        with pytest.raises(CodecError, match="max_frame_bytes"):
            decode(frame, max_frame_bytes=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("buf", "error", "match"),
    [
        (_header(magic=b"MBLB") + bytes(12), MalformedFrameError, "magic"),
        (b"XY", MalformedFrameError, "magic"),
        (b"MB", TruncatedFrameError, "magic"),
        (_header(version=2) + bytes(12), MalformedFrameError, "version"),
        (_header(scheme_id=0) + bytes(12), UnknownSchemeError, "unknown scheme id 0"),
        (_header(scheme_id=99) + bytes(12), UnknownSchemeError, "fp16=1"),
        (_header(dims=()) + bytes(12), MalformedFrameError, "ndim=0"),
        (_header(dims=(1,) * 9, payload=2) + bytes(2), MalformedFrameError, "ndim=9"),
        (_header(reserved=1) + bytes(12), MalformedFrameError, "reserved"),
        (_header(group_size=64) + bytes(12), MalformedFrameError, "group_size"),
        (_header(3, (2, 3), 11, 12) + bytes(11), MalformedFrameError, "group_size"),
        (_header(3, (2, 3), 11, 0) + bytes(11), MalformedFrameError, "group_size"),
        (_header(payload=13) + bytes(13), MalformedFrameError, "12"),
        (_header(payload=11) + bytes(11), MalformedFrameError, "12"),
    ],
)
def test_bad_header_fields(buf: bytes, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        decode(buf)


def _patched(frame: bytes, offset: int, raw: bytes) -> bytes:
    """``frame`` with payload bytes at ``offset`` replaced by ``raw``."""
    start = read_header(frame).header_nbytes + offset
    return frame[:start] + raw + frame[start + len(raw) :]


@pytest.mark.parametrize(
    ("scheme", "offset", "raw"),
    [
        ("fp16", 6, np.float16(np.inf).tobytes()),
        ("fp16", 0, np.float16(np.nan).tobytes()),
        ("int8", 4, np.float32(np.nan).tobytes()),  # second row's scale
        ("int8", 0, np.float32(-1.0).tobytes()),
        ("int8", 0, np.float32(np.inf).tobytes()),
        ("int8", 9, b"\x80"),  # code -128
        ("int4", 0, np.float16(-np.inf).tobytes()),  # first group's min
        ("int4", 2, np.float16(-0.5).tobytes()),  # first group's scale
        ("int4", 6, np.float16(np.nan).tobytes()),
        ("nf4", 2, np.float16(np.nan).tobytes()),
        ("nf4", 0, np.float16(-2.0).tobytes()),
    ],
)
def test_payloads_the_encoder_cannot_write_are_malformed(
    scheme: str, offset: int, raw: bytes
) -> None:
    frame = encode(torch.randn(2, 20) + 1, CodecConfig(scheme=scheme, group_size=8))
    assert decode(frame).shape == (2, 20)
    with pytest.raises(MalformedFrameError):
        decode(_patched(frame, offset, raw))


@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_nonzero_padding_nibble_is_malformed(scheme: str) -> None:
    frame = encode(torch.randn(1, 9), CodecConfig(scheme=scheme, group_size=8))
    last = frame[-1]
    assert last >> 4 == 0
    with pytest.raises(MalformedFrameError, match="padding nibble"):
        decode(frame[:-1] + bytes([last | 0x10]))


@pytest.mark.parametrize("buf", ["MBLA", None, [1, 2, 3], 12, memoryview(bytes(64))[::2]])
def test_non_bytes_input_is_a_codec_error(buf: object) -> None:
    with pytest.raises(CodecError):
        decode(buf)  # type: ignore[arg-type]


def test_non_byte_memoryviews_are_read_as_bytes() -> None:
    frame, shape = next((f, s) for f, s in FRAMES if len(f) % 4 == 0)
    words = array.array("I")
    words.frombytes(frame)
    assert decode(memoryview(words)).shape == shape
