"""Round trips, error bounds, byte counts and config checks for the activation codec."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mobillm.codec import (
    SCHEMES,
    CodecConfig,
    CodecError,
    FrameTooLargeError,
    decode,
    encode,
    encoded_nbytes,
    read_header,
)
from mobillm.codec import schemes as schemes_mod
from mobillm.errors import ConfigError, MobiLLMError

F16_MAX = 65504.0
# QLoRA's NF4 levels, copied here so the bound does not trust the module's own table.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip
NF4_MAX_HALF_GAP = float(np.diff(NF4_LEVELS).max() / 2)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def activations(draw: st.DrawFn) -> torch.Tensor:
    """Float32 tensors of 1..3 dims shaped like selected-token activations, with LLM quirks.

    Values stay within ±2e4 (inside float16 range) so every scheme's bound applies unclamped.
    """
    ndim = draw(st.integers(1, 3))
    lead = draw(st.lists(st.integers(1, 6), min_size=ndim - 1, max_size=ndim - 1))
    shape = (*lead, draw(st.integers(1, 300)))
    n = math.prod(shape)
    if n <= 400 and draw(st.booleans()):
        elems = st.floats(-2e4, 2e4, width=32, allow_subnormal=False)
        x = torch.from_numpy(draw(arrays(np.float32, n, elements=elems))).reshape(shape)
    else:
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        x = torch.randn(shape, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
        outliers = torch.rand(shape[-1], generator=gen) < 0.02  # a few 100x channels
        x[..., outliers] *= 100
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] > 1 and draw(st.booleans()):
        rows[0] = 0.0  # an all-zero row
    if rows.shape[0] > 2 and draw(st.booleans()):
        rows[1] = draw(st.floats(-1e4, 1e4, width=32))  # a constant row
    return x


def _groups(x: torch.Tensor, group_size: int) -> list[tuple[slice, torch.Tensor]]:
    """(column slice, float64 values) for each group of the 2-D float64 view of ``x``."""
    x2 = x.double().reshape(-1, x.shape[-1])
    cols = x2.shape[1]
    return [
        (slice(j, j + group_size), x2[:, j : j + group_size]) for j in range(0, cols, group_size)
    ]


def _bound(x: torch.Tensor, cfg: CodecConfig) -> torch.Tensor:
    """Largest |decode(encode(x)) - x| allowed per element, derived from the scheme definitions."""
    x64 = x.double().clamp(-F16_MAX, F16_MAX) if cfg.scheme != "int8" else x.double()
    x2 = x64.reshape(-1, x.shape[-1])
    if cfg.scheme == "fp16":  # half an ulp: relative 2**-11, absolute 2**-25 among subnormals
        return (x2.abs() * 2**-11 + 2**-25).reshape(x.shape)
    if cfg.scheme == "int8":  # half a step of absmax/127, plus float32 rounding in x/s and q*s
        absmax = x2.abs().amax(dim=1, keepdim=True)
        return (absmax / 254 * (1 + 1e-4) + 1e-35).expand_as(x2).reshape(x.shape)
    out = torch.empty_like(x2)
    for cols, g in _groups(x64, cfg.group_size):
        lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
        big = torch.maximum(lo.abs(), hi.abs())
        if cfg.scheme == "int4":
            # min rounded down to float16 (<= 2**-10 |min| + 2**-24 lower), step rounded up.
            span = (hi - lo) + lo.abs() * 2**-10 + 2**-24
            step = span / 15 * (1 + 2**-10) * (1 + 2**-20) + 2**-24
            bound = step / 2 * (1 + 1e-4) + big * 2**-22
        else:  # nf4: scale = absmax rounded up to float16; nearest level within a half gap
            scale = big * (1 + 2**-10) + 2**-24
            bound = scale * (NF4_MAX_HALF_GAP + 1e-6)
        out[:, cols] = bound.expand_as(g)
    return out.reshape(x.shape)


def _configs(scheme: str) -> st.SearchStrategy[CodecConfig]:
    return st.sampled_from([8, 16, 64, 128]).map(lambda g: CodecConfig(scheme=scheme, group_size=g))


def _check_roundtrip(x: torch.Tensor, cfg: CodecConfig) -> None:
    frame = encode(x, cfg)
    assert len(frame) == encoded_nbytes(tuple(x.shape), cfg)
    y = decode(frame)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y.double() - x.double()).abs()
    bound = _bound(x, cfg)
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{cfg.scheme} g={cfg.group_size}: error {err.flatten()[worst]:.3g} > bound "
        f"{bound.flatten()[worst]:.3g} at x={x.flatten()[worst]:.6g}"
    )


@pytest.mark.parametrize("scheme", SCHEMES)
@PROPERTY
@given(data=st.data())
def test_roundtrip_within_bound(scheme: str, data: st.DataObject) -> None:
    _check_roundtrip(data.draw(activations()), data.draw(_configs(scheme)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fixed_cases_within_bound(scheme: str) -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [
        torch.zeros(4, 576),
        torch.full((3, 100), 1234.5),
        torch.full((2, 9), -1e4),
        torch.tensor([[1.0, 1.0 + 2**-20, 1.0 - 2**-22]]),  # span far below a float16 ulp
        torch.tensor([1e-30, -3e-38, 0.0, 2e-45]),  # values that make scales underflow
        torch.randn(7, 1, 65, generator=gen) * 1e4,
        torch.randn(1, 1, generator=gen),
    ]
    for x in cases:
        for group_size in (8, 64):
            _check_roundtrip(x, CodecConfig(scheme=scheme, group_size=group_size))


def test_nf4_picks_the_nearest_level() -> None:
    mids = ((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).astype(np.float32)
    probes = np.concatenate(
        [[1.0], np.linspace(-1, 1, 4001), mids, np.nextafter(mids, 2), np.nextafter(mids, -2)]
    ).astype(np.float32)
    # One group whose absmax is exactly 1.0: the scale is 1.0 and the codes are the levels.
    y = decode(encode(torch.from_numpy(probes)[None], CodecConfig(scheme="nf4", group_size=4096)))
    err = np.abs(y[0].double().numpy() - probes)
    nearest = np.abs(probes[:, None].astype(np.float64) - NF4_LEVELS[None, :]).min(axis=1)
    assert np.all(err <= nearest + 1e-7)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_and_layouts(scheme: str, dtype: torch.dtype) -> None:
    x = (torch.randn(40, 24, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    cfg = CodecConfig(scheme=scheme, group_size=8)
    for t in (x, x.t(), x[::2, 1:]):  # non-contiguous views too
        y = decode(encode(t, cfg))
        assert y.shape == t.shape
        assert bool(((y.double() - t.double()).abs() <= _bound(t.float(), cfg) + 1e-3).all())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(0, 576), (4, 0), (0,), (2, 0, 3)])
def test_empty_tensors(scheme: str, shape: tuple[int, ...]) -> None:
    cfg = CodecConfig(scheme=scheme)
    frame = encode(torch.zeros(shape), cfg)
    assert len(frame) == encoded_nbytes(shape, cfg)
    y = decode(frame)
    assert y.shape == shape and y.dtype == torch.float32


@pytest.mark.parametrize("scheme", ["fp16", "int4", "nf4"])
def test_values_beyond_float16_range_are_clamped(scheme: str) -> None:
    """Out-of-range values decode as if clamped to ±65504 first (int4 may land a step past)."""
    x = torch.tensor([[1e5, -3e38, 1.0, 65504.0, -70000.0, 0.5, 2.0, 3.0]])
    cfg = CodecConfig(scheme=scheme, group_size=8)
    y = decode(encode(x, cfg))
    clamped = x.clamp(-F16_MAX, F16_MAX)
    assert bool(((y - clamped).abs() <= _bound(clamped, cfg)).all())


def test_int8_keeps_float32_range() -> None:
    x = torch.tensor([[1e30, -2e30, 5e29], [3e-30, 0.0, -1e-30]])
    y = decode(encode(x, CodecConfig(scheme="int8")))
    assert bool(((y.double() - x.double()).abs() <= _bound(x, CodecConfig())).all())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_refused(scheme: str, bad: float) -> None:
    x = torch.randn(3, 16)
    x[1, 5] = bad
    with pytest.raises(CodecError, match="non-finite"):
        encode(x, CodecConfig(scheme=scheme))


def test_float64_beyond_float32_range_is_refused() -> None:
    with pytest.raises(CodecError, match="non-finite"):
        encode(torch.tensor([[1e300, 1.0]], dtype=torch.float64), CodecConfig())


@pytest.mark.parametrize(
    "x",
    [torch.ones(2, 3, dtype=torch.int32), torch.ones(2, dtype=torch.bool), torch.tensor(1.0),
     torch.ones((1,) * 9), [[1.0, 2.0]]],
    ids=["int", "bool", "0-dim", "9-dim", "list"],
)  # fmt: skip
def test_unencodable_inputs(x: object) -> None:
    with pytest.raises(CodecError):
        encode(x, CodecConfig())  # type: ignore[arg-type]


def test_encode_refuses_frames_over_the_limit() -> None:
    cfg = CodecConfig(scheme="fp16", max_frame_bytes=1000)
    assert len(encode(torch.ones(2, 100), cfg)) == 436
    with pytest.raises(FrameTooLargeError, match="max_frame_bytes"):
        encode(torch.ones(5, 100), cfg)


# ---- byte counts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "payload"),
    [("fp16", 2 * 576), ("int8", 576 + 4), ("int4", 576 // 2 + 9 * 4), ("nf4", 576 // 2 + 9 * 2)],
)
def test_bytes_per_token_hidden_576(scheme: str, payload: int) -> None:
    cfg = CodecConfig(scheme=scheme, group_size=64)
    header = 4 + 1 + 1 + 1 + 1 + 4 + 8 + 2 * 8
    assert encoded_nbytes((1, 576), cfg) == header + payload
    assert encoded_nbytes((1000, 576), cfg) == header + 1000 * payload
    assert read_header(encode(torch.randn(1, 576), cfg)).payload_nbytes == payload


@pytest.mark.parametrize(
    ("shape", "group_size", "expected"),
    [
        ((3, 100), 64, {"fp16": 600, "int8": 312, "int4": 4 * 3 * 2 + 150, "nf4": 2 * 3 * 2 + 150}),
        ((1, 9), 8, {"fp16": 18, "int8": 13, "int4": 4 * 2 + 5, "nf4": 2 * 2 + 5}),
        ((5,), 16, {"fp16": 10, "int8": 9, "int4": 4 + 3, "nf4": 2 + 3}),
        ((2, 3, 7), 8, {"fp16": 84, "int8": 24 + 42, "int4": 24 + 21, "nf4": 12 + 21}),
    ],
)
def test_payload_formulas(shape: tuple[int, ...], group_size: int, expected: dict) -> None:
    for scheme, payload in expected.items():
        cfg = CodecConfig(scheme=scheme, group_size=group_size)
        assert encoded_nbytes(shape, cfg) == 20 + 8 * len(shape) + payload
        assert len(encode(torch.randn(shape), cfg)) == encoded_nbytes(shape, cfg)


# ---- config ------------------------------------------------------------------------------------


def test_schemes_registered() -> None:
    assert SCHEMES == ("fp16", "int8", "int4", "nf4")
    assert np.allclose(np.array(schemes_mod.NF4_CODEBOOK), NF4_LEVELS)


def test_config_defaults_and_json_round_trip() -> None:
    assert CodecConfig() == CodecConfig(scheme="int8", group_size=64, max_frame_bytes=256 * 2**20)
    for cfg in (CodecConfig(), CodecConfig(scheme="nf4", group_size=4096, max_frame_bytes=10)):
        assert CodecConfig.from_json(cfg.to_json()) == cfg


def test_config_rejects_unknown_scheme_listing_known_ones() -> None:
    with pytest.raises(ConfigError, match="fp16, int8, int4, nf4") as e:
        CodecConfig(scheme="int3")
    assert isinstance(e.value, MobiLLMError)


@pytest.mark.parametrize("group_size", [0, 4, 7, 12, 100, 8192, -64, True, 64.0, "64"])
def test_config_rejects_bad_group_size(group_size: object) -> None:
    with pytest.raises(ConfigError, match="group_size"):
        CodecConfig(group_size=group_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_config_rejects_bad_frame_limit(limit: object) -> None:
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        CodecConfig(max_frame_bytes=limit)  # type: ignore[arg-type]


def test_config_from_json_rejects_unknown_fields() -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        CodecConfig.from_json('{"scheme": "int8", "bits": 8}')


class _Bf16Scheme:
    """Raw bfloat16, here only to show that a scheme is one class plus one registration."""

    name = "bf16-test"
    id = 200
    grouped = False

    def payload_nbytes(self, rows: int, cols: int, group_size: int) -> int:
        return 2 * rows * cols

    def encode_payload(self, x: torch.Tensor, group_size: int) -> list[bytes]:
        return [x.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()]

    def decode_payload(
        self, payload: memoryview, rows: int, cols: int, group_size: int
    ) -> torch.Tensor:
        bits = np.frombuffer(payload, dtype="<i2", count=rows * cols).astype(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).float().view(rows, cols)


def test_registering_a_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schemes_mod, "_BY_NAME", dict(schemes_mod._BY_NAME))
    monkeypatch.setattr(schemes_mod, "_BY_ID", dict(schemes_mod._BY_ID))
    schemes_mod.register(_Bf16Scheme())
    x = torch.randn(3, 10)
    y = decode(encode(x, CodecConfig(scheme="bf16-test")))
    assert torch.equal(y, x.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="clashes"):
        schemes_mod.register(_Bf16Scheme())


# ---- speed -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fast_enough_for_every_training_step(scheme: str) -> None:
    """A loose guard against per-row Python loops; real figures come from the benchmark."""
    x = torch.randn(1024, 1536)
    cfg = CodecConfig(scheme=scheme)
    decode(encode(x, cfg))
    start = time.perf_counter()
    decode(encode(x, cfg))
    assert time.perf_counter() - start < 1.0
