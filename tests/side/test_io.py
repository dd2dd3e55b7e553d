"""safetensors bytes written piece by piece: what ``safetensors.torch.save`` writes, in bounded
pieces, each handed back once consumed."""

import pytest
import torch
from safetensors.torch import load, save

from mobillm.side.head import PIECE_BYTES
from mobillm.side.io import _DTYPES, safetensors_stream

SHAPES = [(3, 5), (), (0, 4), (7,), (2, 1, 3)]


def _random(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Any bit pattern of ``dtype`` (NaNs included): bytes, not values, are compared."""
    n = torch.Size(shape).numel()
    raw = torch.randint(0, 256, (max(n, 1) * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)[:n].reshape(shape)


def _joined(tensors, release=None) -> bytes:
    return b"".join(bytes(p) for p in safetensors_stream(tensors, release))


def test_stream_is_byte_for_byte_what_save_writes():
    """Every dtype safetensors stores, odd shapes, names out of order: the writer's ordering
    (dtype rank, then name) and its header padding, reproduced exactly."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{'zab'[j % 3]}.{i}.{j}": _random(dtype, shape, g)
        for i, dtype in enumerate(_DTYPES)
        for j, shape in enumerate(SHAPES)
    }
    assert _joined(tensors) == save(tensors)
    assert _joined({}) == save({})


def test_a_big_split_head_streams_in_pieces_and_loads_back():
    """Layer-like tensors, one over a piece: bounded pieces, and the server's parser (``load``)
    returns the very tensors."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "layers.0.mlp.up_proj.weight": torch.randn(PIECE_BYTES // 4 + 100, generator=g),
        "layers.0.input_layernorm.weight": torch.randn(64, generator=g).bfloat16(),
        "norm.weight": torch.randn(64, generator=g),
        "lm_head.weight": torch.randn(2, 64, generator=g),
    }
    pieces = [bytes(p) for p in safetensors_stream(tensors)]
    assert max(len(p) for p in pieces) <= PIECE_BYTES
    blob = b"".join(pieces)
    assert blob == save(tensors)
    back = load(blob)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_each_piece_is_released_once_the_next_is_asked_for():
    tensors = {"a": torch.randn(PIECE_BYTES // 4 * 2 + 3), "b": torch.zeros(5, dtype=torch.int64)}
    released: list[int] = []
    stream = safetensors_stream(tensors, release=lambda piece: released.append(piece.numel()))
    next(stream)  # the header
    counts = []
    for _ in stream:
        counts.append(len(released))  # none of this piece's yet
    assert counts == [0, 1, 2, 3]
    assert released == [5, PIECE_BYTES // 4, PIECE_BYTES // 4, 3]  # int64 goes first


def test_a_dtype_safetensors_cannot_store_is_refused():
    with pytest.raises(ValueError, match="complex128"):
        next(safetensors_stream({"x": torch.zeros(2, dtype=torch.complex128)}))
