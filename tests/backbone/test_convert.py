"""GGUF conversion one tensor at a time: chunked dequantization and the assembled safetensors
file give exactly what the library and safetensors give for the whole thing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mobillm.backbone import convert
from mobillm.backbone.loader import resolve_source


def test_assembled_file_reads_back(tmp_path):
    tensors = {"b.weight": torch.randn(3, 5), "a": torch.randn(7), "c": torch.randn(2, 3, 4)}
    parts = []
    for i, (name, t) in enumerate(tensors.items()):
        part = tmp_path / f"{i}.bin"
        t.numpy().tofile(part)
        parts.append((name, tuple(t.shape), part))
    convert._assemble(parts, tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert not any(p.exists() for _, _, p in parts)  # scratch files are consumed


def test_chunked_dequantization_equals_the_whole(monkeypatch):
    gguf = pytest.importorskip("gguf")
    _, path = resolve_source("smollm2-135m")  # the real GGUF the demo uses
    reader = gguf.GGUFReader(str(path))
    big = next(t for t in reader.tensors if t.data.ndim == 2 and t.data.shape[0] > 1000)
    monkeypatch.setattr(convert, "_ROWS", 333)  # several chunks and a ragged last one
    chunked = convert._dequantize(big, gguf.dequantize)
    whole = gguf.dequantize(big.data, big.tensor_type)
    assert chunked.dtype == np.float32 and np.array_equal(chunked, whole)


def test_streamed_rows_convert_to_the_same_file(monkeypatch, tmp_path):
    """With a small chunk, the embedding goes to disk a chunk at a time (the processor leaves
    it as is) and the attention projections whole (Llama's processor permutes them and
    refuses a slice): the weights equal the cached whole-tensor conversion's."""
    pytest.importorskip("gguf")
    from mobillm.backbone.loader import gguf_to_folder

    _, path = resolve_source("smollm2-135m")
    want = load_file(gguf_to_folder(path) / "model.safetensors")
    streamed: list[str] = []
    stream = convert._stream_rows

    def spy(tensor, *args):
        done = stream(tensor, *args)
        if done is not None:
            streamed.append(tensor.name)
        return done

    monkeypatch.setattr(convert, "_ROWS", 333)
    monkeypatch.setattr(convert, "_stream_rows", spy)
    out = tmp_path / "m"
    out.mkdir()
    convert.convert_gguf(path, out)
    got = load_file(out / "model.safetensors")
    assert "token_embd.weight" in streamed
    assert not any(".attn_q." in n or ".attn_k." in n for n in streamed)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
