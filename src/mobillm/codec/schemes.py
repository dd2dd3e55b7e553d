"""Quantization schemes for activation frames: one small class each, kept in a registry.

Every scheme sees a 2-D float32 view ``(rows, cols)`` of the activation tensor (``rows`` is the
product of the leading dims, ``cols`` the last dim, along which it quantizes) and turns it into a
little-endian payload and back. With ``R = rows``, ``C = cols`` and ``G = ceil(C / group_size)``
groups per row:

======  ===============================================================  ====================
scheme  payload layout, in order                                         bytes
======  ===============================================================  ====================
fp16    ``R*C`` float16 values, clamped to ±65504                        ``2RC``
int8    ``R`` float32 scales, ``R*C`` int8 codes in [-127, 127]          ``4R + RC``
int4    ``R*G`` (min, scale) float16 pairs, packed codes in [0, 15]      ``4RG + ceil(RC/2)``
nf4     ``R*G`` float16 absmax scales, packed NormalFloat4 indices       ``2RG + ceil(RC/2)``
======  ===============================================================  ====================

Packed codes hold two 4-bit values per byte, low nibble first, in row-major element order; an odd
element count leaves one zero padding nibble. A last group shorter than ``group_size`` is padded
with copies of the row's last value while computing its statistics, so padding never widens it,
and only the real elements are stored.

int4 and nf4 keep their per-group statistics in float16 (4 and 2 bytes per group rather than 8
and 4 for float32), rounded outwards -- min down, scale up -- so the quantization grid still
covers every value of the group; the costs are a step at most 2**-10 wider and, for int4, a min
at most one float16 ulp low. Both therefore saturate inputs at ±65504, like fp16 (int4's top
level can sit up to one step past it).

Adding a scheme is one class with ``name``, ``id``, ``grouped``, ``payload_nbytes``,
``encode_payload`` and ``decode_payload``, plus one ``register`` call. Decoders get exactly
``payload_nbytes`` bytes (the frame layer checks the length) and must reject any payload the
encoder could not have produced with ``MalformedFrameError``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol

import numpy as np
import torch

from mobillm.codec.errors import MalformedFrameError, UnknownSchemeError

F16_MAX = 65504.0
MIN_GROUP_SIZE = 8
MAX_GROUP_SIZE = 4096

# QLoRA's NormalFloat4 levels (Dettmers et al. 2023, as shipped in bitsandbytes).
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
_NF4 = torch.tensor(NF4_CODEBOOK, dtype=torch.float32)
_NF4_MIDPOINTS = (_NF4[1:] + _NF4[:-1]) / 2
_F16_TINY = torch.finfo(torch.float16).smallest_normal * 2**-10  # smallest subnormal, 2**-24


class Scheme(Protocol):
    """What the frame layer needs from a scheme; ``x`` is always ``(rows, cols)`` float32."""

    name: str
    id: int
    grouped: bool  # whether the frame's group_size field is used (else it must be 0)

    def payload_nbytes(self, rows: int, cols: int, group_size: int) -> int: ...

    def encode_payload(self, x: torch.Tensor, group_size: int) -> list[bytes]: ...

    def decode_payload(
        self, payload: memoryview, rows: int, cols: int, group_size: int
    ) -> torch.Tensor: ...


def valid_group_size(group_size: object) -> bool:
    """True for a power of two in [8, 4096] (bools are not group sizes)."""
    return (
        isinstance(group_size, int)
        and not isinstance(group_size, bool)
        and MIN_GROUP_SIZE <= group_size <= MAX_GROUP_SIZE
        and group_size & (group_size - 1) == 0
    )


def _to_le_bytes(t: torch.Tensor, dtype: str) -> bytes:
    """Serialise a CPU tensor as the numpy ``dtype`` given (little-endian on every host)."""
    return t.contiguous().numpy().astype(dtype, copy=False).tobytes()


def _read(payload: memoryview, offset: int, count: int, dtype: str) -> torch.Tensor:
    """``count`` values of little-endian numpy ``dtype`` at byte ``offset``, as a native tensor.

    Copies, so the tensor owns aligned, writable memory whatever the caller's buffer was.
    """
    arr = np.frombuffer(payload, dtype=np.dtype(dtype), count=count, offset=offset)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def _f16_round_up(v: torch.Tensor) -> torch.Tensor:
    """Smallest float16 >= each float32 value in ``v`` (``v`` within ±65504)."""
    h = v.to(torch.float16)
    return torch.where(h.float() < v, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


def _f16_round_down(v: torch.Tensor) -> torch.Tensor:
    """Largest float16 <= each float32 value in ``v`` (``v`` within ±65504)."""
    h = v.to(torch.float16)
    return torch.where(h.float() > v, torch.nextafter(h, torch.full_like(h, -torch.inf)), h)


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(rows, cols)`` -> ``(rows, G, group_size)``; a short last group repeats its last value."""
    rows, cols = x.shape
    pad = -cols % group_size
    if pad:
        x = torch.cat([x, x[:, -1:].expand(rows, pad)], dim=1)
    return x.view(rows, -1, group_size)


