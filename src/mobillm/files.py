"""Files written whole or not at all: a reader, or a process that crashes mid-write, finds the
old file or the new one, never a part of one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_atomically(path: Path, write: Callable[[Path], None], sync: bool = False) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.
    ``sync``: flush it to the disk first (state a restarted process must find). The name is
    this writer's own, so writers of the same file never share a temporary one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``tensors`` to the safetensors file ``path``, atomically."""
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata))
