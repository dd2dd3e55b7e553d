"""The server's session table: handshakes, bearer tokens, frozen heads, trainers, downloads.

Every public method takes the session id and its token and raises ``RemoteError`` with a code a
transport can map to a status; an error in one session never touches another. Methods of one
session are serialised by its lock; different sessions run concurrently.

Everything a client chooses is priced before it is allocated (``mobillm.server.budget``): a
session is registered only once its side network is known to fit, and only when it is fully
built. Frozen heads are shared by content and settings (``mobillm.server.heads``).

Sessions outlive their process (``mobillm.server.state``): each is recorded on disk when it
opens, its trainer is checkpointed every ``checkpoint_every`` steps, before and after Finish,
when it is evicted (nobody called for ``lease_seconds``) and when the server stops. A call for
a session that is not in memory -- evicted, or the server restarted -- loads it back from its
last checkpoint; ``resume`` tells the device which step to send next. Folders of sessions that
ended or were left are deleted after ``retention_seconds``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import math
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mobillm.config import Config, check
from mobillm.server.batching import BatchConfig, Batcher
from mobillm.server.budget import check_side, price
from mobillm.server.cache import ActivationCache, CacheConfig
from mobillm.server.heads import Frozen, HeadCache, head_key, parse_head
from mobillm.server.state import SessionStore, head_file_key, token_hash
from mobillm.server.trainer import Trainer, use_tf32
from mobillm.side.io import SideMeta, save_side, weights_to_bytes
from mobillm.transport.messages import (
    DEFAULT_CHUNK_BYTES,
    PROTOCOL_VERSION,
    Ack,
    ActivationChunk,
    EpochReport,
    Gradient,
    RemoteError,
    Reply,
    ResumeState,
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
    ``checkpoint_every``: the server's checkpoint policy in steps (0 = only around Finish, on
    eviction and at stop); a restarted server resumes from the last one.
    ``lease_seconds``: a session nobody calls for this long is checkpointed and evicted;
    ``retention_seconds``: its folder (checkpoints, metrics) is deleted this long after.
    ``api_keys_file``: salted key hashes (``mobillm.server.auth``) that may open sessions;
    ``open_access``: anyone may (loopback only). A network server needs one of the two or a
    mutual-TLS client CA.
    ``max_batch``: session-steps of same-shaped side networks trained together in one
    stacked round (``mobillm.server.batching``; 1 = each session trains on its own);
    ``batch_wait_ms``: how long a round waits after its first step for others;
    ``batch_round_bytes``: what one round may take (its steps' estimated memory).
    ``tf32``: on CUDA, float32 matmuls run on TF32 tensor cores (10-bit mantissa inputs,
    float32 accumulation): 1.25-1.4x the session-steps/s on an H200, the same trade PyTorch
    makes by default for convolutions; no effect on CPU.
    """

    device: str = "cpu"
    max_sessions: int = 16
    max_sessions_per_client: int = 4
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_rows_per_step: int = 1 << 16
    max_side_bytes: int = 4 << 30
    max_step_bytes: int = 4 << 30
    # the default split learner on a 1.5B backbone uploads 14 float32 layers (2.8 GB); a
    # session's frozen layers are bounded by max_side_bytes anyway
    max_head_bytes: int = 4 << 30
    max_upload_bytes: int = 4 << 30
    head_cache_bytes: int = 2 << 30
    cache_memory_bytes: int = CacheConfig.memory_bytes
    cache_disk_bytes: int = CacheConfig.disk_bytes
    checkpoint_every: int = 10
    lease_seconds: float = 900.0
    retention_seconds: float = 7 * 86400.0
    allowed_backbones: tuple[str, ...] = ()
    api_keys_file: str = ""
    open_access: bool = False
    workdir: str = "runs/server"
    max_batch: int = BatchConfig.max_batch
    batch_wait_ms: float = 50.0
    batch_round_bytes: int = BatchConfig.round_bytes
    tf32: bool = True

    def validate(self) -> None:
        BatchConfig(self.max_batch, self.batch_wait_ms, self.batch_round_bytes)  # validates
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
    token_sha256: str
    spec: SessionSpec
    lock: threading.Lock
    client: str = ""
    trainer: Trainer | None = None
    head_bytes: int = 0  # of the upload spooled so far (SessionStore.upload_path)
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    closed: bool = False
    max_upload: int = 0  # what this session's head upload may take (priced at open)
    finish_run: int = 0  # bumped when a Finish starts: an older, broken-off one must stop


