"""The server's session table: handshakes, bearer tokens, frozen heads, trainers, downloads.

Every public method takes the session id and its token and raises ``RemoteError`` with a code a
transport can map to a status; an error in one session never touches another. Methods of one
session are serialised by its lock; different sessions run concurrently.

Everything a client chooses is priced before it is allocated (``mobillm.server.budget``): a
session is registered only once its side network is known to fit, and only when it is fully
built; sessions nobody calls for ``lease_seconds`` are checkpointed and evicted by ``reap``,
their folders deleted after ``retention_seconds``; cached frozen heads are shared by content
and settings and evicted least-recently-used past ``head_cache_bytes``.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mobillm.config import Config, check
from mobillm.server.budget import check_side
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
    ``max_sessions_per_client``: live sessions one credential may hold (anonymous sessions of
    an open loopback server count only against ``max_sessions``).
    ``max_side_bytes``: a session's side network with its optimizer state (and, in split mode,
    its frozen top layers); ``max_step_bytes``: one step's activations as priced by
    ``mobillm.server.budget``; ``max_head_bytes``: one head upload;
    ``max_upload_bytes``: all head uploads in progress together; ``head_cache_bytes``: frozen
    heads kept for later sessions.
    ``checkpoint_every``: the server's checkpoint policy in steps (0 = at close only).
    ``lease_seconds``: a session nobody calls for this long is checkpointed and evicted;
    ``retention_seconds``: its folder (checkpoints, metrics) is deleted this long after.
    ``api_keys_file``: salted key hashes (``mobillm.server.auth``) that may open sessions;
    ``open_access``: anyone may (loopback only). A network server needs one of the two or a
    mutual-TLS client CA.
    """

    device: str = "cpu"
    max_sessions: int = 16
    max_sessions_per_client: int = 4
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_rows_per_step: int = 1 << 16
    max_side_bytes: int = 4 << 30
    max_step_bytes: int = 4 << 30
    max_head_bytes: int = 2 << 30
    max_upload_bytes: int = 4 << 30
    head_cache_bytes: int = 2 << 30
    cache_memory_bytes: int = CacheConfig.memory_bytes
    cache_disk_bytes: int = CacheConfig.disk_bytes
    checkpoint_every: int = 0
    lease_seconds: float = 900.0
    retention_seconds: float = 7 * 86400.0
    allowed_backbones: tuple[str, ...] = ()
    api_keys_file: str = ""
    open_access: bool = False
    workdir: str = "runs/server"

    def validate(self) -> None:
        check(self.max_sessions > 0, "ServerConfig.max_sessions must be > 0")
        check(self.max_sessions_per_client > 0, "ServerConfig.max_sessions_per_client must be > 0")
        for name in ("max_side_bytes", "max_step_bytes", "max_upload_bytes"):
            check(getattr(self, name) > 0, f"ServerConfig.{name} must be > 0")
        check(self.head_cache_bytes >= 0, "ServerConfig.head_cache_bytes must be >= 0")
        check(self.checkpoint_every >= 0, "ServerConfig.checkpoint_every must be >= 0")
        check(self.lease_seconds > 0, "ServerConfig.lease_seconds must be > 0")
        check(self.retention_seconds >= 0, "ServerConfig.retention_seconds must be >= 0")
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
    client: str = ""
    trainer: Trainer | None = None
    head_parts: list[bytes] = dataclasses.field(default_factory=list)
    head_bytes: int = 0
    created: float = dataclasses.field(default_factory=time.monotonic)
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    last_ack: Ack | None = None
    closed: str = ""  # why the session ended: "closed" or "expired"


def _head_key(spec: SessionSpec) -> tuple[str, str]:
    """Cached heads are keyed by their tensors and by the settings that say how to apply them:
    the same tensors with another norm epsilon are another head."""
    return spec.head_sha256, spec.head.to_json(indent=None)


Frozen = tuple[FrozenHead, dict[str, Any]]
# Ended sessions are remembered (for a precise "closed"/"expired" answer) up to this many.
_ENDED_KEPT = 1024