def _ungroup(y: torch.Tensor, cols: int) -> torch.Tensor:
    """``(rows, G, group_size)`` -> ``(rows, cols)``, dropping the padding of the last group."""
    rows = y.shape[0]
    y = y.reshape(rows, -1)
    return y if y.shape[1] == cols else y[:, :cols].contiguous()


def _codes_by_group(codes: torch.Tensor, rows: int, cols: int, group_size: int) -> torch.Tensor:
    """Flat ``(rows*cols,)`` codes -> ``(rows, G, group_size)``; padding codes are 0."""
    codes = codes.view(rows, cols)
    pad = -cols % group_size
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return codes.view(rows, -1, group_size)


def _pack_nibbles(q: torch.Tensor) -> bytes:
    """Flat uint8 codes in [0, 15] -> bytes, two per byte, low nibble first, zero-padded."""
    q = q.reshape(-1)
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    pairs = q.view(-1, 2)
    return _to_le_bytes(pairs[:, 0] | (pairs[:, 1] << 4), "u1")


def _unpack_nibbles(payload: memoryview, offset: int, count: int) -> torch.Tensor:
    """Inverse of ``_pack_nibbles``: ``count`` uint8 codes from the bytes at ``offset``."""
    packed = _read(payload, offset, (count + 1) // 2, "u1")
    if count % 2 and int(packed[-1]) >> 4:
        raise MalformedFrameError("padding nibble after the last 4-bit code is not zero")
    codes = torch.empty((packed.numel(), 2), dtype=torch.uint8)
    torch.bitwise_and(packed, 0x0F, out=codes[:, 0])
    torch.bitwise_right_shift(packed, 4, out=codes[:, 1])
    return codes.view(-1)[:count]


def check_stats(values: torch.Tensor, what: str, nonneg: torch.Tensor | None = None) -> None:
    """Reject non-finite decoded values or statistics, and negative scales (never written)."""
    if values.numel() == 0:
        return
    lo, hi = torch.aminmax(values)  # NaN propagates into both, and one pass beats isfinite
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise MalformedFrameError(f"{what} contain NaN or infinity")
    if nonneg is not None and nonneg.numel() and nonneg.amin().item() < 0:
        raise MalformedFrameError(f"{what} contain a negative scale")


class Fp16Scheme:
    """Raw float16; values beyond ±65504 are clamped to it. Relative error <= 2**-11."""

    name: ClassVar[str] = "fp16"
    id: ClassVar[int] = 1
    grouped: ClassVar[bool] = False

    def payload_nbytes(self, rows: int, cols: int, group_size: int) -> int:
        return 2 * rows * cols

    def encode_payload(self, x: torch.Tensor, group_size: int) -> list[bytes]:
        return [_to_le_bytes(x.to(torch.float16).clamp_(-F16_MAX, F16_MAX), "<f2")]

    def decode_payload(
        self, payload: memoryview, rows: int, cols: int, group_size: int
    ) -> torch.Tensor:
        return _read(payload, 0, rows * cols, "<f2").float().view(rows, cols)


class Int8Scheme:
    """Per-row symmetric absmax: float32 scale = absmax/127, codes round(x/scale) in [-127, 127].

    Error per element <= scale/2 (plus float32 rounding); an all-zero row has scale 0.
    """

    name: ClassVar[str] = "int8"
    id: ClassVar[int] = 2
    grouped: ClassVar[bool] = False

    def payload_nbytes(self, rows: int, cols: int, group_size: int) -> int:
        return 4 * rows + rows * cols

    def encode_payload(self, x: torch.Tensor, group_size: int) -> list[bytes]:
        # amin and amax separately: aminmax along a dim is several times slower on CPU.
        scale = torch.maximum(x.amin(dim=1).neg_(), x.amax(dim=1)).div_(127)  # (rows,)
        # A zero scale (all-zero row, or absmax so tiny that /127 underflows) must not divide.
        safe = torch.where(scale > 0, scale, 1.0)
        q = torch.div(x, safe[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return [_to_le_bytes(scale, "<f4"), _to_le_bytes(q, "i1")]

    def decode_payload(
        self, payload: memoryview, rows: int, cols: int, group_size: int
    ) -> torch.Tensor:
        scale = _read(payload, 0, rows, "<f4")
        check_stats(scale, "int8 row scales", nonneg=scale)
        q = _read(payload, 4 * rows, rows * cols, "i1")
        if q.amin().item() == -128:
            raise MalformedFrameError("int8 code -128 found; the encoder only writes [-127, 127]")
        return q.view(rows, cols).float().mul_(scale[:, None])


class Int4Scheme:
    """Group-wise asymmetric 4-bit: float16 (min, scale) per group, codes round((x-min)/scale).

    min is rounded down and scale = (max - min)/15 rounded up to float16, so codes 0..15 cover
    the group and the error per element is <= scale/2 (plus float32 rounding).
    """

    name: ClassVar[str] = "int4"
    id: ClassVar[int] = 3
    grouped: ClassVar[bool] = True

    def payload_nbytes(self, rows: int, cols: int, group_size: int) -> int:
        return 4 * rows * -(-cols // group_size) + (rows * cols + 1) // 2

    def encode_payload(self, x: torch.Tensor, group_size: int) -> list[bytes]:
        g = _groups(x, group_size)  # (rows, G, group_size)
        # Clamping the statistics, not x, clamps x to ±65504: codes saturate at 0 and 15.
        lo16 = _f16_round_down(g.amin(dim=-1).clamp_(-F16_MAX, F16_MAX))
        hi = g.amax(dim=-1).clamp_(-F16_MAX, F16_MAX)
        lo32 = lo16.float()
        span = hi - lo32
        scale16 = _f16_round_up(span / 15)
        # span/15 can underflow to 0 in float32 while span > 0; keep such a group's step nonzero.
        scale16 = torch.where((scale16 == 0) & (span > 0), _F16_TINY, scale16)
        scale32 = scale16.float()
        safe = torch.where(scale32 > 0, scale32, 1.0)  # scale 0: the whole group equals min
        q = torch.sub(g, lo32[..., None]).div_(safe[..., None]).round_().clamp_(0, 15)
        stats = torch.stack([lo16, scale16], dim=-1)  # (rows, G, 2)
        codes = _ungroup(q.to(torch.uint8), x.shape[1])
        return [_to_le_bytes(stats, "<f2"), _pack_nibbles(codes)]

    def decode_payload(
        self, payload: memoryview, rows: int, cols: int, group_size: int
    ) -> torch.Tensor:
        n_groups = -(-cols // group_size)
        stats = _read(payload, 0, 2 * rows * n_groups, "<f2").view(rows, n_groups, 2).float()
        lo, scale = stats[..., 0:1], stats[..., 1:2]
        check_stats(stats, "int4 group min/scale", nonneg=scale)
        codes = _unpack_nibbles(payload, 4 * rows * n_groups, rows * cols)
        q = _codes_by_group(codes, rows, cols, group_size).float()
        return _ungroup(q.mul_(scale).add_(lo), cols)


class NF4Scheme:
    """Group-wise 4-bit NormalFloat (QLoRA codebook) with a float16 absmax scale per group.

    The scale is absmax rounded up to float16, so |x|/scale <= 1 and each element is off by at
    most the largest half-gap of the codebook (about 0.152) times the scale.
    """

    name: ClassVar[str] = "nf4"
    id: ClassVar[int] = 4
    grouped: ClassVar[bool] = True

    def payload_nbytes(self, rows: int, cols: int, group_size: int) -> int:
        return 2 * rows * -(-cols // group_size) + (rows * cols + 1) // 2

    def encode_payload(self, x: torch.Tensor, group_size: int) -> list[bytes]:
        g = _groups(x, group_size)  # (rows, G, group_size)
        absmax = torch.maximum(g.amin(dim=-1).neg_(), g.amax(dim=-1)).clamp_(max=F16_MAX)
        scale16 = _f16_round_up(absmax)
        scale32 = scale16.float()
        safe = torch.where(scale32 > 0, scale32, 1.0)  # all-zero group: every value maps to 0.0
        # The clamp only bites for inputs beyond ±65504, which saturate like fp16.
        xn = torch.div(g, safe[..., None]).clamp_(-1, 1)
        codes = _ungroup(_nf4_nearest(xn.view(-1)).view(g.shape), x.shape[1])
        return [_to_le_bytes(scale16, "<f2"), _pack_nibbles(codes)]

    def decode_payload(
        self, payload: memoryview, rows: int, cols: int, group_size: int
    ) -> torch.Tensor:
        n_groups = -(-cols // group_size)
        scale = _read(payload, 0, rows * n_groups, "<f2").view(rows, n_groups, 1).float()
        check_stats(scale, "nf4 group scales", nonneg=scale)
        codes = _unpack_nibbles(payload, 2 * rows * n_groups, rows * cols)
        levels = _NF4.index_select(0, _codes_by_group(codes, rows, cols, group_size).view(-1).int())
        return _ungroup(levels.view(rows, n_groups, group_size).mul_(scale), cols)


_NF4_BINS = 256  # table bins on [-1, 1]; see _nf4_nearest
_NF4_BIN_TABLE = torch.searchsorted(
    _NF4_MIDPOINTS.double(), -1 + 2 * torch.arange(_NF4_BINS + 1, dtype=torch.float64) / _NF4_BINS
).to(torch.int32)
_NF4_MIDPOINTS_INF = torch.cat([_NF4_MIDPOINTS, torch.tensor([torch.inf])])


def _nf4_nearest(xn: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level for each value of ``xn`` in [-1, 1]; ``(n,)`` -> uint8.

    A 256-bin table on [-1, 1] gives the number of codebook midpoints below each bin; no bin
    holds more than one midpoint (they sit >= 2e-4 from bin edges), so one comparison with the
    next midpoint finishes the count, faster on CPU than torch.bucketize.
    """
    bins = (xn + 1).mul_(_NF4_BINS / 2).to(torch.int32).clamp_(0, _NF4_BINS)
    idx = _NF4_BIN_TABLE.index_select(0, bins)
    idx += xn > _NF4_MIDPOINTS_INF.index_select(0, idx)
    return idx.to(torch.uint8)


_BY_NAME: dict[str, Scheme] = {}
_BY_ID: dict[int, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    """Add a scheme to the registry; names and ids (1..255, the frame's u8) must be unique."""
    if not 1 <= scheme.id <= 255:
        raise ValueError(f"scheme id must fit a u8 in [1, 255], got {scheme.id}")
    if scheme.name in _BY_NAME or scheme.id in _BY_ID:
        raise ValueError(f"scheme {scheme.name!r} (id {scheme.id}) clashes with a registered one")
    _BY_NAME[scheme.name] = scheme
    _BY_ID[scheme.id] = scheme
    return scheme


def scheme_names() -> tuple[str, ...]:
    """Names of the registered schemes, in registration order."""
    return tuple(_BY_NAME)


def get_scheme(name: str) -> Scheme:
    """The scheme registered under ``name``; UnknownSchemeError names the known ones."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise UnknownSchemeError(
            f"unknown codec scheme {name!r}; known: {', '.join(_BY_NAME)}"
        ) from None


def scheme_for_id(scheme_id: int) -> Scheme:
    """The scheme whose frame id is ``scheme_id``."""
    try:
        return _BY_ID[scheme_id]
    except KeyError:
        known = ", ".join(f"{s.name}={i}" for i, s in _BY_ID.items())
        raise UnknownSchemeError(
            f"frame names unknown scheme id {scheme_id}; known: {known}"
        ) from None


for _scheme in (Fp16Scheme(), Int8Scheme(), Int4Scheme(), NF4Scheme()):
    register(_scheme)

SCHEMES: tuple[str, ...] = scheme_names()
