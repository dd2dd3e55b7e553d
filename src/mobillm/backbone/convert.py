"""A GGUF file to a Hugging Face folder (config, tokenizer, float32 safetensors), one tensor at
a time.

transformers' own GGUF loading dequantizes every tensor into one model in memory, and saving
that needs a second copy: a 270M model peaked at 3.3 GB on its first load, far above what
training it needs, so a small device failed before it started. Here each tensor is
dequantized, renamed and reordered by transformers' own GGUF tensor processors (the same name
map and fix-ups as ``from_pretrained(gguf_file=...)``), written to a scratch file and freed;
the safetensors file is then assembled from those files by copying. Large tensors are
dequantized a few thousand rows at a time, and those the processor leaves as they are (the
embedding, the LM head) go to their scratch file a chunk at a time, never whole in memory.
The peak is about the largest tensor the processor changes (a projection) in float32 plus
the GGUF's own memory map.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobillm.backbone import pages

_COPY = 1 << 24
_ROWS = 4096  # rows of a quantized tensor dequantized at once
_PROCESSOR = "gguf_processor_config.json"  # passed from the child, deleted after
_TENSORS = "gguf_tensors.json"  # likewise: each tensor's name, type, shape and offset


def _metadata_in_child(path: Path, out: Path) -> None:
    """``_metadata(path, out)`` in a fresh interpreter; its error becomes ours."""
    code = f"import sys, pathlib, {__name__} as m; m._metadata(*map(pathlib.Path, sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), str(out)], capture_output=True, text=True
    )
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ValueError(f"reading {path.name}'s metadata failed: {tail[0]}")


def _metadata(path: Path, out: Path) -> None:
    """Tokenizer files, config.json and the tensor processor's settings, into ``out``."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # one parse at a time, each freed before the next
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    gc.collect()
    AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    gc.collect()
    processor = load_gguf_checkpoint(str(path), return_tensors=False).get("config", {})
    (out / _PROCESSOR).write_text(json.dumps(processor))
    gc.collect()
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tensors = [
        {
            "name": t.name,
            "type": int(t.tensor_type),
            "dtype": t.data.dtype.str,
            "shape": list(t.data.shape),
            "offset": int(t.data_offset),
        }
        for t in reader.tensors
    ]
    (out / _TENSORS).write_text(json.dumps({"architecture": arch, "tensors": tensors}))


def convert_gguf(path: Path, out: Path) -> None:
    """Write ``path``'s model into the empty folder ``out`` (config, tokenizer, weights)."""
    from accelerate import init_empty_weights
    from gguf import dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    # The tokenizer, the config and the tensor processor's settings are parsed out of the
    # GGUF's metadata in a child process: a 150k-token vocabulary is hundreds of MB of Python
    # objects per parse, and memory a process has freed stays its own (1.5B: 2.2 GB peak with
    # the parses here, under the tensors' own peak without).
    _metadata_in_child(path, out)
    config = AutoConfig.from_pretrained(out)
    processor_config = json.loads((out / _PROCESSOR).read_text())
    (out / _PROCESSOR).unlink()
    # The tensors are located from the child's table, not by a GGUFReader here: its parse
    # of the metadata (every vocabulary entry an array) peaked at 1.2 GB for the 1.5B model.
    table = json.loads((out / _TENSORS).read_text())
    (out / _TENSORS).unlink()
    arch = table["architecture"]
    tensors = _tensors(path, table["tensors"])
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=processor_config)
    with init_empty_weights():
        shapes = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = get_gguf_hf_weights_map(shapes, processor)
    expected = {k: tuple(v.shape) for k, v in shapes.state_dict().items()}
    scratch = out / ".tensors"
    scratch.mkdir()
    written: list[tuple[str, tuple[int, ...], Path]] = []
    release = pages.releaser()
    for i, tensor in enumerate(tensors):
        part = scratch / f"{i}.bin"
        done = _stream_rows(tensor, dequantize, processor, processor_config, names, part)
        if done is not None:  # written a few rows at a time
            name, shape = names[done[0]], done[1]
        else:
            result = processor.process(
                weights=_dequantize(tensor, dequantize),
                name=tensor.name,
                tensor_key_mapping=names,
                parsed_parameters={"config": processor_config, "tensors": {}},
            )
            if result.name not in names:
                continue
            name = names[result.name]
            arr = np.ascontiguousarray(result.weights, dtype=np.float32)
            shape = tuple(arr.shape)
            arr.tofile(part)
            del arr, result
        if name in expected and shape != expected[name]:
            raise ValueError(f"{name}: GGUF gives shape {shape}, the model {expected[name]}")
        written.append((name, shape, part))
        # the GGUF is memory-mapped: the quantized bytes just read would stay resident (1 GB
        # for the 1.5B model) unless handed back
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only map: torch only reads its address
            release(torch.from_numpy(tensor.data))
    _assemble(written, out / "model.safetensors")
    shutil.rmtree(scratch)
    config.architectures = [type(shapes).__name__]
    config.save_pretrained(out)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """What the conversion reads of a GGUF tensor (as ``gguf.ReaderTensor`` names it)."""

    name: str
    tensor_type: Any
    data: np.ndarray  # a view of the memory-mapped file