class SessionManager:
    """Owns sessions, their records on disk, and the cache of frozen heads."""

    def __init__(self, cfg: ServerConfig | None = None) -> None:
        self.cfg = cfg or ServerConfig()
        self._sessions: dict[str, Session] = {}
        self._heads = HeadCache(self.cfg.head_cache_bytes)
        self._uploading = 0  # bytes of head uploads in progress, all sessions
        self._lock = threading.Lock()
        self.workdir = Path(self.cfg.workdir)
        self.store = SessionStore(self.workdir)
        use_tf32(self.cfg.device, self.cfg.tf32)
        batching = BatchConfig(
            self.cfg.max_batch, self.cfg.batch_wait_ms, self.cfg.batch_round_bytes
        )
        self.batcher = Batcher(batching) if batching.max_batch > 1 else None

    def num_live(self) -> int:
        """Sessions held in memory now."""
        return len(self._sessions)

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
        cost = check_side(spec, self.cfg.max_side_bytes)
        sid, token = secrets.token_hex(8), secrets.token_urlsafe(24)
        sess = Session(sid, token_hash(token), spec, threading.Lock(), client)
        sess.max_upload = min(self.cfg.max_head_bytes, cost.upload_bytes)
        with self._lock:
            head = self._heads.get(head_key(spec))
        if head is not None:
            self._start(sess, head)
        self.store.write_session(sid, spec, token, client)
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
        return SessionInfo(sid, token, head is None, self.cfg.max_chunk_bytes, "mobillm")

    def _start(self, sess: Session, frozen: Frozen) -> None:
        head, layers = frozen
        cfg = CacheConfig(self.cfg.cache_memory_bytes, self.cfg.cache_disk_bytes)
        folder = self.store.folder(sess.session_id) / "cache"
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
                self.batcher,
                self.cfg.max_chunk_bytes,
            )
        except (ValueError, RuntimeError) as e:
            raise RemoteError("INVALID_ARGUMENT", f"cannot build the side network: {e}") from None

    def _get(self, session_id: str, token: str) -> Session:
        with self._lock:
            sess = self._sessions.get(session_id)
        if sess is None:
            sess = self._load(session_id, token)
        if not hmac.compare_digest(token_hash(token), sess.token_sha256):
            raise RemoteError("PERMISSION_DENIED", f"wrong token for session {session_id}")
        if sess.closed:
            raise RemoteError("FAILED_PRECONDITION", f"session {session_id} is closed")
        sess.last_used = time.monotonic()
        return sess

    def _load(self, session_id: str, token: str) -> Session:
        """A session not in memory (evicted, or opened before a restart), from disk."""
        record = self.store.read_session(session_id)
        if record is None:
            raise RemoteError("NOT_FOUND", f"unknown session {session_id!r}")
        if not hmac.compare_digest(token_hash(token), record["token_sha256"]):
            raise RemoteError("PERMISSION_DENIED", f"wrong token for session {session_id}")
        if record["ended"]:
            raise RemoteError("FAILED_PRECONDITION", f"session {session_id} is {record['ended']}")
        spec = SessionSpec.from_dict(record["spec"])
        sess = Session(session_id, record["token_sha256"], spec, threading.Lock(), record["client"])
        sess.max_upload = min(self.cfg.max_head_bytes, price(spec).upload_bytes)
        with sess.lock:
            with self._lock:
                if (live := self._sessions.get(session_id)) is not None:
                    return live  # another call loaded it meanwhile
                self._room(sess.client)
                frozen = self._heads.get(head_key(spec))
            if frozen is None:
                path = self.store.head_path(head_file_key(*head_key(spec)))
                frozen = parse_head(spec, path) if path is not None else None
            if frozen is not None:  # else the device never finished its upload: it resends
                self._start(sess, frozen)
                state = self.store.read_state(session_id)
                assert sess.trainer is not None
                if state is not None:
                    sess.trainer.load_state(*state)
                elif sess.trainer.cache is not None:
                    sess.trainer.cache.reopen(0)
            with self._lock:
                if (live := self._sessions.get(session_id)) is not None:
                    self._discard(sess)
                    return live
                self._sessions[session_id] = sess
        steps = sess.trainer.steps_done if sess.trainer else 0
        log.info(json.dumps({"event": "load", "session": session_id, "steps": steps}))
        return sess

    @contextlib.contextmanager
    def _hold(self, session_id: str, token: str) -> Iterator[Session]:
        """The session, locked; one unloaded meanwhile (evicted, stopping) is loaded again."""
        for _ in range(3):
            sess = self._get(session_id, token)
            with sess.lock:
                if not sess.closed:
                    yield sess
                    return
        raise RemoteError("UNAVAILABLE", f"session {session_id} is being moved; retry")

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
        with self._hold(session_id, token) as sess:
            if sess.trainer is not None:
                raise RemoteError("FAILED_PRECONDITION", "the server already has this head")
            if first:
                self._drop_upload(sess)
            with self._lock:
                if len(data) > self.cfg.max_upload_bytes - self._uploading:
                    self._drop_upload_locked(sess)
                    raise RemoteError(
                        "RESOURCE_EXHAUSTED",
                        "the server is receiving too many heads at once; retry later",
                    )
                self._uploading += len(data)
            sess.head_bytes += len(data)
            limit = sess.max_upload or self.cfg.max_head_bytes
            if sess.head_bytes > limit:
                self._drop_upload(sess)
                raise RemoteError(
                    "RESOURCE_EXHAUSTED",
                    f"head upload over {limit} bytes, what this session's head can take",
                )
            spool = self.store.upload_path(session_id)
            with open(spool, "ab") as f:
                f.write(data)
            if not last:
                return
            try:
                frozen = parse_head(sess.spec, spool)
                self._start(sess, frozen)
                self.store.keep_head(head_file_key(*head_key(sess.spec)), spool)
            finally:
                self._drop_upload(sess)
            with self._lock:  # only a head that built a trainer is shared
                self._heads.put(head_key(sess.spec), frozen)

    def _drop_upload(self, sess: Session) -> None:
        with self._lock:
            self._drop_upload_locked(sess)

    def _drop_upload_locked(self, sess: Session) -> None:
        self._uploading -= sess.head_bytes
        sess.head_bytes = 0
        self.store.upload_path(sess.session_id).unlink(missing_ok=True)

    # --- training ---------------------------------------------------------------------------
    def _trainer(self, sess: Session) -> Trainer:
        if sess.trainer is None:
            raise RemoteError("FAILED_PRECONDITION", "upload the frozen head before training")
        return sess.trainer

    def begin_step(self, session_id: str, token: str, msg: StepBegin) -> list[Reply]:
        """Open a step; a private-label replay may answer at once with its Features."""
        with self._hold(session_id, token) as sess:
            trainer = self._trainer(sess)
            return self._replies(sess, self._guarded(trainer, trainer.begin, msg))

    def add_chunk(self, session_id: str, token: str, chunk: ActivationChunk) -> list[Reply]:
        """Take one chunk: the step's Ack once it is trained (private labels: its Features)."""
        if len(chunk.data) > self.cfg.max_chunk_bytes:
            raise RemoteError(
                "RESOURCE_EXHAUSTED",
                f"chunk of {len(chunk.data)} bytes; limit {self.cfg.max_chunk_bytes}",
            )
        with self._hold(session_id, token) as sess:
            trainer = self._trainer(sess)
            return self._replies(sess, self._guarded(trainer, trainer.add_chunk, chunk))

    def add_gradient(self, session_id: str, token: str, grad: Gradient) -> list[Reply]:
        """Private labels: train the waiting step on the device's gradient; its Ack, then the
        next step's Features if one is ready."""
        with self._hold(session_id, token) as sess:
            trainer = self._trainer(sess)
            return self._replies(sess, self._guarded(trainer, trainer.add_gradient, grad))

    @staticmethod
    def _guarded(trainer: Trainer, call: Callable[[Any], Any], msg: Any) -> Any:
        """``call(msg)``; a refusal drops the open steps (the device resends them)."""
        try:
            return call(msg)
        except RemoteError:
            trainer.abort_step()
            raise

    def _replies(self, sess: Session, out: Reply | list[Reply] | None) -> list[Reply]:
        """Log and checkpoint after each Ack among a trainer's answers."""
        replies = out if isinstance(out, list) else [] if out is None else [out]
        trainer = sess.trainer
        assert trainer is not None
        for r in replies:
            if isinstance(r, Ack):
                self._log_step(sess, r)
                every = self.cfg.checkpoint_every
                if every and trainer.steps_done % every == 0:
                    self._save(sess)
        return replies

    def abort_step(self, session_id: str, token: str) -> None:
        with self._hold(session_id, token) as sess:
            if sess.trainer is not None:
                sess.trainer.abort_step()

    def _log_step(self, sess: Session, ack: Ack) -> None:
        t = sess.trainer
        assert t is not None
        rec = {
            "event": "step",
            "session": sess.session_id,
            "step": ack.step,
            # NaN is no JSON: a private-label session's loss is the device's to know
            "loss": round(ack.loss, 5) if math.isfinite(ack.loss) else None,
            "bytes_received": t.bytes_received,
            **{k: round(v, 6) for k, v in ack.metrics.items()},
        }
        log.info(json.dumps(rec))

    def resume(self, session_id: str, token: str) -> ResumeState:
        """Where the session stands for a device that reconnects: a half-received step is
        dropped, a broken-off Finish is undone (the device calls Finish again)."""
        with self._hold(session_id, token) as sess:
            t = sess.trainer
            if t is None:
                return ResumeState(0, 0, need_head=True)
            t.abort_step()
            if t.finished and t.reports is None:
                self._reload(sess)
            last = t.last_ack  # a copy: the device fills in what only it knows
            last = None if last is None else Ack(last.step, last.loss, dict(last.metrics))
            return ResumeState(t.steps_done, t.optimizer_steps, last_ack=last)

    def _reload(self, sess: Session) -> None:
        """Back to the last checkpoint (the one Finish took before it began)."""
        assert sess.trainer is not None
        sess.finish_run += 1  # a Finish still pulling reports stops
        state = self.store.read_state(sess.session_id)
        if state is None:
            raise RemoteError("DATA_LOSS", "the session's checkpoint is gone; start again")
        sess.trainer.load_state(*state)

    def finish(self, session_id: str, token: str) -> Iterator[EpochReport]:
        """Train the remaining epochs from the cache; one report per epoch, the last marked.

        The caller pulls reports one at a time (a transport runs each ``next`` in a worker
        thread); the session's lock is held only while an epoch runs. Calling it again after
        a broken-off Finish starts over from the checkpoint taken before it (the same result);
        after a completed one it repeats the reports.
        """
        with self._hold(session_id, token) as sess:
            t = self._trainer(sess)
            if t.reports is not None:
                yield from list(t.reports)
                return
            if t.finished:
                self._reload(sess)
            self._save(sess)
            sess.finish_run += 1
            run = sess.finish_run
            epochs = t.run_epochs()
        while True:
            with sess.lock:
                if sess.closed or sess.finish_run != run:
                    return  # a newer Finish or a resume took over
                report = next(epochs, None)
                if report is not None and report.last:
                    self._save(sess)
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
        with self._hold(session_id, token) as sess:
            trainer = self._trainer(sess)
            meta = self.meta(sess)
            return SideBlob(
                json.dumps(meta.to_dict(), sort_keys=True), weights_to_bytes(trainer.net)
            )

    def checkpoint(self, sess: Session) -> Path:
        """The side network as a loadable folder (what the device downloads), by step."""
        trainer = self._trainer(sess)
        out = self.store.folder(sess.session_id) / f"step-{trainer.steps_done:06d}"
        return save_side(trainer.net, self.meta(sess), out)

    def stats(self, session_id: str, token: str) -> dict[str, float]:
        return self._stats(self._get(session_id, token))

    @staticmethod
    def _stats(sess: Session) -> dict[str, float]:
        t = sess.trainer
        return {
            "steps": t.steps_done if t else 0,
            "samples": t.samples_seen if t else 0,
            "bytes_received": t.bytes_received if t else 0,
            "optimizer_steps": t.optimizer_steps if t else 0,
            "server_epochs": t.epochs_done if t else 0,
        }

    # --- lifecycle --------------------------------------------------------------------------
    def close(self, session_id: str, token: str) -> dict[str, Any]:
        """End a session: a final checkpoint is written and its memory is released."""
        with self._hold(session_id, token) as sess:
            summary: dict[str, Any] = dict(self._stats(sess))
            if sess.trainer is not None and sess.trainer.steps_done:
                summary["checkpoint"] = str(self.checkpoint(sess))
            self.store.end(session_id, "closed")
            shutil.rmtree(self.store.folder(session_id) / "state", ignore_errors=True)
            if sess.trainer is not None and sess.trainer.cache is not None:
                sess.trainer.cache.clear()
            self._unload(sess)
        log.info(json.dumps({"event": "close", "session": session_id, **summary}))
        return summary

    def _save(self, sess: Session) -> None:
        """Checkpoint the trainer (the caller holds the session's lock)."""
        if sess.trainer is not None:
            self.store.write_state(sess.session_id, *sess.trainer.state())

    def _discard(self, sess: Session) -> None:
        """Free what an unregistered session built."""
        self._drop_upload(sess)
        if sess.trainer is not None:
            sess.trainer.release()
            if sess.trainer.cache is not None:
                sess.trainer.cache.clear()
        sess.trainer = None

    def _unload(self, sess: Session) -> None:
        """Out of memory and out of the table (the caller holds the session's lock)."""
        self._drop_upload(sess)
        if sess.trainer is not None:
            sess.trainer.release()
        sess.trainer = None
        sess.closed = True
        sess.finish_run += 1
        with self._lock:
            if self._sessions.get(sess.session_id) is sess:
                del self._sessions[sess.session_id]

    def _park(self, sess: Session) -> dict[str, Any]:
        """Checkpoint and unload; the next call for the session loads it back."""
        summary = dict(self._stats(sess))
        self._save(sess)
        self._unload(sess)
        return summary

    def park_all(self) -> None:
        """Checkpoint and unload every session (the server is stopping)."""
        with self._lock:
            live = list(self._sessions.values())
        for sess in live:
            with sess.lock:
                if not sess.closed:
                    self._park(sess)
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None

    def reap(self, now: float | None = None) -> list[str]:
        """Park sessions idle past their lease and delete folders past retention; returns the
        parked ids. The server calls this periodically."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [
                s for s in self._sessions.values() if now - s.last_used > self.cfg.lease_seconds
            ]
        parked = []
        for sess in idle:
            if not sess.lock.acquire(blocking=False):
                continue  # busy: a call is running, so it is not idle
            try:
                if sess.closed or now - sess.last_used <= self.cfg.lease_seconds:
                    continue
                summary = self._park(sess)
            finally:
                sess.lock.release()
            parked.append(sess.session_id)
            log.info(json.dumps({"event": "evict", "session": sess.session_id, **summary}))
        self._sweep()
        return parked

    def _sweep(self) -> None:
        """Delete session folders and stored heads untouched for ``retention_seconds``."""
        cutoff = time.time() - self.cfg.retention_seconds
        with self._lock:
            live = set(self._sessions)
        for root in (self.store.root, self.store.heads):
            if not root.is_dir():
                continue
            for path in root.iterdir():
                if path.name in live or path.stat().st_mtime >= cutoff:
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                log.info(json.dumps({"event": "delete", "path": str(path)}))
