"""Releasing weight pages gives memory back without changing a single value."""

import sys

import pytest
import torch
from safetensors.torch import save_file

from mobillm.backbone import pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@linux
def test_mapped_weights_leave_rss_and_read_back_unchanged(tmp_path):
    w = torch.randn(4096, 2048)  # 32 MB
    save_file({"w": w}, tmp_path / "m.safetensors")
    expected = float(w.double().sum())
    del w
    n = 4096 * 2048
    path = tmp_path / "m.safetensors"
    # a private file mapping, as transformers maps safetensors; the payload follows the
    # 8-byte length and the JSON header (padded to 8 bytes)
    mapped = torch.from_file(str(path), shared=False, size=path.stat().st_size // 4)
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert start % 4 == 0
    t = mapped[start // 4 : start // 4 + n]
    assert float(t.double().sum()) == expected  # reads every page: now resident
    before = _rss_mb()
    (region,) = pages.regions([t])
    assert region.path == str(path)  # a clean file mapping: its pages are dropped, not paged out
    assert pages.release([t]) >= n * 4 - 2 * 4096  # whole pages inside the tensor
    assert before - _rss_mb() > 16
    assert float(t.double().sum()) == expected  # faulted back in from the file


def test_anonymous_and_small_tensors_are_left_intact():
    big, small = torch.randn(1 << 19), torch.randn(10)
    a, b = big.clone(), small.clone()
    assert [r.path for r in pages.regions([big, small, big[::2]])] == [""]  # anonymous
    pages.release([big, small, big[::2]], cold=True)
    assert torch.equal(big, a) and torch.equal(small, b)


@linux
def test_written_file_pages_are_never_dropped(tmp_path):
    w = torch.randn(1 << 20)  # 4 MB
    save_file({"w": w}, tmp_path / "m.safetensors")
    path = tmp_path / "m.safetensors"
    mapped = torch.from_file(str(path), shared=False, size=path.stat().st_size // 4)
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    t = mapped[start // 4 : start // 4 + (1 << 20)]
    t[:10] = 7.0  # a copied-on-write page: dropping it would bring the file's values back
    assert [r.path for r in pages.regions([t])] == [""]
    pages.release([t], cold=True)
    assert torch.equal(t[:10], torch.full((10,), 7.0))


@linux
def test_a_releaser_hands_back_piece_by_piece_reading_the_mappings_once(tmp_path, monkeypatch):
    w = torch.randn(1 << 23)  # 32 MB
    save_file({"w": w}, tmp_path / "m.safetensors")
    path = tmp_path / "m.safetensors"
    mapped = torch.from_file(str(path), shared=False, size=path.stat().st_size // 4)
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    t = mapped[start // 4 : start // 4 + (1 << 23)]
    reads = []
    real = pages._mappings
    monkeypatch.setattr(pages, "_mappings", lambda: reads.append(1) or real())
    release = pages.releaser()
    assert release(torch.randn(10)) == 0 and not reads  # nothing to hand back: nothing read
    before, advised = _rss_mb(), 0
    for i, piece in enumerate(t.split(1 << 20)):  # 4 MB pieces, each read, then handed back
        assert torch.equal(piece, w[i << 20 : (i + 1) << 20])
        advised += release(piece)
    assert len(reads) == 1 and advised >= 30 * 2**20
    assert _rss_mb() - before < 8  # never more than about a piece resident