def _tensors(path: Path, table: list[dict[str, Any]]) -> list[_Tensor]:
    from gguf import GGMLQuantizationType

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    return [
        _Tensor(
            t["name"],
            GGMLQuantizationType(t["type"]),
            np.ndarray(tuple(t["shape"]), np.dtype(t["dtype"]), buffer=mm, offset=t["offset"]),
        )
        for t in table
    ]


def _dequantize(tensor: Any, dequantize: Any) -> np.ndarray:
    """float32 values of a GGUF tensor, dequantized a few rows at a time: the library's
    numpy kernels make temporaries several times their input, 2 GB for one 150k-row
    embedding at once."""
    data = tensor.data
    if data.ndim < 2 or data.shape[0] <= _ROWS:
        return dequantize(data, tensor.tensor_type)
    first = dequantize(data[:_ROWS], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    out[:_ROWS] = first
    for i in range(_ROWS, data.shape[0], _ROWS):
        out[i : i + _ROWS] = dequantize(data[i : i + _ROWS], tensor.tensor_type)
    return out


def _stream_rows(
    tensor: Any,
    dequantize: Any,
    processor: Any,
    processor_config: dict[str, Any],
    names: Any,
    part: Path,
) -> tuple[str, tuple[int, ...]] | None:
    """Write a large tensor that the processor passes through unchanged straight to ``part``,
    ``_ROWS`` rows at a time, so that not even one float32 copy of it is held (a 150k-token
    embedding is 0.9 GB; whole, with the processor's and numpy's copies, the 1.5B model's first
    load peaked at 2.2 GB). Returns (the processor's name, the shape), or None when the
    tensor is small or the processor changes it (then it is converted whole)."""
    data = tensor.data
    if data.ndim < 2 or data.shape[0] <= _ROWS:
        return None
    first = dequantize(data[:_ROWS], tensor.tensor_type)
    last = dequantize(data[-_ROWS:], tensor.tensor_type)
    name = None
    for chunk in (first, last):  # both ends: a processor keyed on rows would differ at one
        try:  # a processor that reshapes by the whole tensor's size may refuse a slice
            result = processor.process(
                weights=chunk,
                name=tensor.name,
                tensor_key_mapping=names,
                parsed_parameters={"config": processor_config, "tensors": {}},
            )
        except Exception:  # any refusal: then it is converted whole, as the library would
            return None
        same = result.weights is chunk or (
            isinstance(result.weights, np.ndarray)
            and result.weights.shape == chunk.shape
            and np.array_equal(result.weights, chunk)
        )
        if result.name not in names or not same:
            return None
        name = result.name
    del last
    with part.open("wb") as f:
        f.write(np.ascontiguousarray(first, dtype=np.float32).tobytes())
        for i in range(_ROWS, data.shape[0], _ROWS):
            rows = dequantize(data[i : i + _ROWS], tensor.tensor_type)
            f.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
    return name, (data.shape[0], *first.shape[1:])


def _assemble(parts: list[tuple[str, tuple[int, ...], Path]], target: Path) -> None:
    """A safetensors file of float32 tensors from raw little-endian scratch files, in order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, part in parts:
        size = part.stat().st_size
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with target.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, f, _COPY)
            part.unlink()