def _nbytes(frozen: Frozen) -> int:
    head, layers = frozen
    tensors = [*head.tensors().values(), *layers.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class SessionManager:
    """Owns sessions and the cache of frozen heads (shared across sessions by content hash)."""

    def __init__(self, cfg: ServerConfig | None = None) -> None:
        self.cfg = cfg or ServerConfig()
        self._sessions: dict[str, Session] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._heads: OrderedDict[tuple[str, str], tuple[Frozen, int]] = OrderedDict()
        self._heads_bytes = 0
        self._uploading = 0  # bytes of head uploads in progress, all sessions
        self._lock = threading.Lock()
        self.workdir = Path(self.cfg.workdir)

    # --- handshake --------------------------------------------------------------------------
    def _room(self, client: str) -> None:
        """RESOURCE_EXHAUSTED unless the server and ``client`` may hold one more session."""
        live = list(self._sessions.values())
        if len(live) >= self.cfg.max_sessions:
            raise RemoteError(
                "RESOURCE_EXHAUSTED", f"server is full ({len(live)} sessions); try again later"
            )
        if client and sum(s.client == client for s in live) >= self.cfg.max_sessions_per_client:
            raise RemoteError(
                "RESOURCE_EXHAUSTED",
                f"{client} already holds {self.cfg.max_sessions_per_client} sessions, its limit",
            )

    def open(self, spec: SessionSpec, client: str = "") -> SessionInfo:
        """Accept or refuse a proposed session; raises RemoteError with the precise reason.

        ``client`` names the credential that asks ("" = anonymous, counted only against the
        server's total); the session is registered only once it is known to fit and, when its
        head is cached, once its trainer is built.
        """
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
            self._room(client)
        check_side(spec, self.cfg.max_side_bytes)
        sid = secrets.token_hex(8)
        sess = Session(sid, secrets.token_urlsafe(24), spec, threading.Lock(), client)
        with self._lock:
            head = self._cached_head(_head_key(spec))
        if head is not None:
            self._start(sess, head)
        with self._lock:
            try:
                self._room(client)  # others may have opened meanwhile
            except RemoteError:
                self._discard(sess)
                raise
            self._sessions[sid] = sess
        log.info(
            json.dumps(
                {
                    "event": "open",
                    "session": sid,
                    "client": client,
                    **spec_summary(spec),
                    "need_head": head is None,
                }
            )
        )
        return SessionInfo(sid, sess.token, head is None, self.cfg.max_chunk_bytes, "mobillm")

    def _cached_head(self, key: tuple[str, str]) -> Frozen | None:
        entry = self._heads.get(key)
        if entry is None:
            return None
        self._heads.move_to_end(key)
        return entry[0]

    def _cache_head(self, key: tuple[str, str], frozen: Frozen) -> None:
        """Keep ``frozen`` for later sessions; least recently used heads go past the budget."""
        size = _nbytes(frozen)
        if key in self._heads or size > self.cfg.head_cache_bytes:
            return
        self._heads[key] = (frozen, size)
        self._heads_bytes += size
        while self._heads_bytes > self.cfg.head_cache_bytes:
            _, (_, old) = self._heads.popitem(last=False)
            self._heads_bytes -= old

    def _start(self, sess: Session, frozen: Frozen) -> None:
        head, layers = frozen
        cfg = CacheConfig(self.cfg.cache_memory_bytes, self.cfg.cache_disk_bytes)
        folder = self.workdir / "sessions" / sess.session_id / "cache"
        cache = ActivationCache(cfg, folder) if cfg.enabled else None
        try:
            sess.trainer = Trainer(
                sess.spec,
                head,
                self.cfg.device,
                self.cfg.max_rows_per_step,
                cache,
                layers,
                self.cfg.max_step_bytes,
            )
        except (ValueError, RuntimeError) as e:
            raise RemoteError("INVALID_ARGUMENT", f"cannot build the side network: {e}") from None

    def _get(self, session_id: str, token: str) -> Session:
        with self._lock:
            sess = self._sessions.get(session_id)
            ended = self._ended.get(session_id)
        if sess is None:
            if ended is not None:
                raise RemoteError("FAILED_PRECONDITION", f"session {session_id} is {ended}")
            raise RemoteError("NOT_FOUND", f"unknown session {session_id!r}")
        if not hmac.compare_digest(sess.token.encode(), token.encode()):
            raise RemoteError("PERMISSION_DENIED", f"wrong token for session {session_id}")
        if sess.closed:
            raise RemoteError("FAILED_PRECONDITION", f"session {session_id} is {sess.closed}")
        sess.last_used = time.monotonic()
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
                self._drop_upload(sess)
            with self._lock:
                room = self.cfg.max_upload_bytes - self._uploading
                if len(data) > room:
                    self._drop_upload_locked(sess)
                    raise RemoteError(
                        "RESOURCE_EXHAUSTED",
                        "the server is receiving too many heads at once; retry later",
                    )
                self._uploading += len(data)
            sess.head_bytes += len(data)
            sess.head_parts.append(data)
            if sess.head_bytes > self.cfg.max_head_bytes:
                self._drop_upload(sess)
                raise RemoteError(
                    "RESOURCE_EXHAUSTED", f"head upload over {self.cfg.max_head_bytes} bytes"
                )
            if not last:
                return
            blob = b"".join(sess.head_parts)
            self._drop_upload(sess)
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
            self._start(sess, (head, layers))
            with self._lock:  # only a head that built a trainer is shared
                self._cache_head(_head_key(sess.spec), (head, layers))

    def _drop_upload(self, sess: Session) -> None:
        with self._lock:
            self._drop_upload_locked(sess)

    def _drop_upload_locked(self, sess: Session) -> None:
        self._uploading -= sess.head_bytes
        sess.head_parts, sess.head_bytes = [], 0

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
                every = self.cfg.checkpoint_every
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
            summary = self._end(sess, "closed")
        log.info(json.dumps({"event": "close", "session": session_id, **summary}))
        return summary

    def _end(self, sess: Session, why: str) -> dict[str, Any]:
        """Checkpoint (when trained), release memory and the slot; the caller holds its lock."""
        summary: dict[str, Any] = dict(self.stats(sess.session_id, sess.token))
        if sess.trainer is not None and sess.trainer.steps_done:
            summary["checkpoint"] = str(self.checkpoint(sess))
        self._discard(sess)
        sess.closed = why
        with self._lock:
            self._sessions.pop(sess.session_id, None)
            self._ended[sess.session_id] = why
            while len(self._ended) > _ENDED_KEPT:
                self._ended.popitem(last=False)
        return summary

    def _discard(self, sess: Session) -> None:
        """Free what a session holds in memory and in its activation cache."""
        self._drop_upload(sess)
        if sess.trainer is not None and sess.trainer.cache is not None:
            sess.trainer.cache.clear()
        sess.trainer = None

    # --- lifecycle --------------------------------------------------------------------------
    def reap(self, now: float | None = None) -> list[str]:
        """Evict sessions idle past their lease (checkpointed first) and delete folders past
        retention; returns the evicted ids. The server calls this periodically."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [
                s for s in self._sessions.values() if now - s.last_used > self.cfg.lease_seconds
            ]
        evicted = []
        for sess in idle:
            if not sess.lock.acquire(blocking=False):
                continue  # busy: a call is running, so it is not idle
            try:
                if sess.closed or now - sess.last_used <= self.cfg.lease_seconds:
                    continue
                summary = self._end(sess, "expired")
            finally:
                sess.lock.release()
            evicted.append(sess.session_id)
            log.info(json.dumps({"event": "expire", "session": sess.session_id, **summary}))
        self._sweep()
        return evicted

    def _sweep(self) -> None:
        """Delete the folders of sessions that ended more than ``retention_seconds`` ago."""
        root = self.workdir / "sessions"
        if not root.is_dir():
            return
        cutoff = time.time() - self.cfg.retention_seconds
        with self._lock:
            live = set(self._sessions)
        for folder in root.iterdir():
            if folder.name in live or not folder.is_dir():
                continue
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                log.info(json.dumps({"event": "delete", "session": folder.name}))
