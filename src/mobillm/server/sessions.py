"""The server's session table: handshakes, bearer tokens, frozen heads, trainers, downloads.

Every public method takes the session id and its token and raises ``RemoteError`` with a code a
transport can map to a status; an error in one session never touches another. Methods of one
session are serialised by its lock; different sessions run concurrently.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mobillm.config import Config, check
from mobillm.server.cache import ActivationCache, CacheConfig
from mobillm.server.trainer import Trainer
from mobillm.side.head import FrozenHead, tensors_sha256
from mobillm.side.io import SideFileError, SideMeta, save_side, weights_from_bytes, weights_to_bytes
from mobillm.transport.messages import (
    DEFAULT_CHUNK_BYTES,
    PROTOCOL_VERSION,
    Ack,
    ActivationChunk,
    EpochReport,
    RemoteError,
    SessionInfo,
    SessionSpec,
    SideBlob,
    StepBegin,
    spec_summary,
)

log = logging.getLogger("mobillm.server")


@dataclasses.dataclass(frozen=True)
class ServerConfig(Config):
    """Limits and policy of one server.

    ``allowed_backbones``: config sha256 digests the server accepts (empty = any backbone).
    ``workdir``: where checkpoints, cached heads, spilled activation caches and metrics go.
    ``cache_memory_bytes`` / ``cache_disk_bytes``: each session's activation cache budget
    (both 0: no cache, so sessions must re-stream every epoch and cannot validate).
    """

    device: str = "cpu"
    max_sessions: int = 16
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_rows_per_step: int = 1 << 16
    max_head_bytes: int = 2 << 30
    cache_memory_bytes: int = CacheConfig.memory_bytes
    cache_disk_bytes: int = CacheConfig.disk_bytes
    allowed_backbones: tuple[str, ...] = ()
    workdir: str = "runs/server"

    def validate(self) -> None:
        check(self.max_sessions > 0, "ServerConfig.max_sessions must be > 0")
        check(
            4096 <= self.max_chunk_bytes <= 4 << 20,
            "ServerConfig.max_chunk_bytes must be in [4 KiB, 4 MiB]",
        )
        check(self.max_rows_per_step > 0, "ServerConfig.max_rows_per_step must be > 0")
        check(self.max_head_bytes > 0, "ServerConfig.max_head_bytes must be > 0")
        CacheConfig(self.cache_memory_bytes, self.cache_disk_bytes)  # validates both
        check(
            self.device == "cpu" or self.device.startswith("cuda"),
            f"ServerConfig.device must be 'cpu' or 'cuda[:N]', got {self.device!r}",
        )


@dataclasses.dataclass
class Session:
    session_id: str
    token: str
    spec: SessionSpec
    lock: threading.Lock
    trainer: Trainer | None = None
    head_parts: list[bytes] = dataclasses.field(default_factory=list)
    head_bytes: int = 0
    created: float = dataclasses.field(default_factory=time.time)
    last_ack: Ack | None = None
    closed: bool = False


def _head_key(spec: SessionSpec) -> tuple[str, str]:
    """Cached heads are keyed by their tensors and by the settings that say how to apply them:
    the same tensors with another norm epsilon are another head."""
    return spec.head_sha256, spec.head.to_json(indent=None)


class SessionManager:
    """Owns sessions and the cache of frozen heads (shared across sessions by content hash)."""

    def __init__(self, cfg: ServerConfig | None = None) -> None:
        self.cfg = cfg or ServerConfig()
        self._sessions: dict[str, Session] = {}
        self._heads: dict[tuple[str, str], tuple[FrozenHead, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.workdir = Path(self.cfg.workdir)

    # --- handshake --------------------------------------------------------------------------
    def open(self, spec: SessionSpec) -> SessionInfo:
        """Accept or refuse a proposed session; raises RemoteError with the precise reason."""
        if spec.protocol != PROTOCOL_VERSION:
            raise RemoteError(
                "FAILED_PRECONDITION",
                f"protocol {spec.protocol} not supported; server speaks {PROTOCOL_VERSION}",
            )
        allowed = self.cfg.allowed_backbones
        if allowed and spec.fingerprint.config_sha256 not in allowed:
            raise RemoteError(
                "FAILED_PRECONDITION",
                f"backbone {spec.fingerprint.short()} is not served here; this "
                f"server accepts config hashes {[a[:12] for a in allowed]}",
            )
        tc = spec.train
        if (
            tc.epochs > 1
            and tc.replay
            and not (self.cfg.cache_memory_bytes or self.cfg.cache_disk_bytes)
        ):
            raise RemoteError(
                "FAILED_PRECONDITION",
                "this server keeps no activation cache: re-stream every epoch (replay=false)",
            )
        with self._lock:
            live = sum(not s.closed for s in self._sessions.values())
            if live >= self.cfg.max_sessions:
                raise RemoteError(
                    "RESOURCE_EXHAUSTED", f"server is full ({live} sessions); try again later"
                )
            sid = secrets.token_hex(8)
            sess = Session(sid, secrets.token_urlsafe(24), spec, threading.Lock())
            self._sessions[sid] = sess
            head = self._heads.get(_head_key(spec))
        if head is not None:
            self._start(sess, head)
        log.info(
            json.dumps(
                {"event": "open", "session": sid, **spec_summary(spec), "need_head": head is None}
            )
        )
        return SessionInfo(sid, sess.token, head is None, self.cfg.max_chunk_bytes, "mobillm")

    def _start(self, sess: Session, frozen: tuple[FrozenHead, dict[str, Any]]) -> None:
        head, layers = frozen
        cfg = CacheConfig(self.cfg.cache_memory_bytes, self.cfg.cache_disk_bytes)
        folder = self.workdir / "sessions" / sess.session_id / "cache"
        cache = ActivationCache(cfg, folder) if cfg.enabled else None
        try:
            sess.trainer = Trainer(
                sess.spec, head, self.cfg.device, self.cfg.max_rows_per_step, cache, layers
            )
        except ValueError as e:
            raise RemoteError("INVALID_ARGUMENT", f"cannot build the side network: {e}") from None

    def _get(self, session_id: str, token: str) -> Session:
        with self._lock:
            sess = self._sessions.get(session_id)
        if sess is None:
            raise RemoteError("NOT_FOUND", f"unknown session {session_id!r}")
        if not hmac.compare_digest(sess.token.encode(), token.encode()):
            raise RemoteError("PERMISSION_DENIED", f"wrong token for session {session_id}")
        if sess.closed:
            raise RemoteError("FAILED_PRECONDITION", f"session {session_id} is closed")
        return sess

    def authorize(self, session_id: str, token: str) -> None:
        """Raise unless ``token`` opens ``session_id`` (transports check each stream up front)."""
        self._get(session_id, token)

    # --- frozen head upload -----------------------------------------------------------------
    def upload_head(
        self, session_id: str, token: str, data: bytes, last: bool, first: bool = False
    ) -> None:
        """Take one chunk of the head's safetensors bytes; on ``last`` verify and start training.

        ``first`` marks chunk 0: it drops whatever a previous, broken-off upload left behind.
        """
        sess = self._get(session_id, token)
        with sess.lock:
            if sess.trainer is not None:
                raise RemoteError("FAILED_PRECONDITION", "the server already has this head")
            if first:
                sess.head_parts, sess.head_bytes = [], 0
            sess.head_bytes += len(data)
            if sess.head_bytes > self.cfg.max_head_bytes:
                sess.head_parts.clear()
                raise RemoteError(
                    "RESOURCE_EXHAUSTED", f"head upload over {self.cfg.max_head_bytes} bytes"
                )
            sess.head_parts.append(data)
            if not last:
                return
            blob = b"".join(sess.head_parts)
            sess.head_parts, sess.head_bytes = [], 0
            try:
                tensors = weights_from_bytes(blob)
                # a split learner's top layers travel with the head, under ``layers.``
                layers = {k: v for k, v in tensors.items() if k.startswith("layers.")}
                head_tensors = {k: v for k, v in tensors.items() if k not in layers}
                head = FrozenHead(sess.spec.head, head_tensors)
            except (SideFileError, ValueError) as e:
                raise RemoteError("INVALID_ARGUMENT", f"uploaded head rejected: {e}") from None
            digest = tensors_sha256({**head.tensors(), **layers})
            if digest != sess.spec.head_sha256:
                raise RemoteError(
                    "INVALID_ARGUMENT",
                    f"uploaded head hashes to {digest[:16]}, the session spec "
                    f"promised {sess.spec.head_sha256[:16]}",
                )
            with self._lock:
                self._heads[_head_key(sess.spec)] = (head, layers)
            self._start(sess, (head, layers))

    # --- training ---------------------------------------------------------------------------
    def _trainer(self, sess: Session) -> Trainer:
        if sess.trainer is None:
            raise RemoteError("FAILED_PRECONDITION", "upload the frozen head before training")
        return sess.trainer

    def begin_step(self, session_id: str, token: str, msg: StepBegin) -> None:
        sess = self._get(session_id, token)
        with sess.lock:
            self._trainer(sess).begin(msg)

    def add_chunk(self, session_id: str, token: str, chunk: ActivationChunk) -> Ack | None:
        sess = self._get(session_id, token)
        if len(chunk.data) > self.cfg.max_chunk_bytes:
            raise RemoteError(
                "RESOURCE_EXHAUSTED",
                f"chunk of {len(chunk.data)} bytes; limit {self.cfg.max_chunk_bytes}",
            )
        with sess.lock:
            trainer = self._trainer(sess)
            try:
                ack = trainer.add_chunk(chunk)
            except RemoteError:
                trainer.abort_step()
                raise
            if ack is not None:
                sess.last_ack = ack
                self._log_step(sess, ack)
                every = sess.spec.train.checkpoint_every
                if every and trainer.steps_done % every == 0:
                    self.checkpoint(sess)
            return ack

    def abort_step(self, session_id: str, token: str) -> None:
        sess = self._get(session_id, token)
        with sess.lock:
            if sess.trainer is not None:
                sess.trainer.abort_step()

    def _log_step(self, sess: Session, ack: Ack) -> None:
        t = sess.trainer
        assert t is not None
        rec = {
            "event": "step",
            "session": sess.session_id,
            "step": ack.step,
            "loss": round(ack.loss, 5),
            "bytes_received": t.bytes_received,
            **{k: round(v, 6) for k, v in ack.metrics.items()},
        }
        log.info(json.dumps(rec))

    def finish(self, session_id: str, token: str) -> Iterator[EpochReport]:
        """Train the remaining epochs from the cache; one report per epoch, the last marked.

        The caller pulls reports one at a time (a transport runs each ``next`` in a worker
        thread); the session's lock is held only while an epoch runs.
        """
        sess = self._get(session_id, token)
        with sess.lock:
            epochs = self._trainer(sess).run_epochs()
        while True:
            with sess.lock:
                self._get(session_id, token)  # closed meanwhile: stop
                report = next(epochs, None)
            if report is None:
                return
            log.info(
                json.dumps(
                    {
                        "event": "epoch",
                        "session": session_id,
                        "epoch": report.epoch,
                        **{k: round(v, 6) for k, v in report.metrics.items()},
                    }
                )
            )
            yield report

    # --- results ----------------------------------------------------------------------------
    def meta(self, sess: Session) -> SideMeta:
        return SideMeta(
            sess.spec.side, sess.spec.fingerprint, sess.spec.taps, {"task": sess.spec.side.task}
        )

    def download(self, session_id: str, token: str) -> SideBlob:
        """The side network as it stands now (``side.json`` text and safetensors bytes)."""
        sess = self._get(session_id, token)
        with sess.lock:
            trainer = self._trainer(sess)
            meta = self.meta(sess)
            return SideBlob(
                json.dumps(meta.to_dict(), sort_keys=True), weights_to_bytes(trainer.net)
            )

    def checkpoint(self, sess: Session) -> Path:
        trainer = self._trainer(sess)
        out = self.workdir / "sessions" / sess.session_id / f"step-{trainer.steps_done:06d}"
        return save_side(trainer.net, self.meta(sess), out)

    def stats(self, session_id: str, token: str) -> dict[str, float]:
        sess = self._get(session_id, token)
        t = sess.trainer
        return {
            "steps": t.steps_done if t else 0,
            "samples": t.samples_seen if t else 0,
            "bytes_received": t.bytes_received if t else 0,
            "optimizer_steps": t.optimizer_steps if t else 0,
            "server_epochs": t.epochs_done if t else 0,
        }

    def close(self, session_id: str, token: str) -> dict[str, Any]:
        """End a session: a final checkpoint is written and its memory is released."""
        sess = self._get(session_id, token)
        with sess.lock:
            summary: dict[str, Any] = dict(self.stats(session_id, token))
            if sess.trainer is not None and sess.trainer.steps_done:
                summary["checkpoint"] = str(self.checkpoint(sess))
            sess.closed = True
            if sess.trainer is not None and sess.trainer.cache is not None:
                sess.trainer.cache.clear()
            sess.trainer = None
        log.info(json.dumps({"event": "close", "session": session_id, **summary}))
        return summary
