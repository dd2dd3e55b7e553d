"""The frozen head's content hash, read piece by piece."""

import hashlib

import torch

from mobillm.side.head import PIECE_BYTES, tensors_sha256


def _whole(tensors: dict[str, torch.Tensor]) -> str:
    """The hash as defined: each tensor converted to float32 at once."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy())
    return h.hexdigest()


def test_hash_in_pieces_equals_the_whole_and_reports_each_piece():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "layers.1.w": torch.randn(PIECE_BYTES // 2 + 7, generator=g).bfloat16(),  # 2 pieces
        "norm.weight": torch.randn(8, 3, generator=g).t(),  # not contiguous
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }
    done: list[int] = []
    assert tensors_sha256(tensors, done=lambda p: done.append(p.numel())) == _whole(tensors)
    assert sum(done) == sum(t.numel() for t in tensors.values()) and len(done) == 5
