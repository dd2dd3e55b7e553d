"""Sessions on disk: what a restarted or evicted session needs to go on bit for bit.

``<workdir>/sessions/<id>/session.json`` holds the spec, the bearer token's hash (never the
token), the credential that opened it and whether it ended; ``<workdir>/heads/<key>.safetensors``
the frozen head as uploaded (shared by the sessions that use it); ``<id>/state/`` the trainer's
state (``Trainer.state``: tensors to safetensors, the rest to JSON, never pickle).

Every write goes to a temporary name and is renamed into place, and the state folder's
``current`` pointer is replaced last, so a crash at any moment leaves the previous complete
checkpoint readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mobillm.files import write_atomically
from mobillm.transport.messages import SessionSpec

SESSION_ID = re.compile(r"^[0-9a-f]{16}$")
_STATE = "state"
_CURRENT = "current"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def head_file_key(head_sha256: str, head_json: str) -> str:
    return hashlib.sha256(f"{head_sha256}\n{head_json}".encode()).hexdigest()[:32]


def _atomic_write(path: Path, data: bytes) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data), sync=True)


class SessionStore:
    """The sessions folder of one server's workdir."""

    def __init__(self, workdir: Path) -> None:
        self.root = workdir / "sessions"
        self.heads = workdir / "heads"

    def folder(self, session_id: str) -> Path:
        if not SESSION_ID.match(session_id):  # ids are ours: anything else never reaches a path
            raise ValueError(f"not a session id: {session_id!r}")
        return self.root / session_id

    # --- the session record -----------------------------------------------------------------
    def write_session(
        self, session_id: str, spec: SessionSpec, token: str, client: str, ended: str = ""
    ) -> None:
        folder = self.folder(session_id)
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "spec": spec.to_dict(),
            "token_sha256": token_hash(token),
            "client": client,
            "ended": ended,
        }
        _atomic_write(folder / "session.json", json.dumps(record, sort_keys=True).encode())

    def read_session(self, session_id: str) -> dict[str, Any] | None:
        """The record of a session on disk, or None if there is none."""
        try:
            path = self.folder(session_id) / "session.json"
        except ValueError:
            return None
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def end(self, session_id: str, why: str) -> None:
        record = self.read_session(session_id)
        if record is not None:
            record["ended"] = why
            path = self.folder(session_id) / "session.json"
            _atomic_write(path, json.dumps(record, sort_keys=True).encode())

    # --- frozen heads -----------------------------------------------------------------------
    def upload_path(self, session_id: str) -> Path:
        """Where a session's head upload is spooled as its chunks arrive: on disk, not in
        memory (a split learner's head is gigabytes)."""
        return self.folder(session_id) / "head.upload"

    def keep_head(self, key: str, upload: Path) -> None:
        """Keep a verified upload as the head ``key`` (moved, not copied); if the store has
        it already, the upload is dropped."""
        self.heads.mkdir(parents=True, exist_ok=True)
        path = self.heads / f"{key}.safetensors"
        if not path.is_file():
            os.replace(upload, path)
        else:
            upload.unlink(missing_ok=True)
            path.touch()  # in use again: the retention sweep keeps it

    def head_path(self, key: str) -> Path | None:
        path = self.heads / f"{key}.safetensors"
        return path if path.is_file() else None

    # --- trainer state ----------------------------------------------------------------------
    def write_state(
        self, session_id: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        """Checkpoint a trainer: a new folder, then the ``current`` pointer, then cleanup."""
        root = self.folder(session_id) / _STATE
        root.mkdir(parents=True, exist_ok=True)
        name = f"s{meta['steps_done']:07d}-{secrets.token_hex(4)}"
        tmp = root / f".{name}.tmp"
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp, root / name)
        _atomic_write(root / _CURRENT, name.encode())
        for old in root.iterdir():
            if old.name not in (name, _CURRENT):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()

    def read_state(self, session_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        root = self.folder(session_id) / _STATE
        if not (root / _CURRENT).is_file():
            return None
        folder = root / (root / _CURRENT).read_text().strip()
        tensors = load_file(str(folder / "tensors.safetensors"))
        return tensors, json.loads((folder / "meta.json").read_text())
