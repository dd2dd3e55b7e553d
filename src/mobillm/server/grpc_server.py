"""The gRPC server: a ``SessionManager`` behind the ``SideTuning`` service (grpc.aio).

Every manager call runs on a thread pool, so one session's CPU-bound training never stalls
another session's I/O on the event loop; the calls of one Train stream are awaited one after
the other, so they stay in order, and a stream reads its next message only when the previous
one is handled (gRPC flow control then backpressures the device). Errors are ``RemoteError``s
mapped to the gRPC status of the same name. Each RPC after OpenSession must carry the session
id and its bearer token in the metadata. The server writes one JSON object per line to
``<workdir>/server.jsonl`` and each session's steps to ``<workdir>/sessions/<id>/metrics.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import resource
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from mobillm.config import check
from mobillm.errors import MobiLLMError
from mobillm.proto.v1 import mobillm_pb2_grpc as pb_grpc
from mobillm.server.auth import ApiKeys
from mobillm.server.metrics import ServerMetrics
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.transport import serde
from mobillm.transport.grpc_client import API_KEY_HEADER, KEEPALIVE_SECONDS
from mobillm.transport.messages import Ack, Gradient, RemoteError, StepBegin, spec_summary
from mobillm.transport.tls import TlsServerConfig, is_loopback, server_credentials

log = logging.getLogger("mobillm.grpc")

SESSION_KEY = "x-mobillm-session"
AUTH_KEY = "authorization"
# A StepBegin costs at most 8 bytes per row (int64 targets) plus 4 + 8 + 8 per sample
# (rows_per_sample, pool_rows, labels) and a step has no more samples than rows.
STEP_BEGIN_BYTES_PER_ROW = 28
# How long a new Train stream waits for the session's previous one to wind down.
STREAM_HANDOVER_SECONDS = 30.0
# How often idle sessions are looked for (at most; a short lease looks more often).
REAP_SECONDS = 60.0


class ServeError(MobiLLMError):
    """The server could not start (port taken, bad address)."""


def max_message_bytes(cfg: ServerConfig) -> int:
    """The largest message either side may send: a full chunk or a largest StepBegin, plus room.

    Set on purpose instead of gRPC's 4 MB default or a 2 GB ceiling: a bigger message is a
    protocol error (bulk data travels in chunks), refused by gRPC with RESOURCE_EXHAUSTED.
    """
    bulk = max(cfg.max_chunk_bytes, STEP_BEGIN_BYTES_PER_ROW * cfg.max_rows_per_step)
    return bulk + serde.ENVELOPE_BYTES


def status_code(code: str) -> grpc.StatusCode:
    """The gRPC status named ``code`` (UNKNOWN if there is none)."""
    return grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN)


class JsonlLog:
    """Appends JSON lines: server events to ``server.jsonl``, steps to each session's file."""

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = (self.workdir / "server.jsonl").open("a", encoding="utf-8")

    def _write(self, f: Any, rec: dict[str, Any]) -> None:
        f.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
        f.flush()

    def event(self, event: str, **fields: Any) -> None:
        rec = {"time": round(time.time(), 3), "event": event, **fields}
        with self._lock:
            if not self._file.closed:
                self._write(self._file, rec)

    def step(self, session: str, rec: dict[str, Any]) -> None:
        self.event("step", session=session, **rec)
        folder = self.workdir / "sessions" / session
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock, (folder / "metrics.jsonl").open("a", encoding="utf-8") as f:
            self._write(f, {"time": round(time.time(), 3), **rec})

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _Corrupt:
    """What the request decoder hands a handler for bytes that are not a valid message."""

    def __init__(self, error: Exception) -> None:
        self.error = RemoteError("INVALID_ARGUMENT", f"malformed message: {error}")


def _safe_decoder(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def safe(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as e:
            return _Corrupt(e)

    return safe


def _decoded(request: Any) -> Any:
    """``request``, or the INVALID_ARGUMENT its bytes deserve."""
    if isinstance(request, _Corrupt):
        raise request.error
    return request


class _SafeRegistration:
    """Stands in for the server while the generated code registers the service: every request
    decoder is wrapped, so corrupt bytes reach the handler as INVALID_ARGUMENT instead of
    gRPC's UNKNOWN (unary calls) or an INTERNAL with a traceback (streams)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the registered handlers below carry the same methods

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        safe = {
            name: h._replace(request_deserializer=_safe_decoder(h.request_deserializer))
            for name, h in handlers.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, safe),))
        self.server.add_registered_method_handlers(service, safe)


def _as_remote(e: BaseException, rpc: str) -> RemoteError:
    if isinstance(e, RemoteError):
        return e
    log.exception("%s failed", rpc, exc_info=e)
    return RemoteError("INTERNAL", f"server error in {rpc}: {type(e).__name__}: {e}")


def _in_pool(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """``fn(*args)`` on ``pool`` as an awaitable; UNAVAILABLE once the server is stopping."""
    try:
        return asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
    except RuntimeError:  # the pool is shut down
        raise RemoteError("UNAVAILABLE", "the server is shutting down") from None


class _Stream:
    """One Train stream of a session: its manager call in flight, takeover, and its end."""

    def __init__(self) -> None:
        self.inflight: asyncio.Future | None = None
        self.superseded = asyncio.get_running_loop().create_future()
        self.done = asyncio.Event()

    async def next(self, requests: Any) -> Any:
        """The next request, None at the end; ABORTED once a newer stream took over."""
        read = asyncio.ensure_future(anext(requests, None))
        await asyncio.wait({read, self.superseded}, return_when=asyncio.FIRST_COMPLETED)
        if not read.done():
            read.cancel()
            raise RemoteError("ABORTED", "a newer Train stream of this session took over")
        return read.result()

    async def run(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        self.inflight = _in_pool(pool, fn, *args)
        # shield: if the stream is cancelled, the call still completes (a thread cannot stop)
        # and _release waits for it before another stream touches the session.
        return await asyncio.shield(self.inflight)


class SideTuningServicer(pb_grpc.SideTuningServicer):
    """The service's RPCs over a ``SessionManager``; see ``proto/mobillm/proto/v1``."""

    def __init__(
        self,
        manager: SessionManager,
        jlog: JsonlLog,
        pool: ThreadPoolExecutor,
        keys: ApiKeys | None = None,
        mutual_tls: bool = False,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.manager = manager
        self.jlog = jlog
        self.pool = pool
        self.metrics = metrics
        self.keys = keys
        self.mutual_tls = mutual_tls
        self._streams: dict[str, _Stream] = {}  # the live Train stream of each session

    async def _identify(self, context: grpc.aio.ServicerContext) -> str:
        """The credential asking to open a session: ``key:<name>``, ``cert:<common name>``, or
        "" (anonymous, on an open server); UNAUTHENTICATED otherwise."""
        md = {k.lower(): v for k, v in context.invocation_metadata() or ()}
        key = md.get(API_KEY_HEADER, "")
        if key:
            name = await self._run(self.keys.check, key) if self.keys is not None else None
            if name is None:
                raise RemoteError("UNAUTHENTICATED", "API key not accepted by this server")
            return f"key:{name}"
        if self.mutual_tls:  # the handshake already verified the certificate against the CA
            names = (context.auth_context() or {}).get("x509_common_name") or [b"?"]
            return f"cert:{names[0].decode(errors='replace')}"
        if self.manager.cfg.open_access:
            return ""
        raise RemoteError(
            "UNAUTHENTICATED",
            f"this server opens sessions only for a credential: send an API key as metadata "
            f"'{API_KEY_HEADER}' (mobillm train --api-key-file) or a client certificate",
        )

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await _in_pool(self.pool, fn, *args)

    async def _authorize(self, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        md = {k.lower(): v for k, v in context.invocation_metadata() or ()}
        sid = md.get(SESSION_KEY, "")
        scheme, _, token = md.get(AUTH_KEY, "").partition(" ")
        if not sid or scheme.lower() != "bearer" or not token:
            raise RemoteError(
                "UNAUTHENTICATED",
                f"missing credentials: send metadata '{SESSION_KEY}: <session id>' and "
                f"'{AUTH_KEY}: Bearer <token>' as returned by OpenSession",
            )
        await self._run(self.manager.authorize, sid, token)
        return sid, token

    @staticmethod
    def _same(sid: str, named: str) -> None:
        if named != sid:
            raise RemoteError(
                "PERMISSION_DENIED",
                f"frame for another session: the message names {named!r}, this call "
                f"belongs to {sid!r}",
            )

    async def _abort(
        self, context: grpc.aio.ServicerContext, rpc: str, err: RemoteError, sid: str = ""
    ) -> None:
        self.jlog.event(
            "refuse" if rpc == "OpenSession" else "error",
            rpc=rpc,
            session=sid,
            code=err.code,
            message=err.message,
            peer=context.peer(),
        )
        await context.abort(status_code(err.code), err.message)

    async def OpenSession(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            client = await self._identify(context)
            spec = serde.spec_from_proto(_decoded(request))
            info = await self._run(self.manager.open, spec, client)
        except Exception as e:
            await self._abort(context, "OpenSession", _as_remote(e, "OpenSession"))
            raise  # unreachable: abort raises
        self.jlog.event(
            "open",
            session=info.session_id,
            client=client or "anonymous",
            peer=context.peer(),
            need_head=info.need_head,
            **spec_summary(spec),
        )
        return serde.session_info_to_proto(info)

    async def UploadHead(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        sid, seq, total, done = "", 0, 0, False
        try:
            sid, token = await self._authorize(context)
            async for req in request_iterator:
                part = serde.head_part_from_proto(_decoded(req))
                self._same(sid, part.session_id)
                if done or part.seq != seq:
                    raise RemoteError(
                        "INVALID_ARGUMENT",
                        f"head chunk {part.seq} arrived as chunk {seq}"
                        + (" after the last one" if done else ""),
                    )
                await self._run(
                    self.manager.upload_head, sid, token, part.data, part.last, part.seq == 0
                )
                seq, total, done = seq + 1, total + len(part.data), part.last
            if not done:
                raise RemoteError("INVALID_ARGUMENT", "head upload ended before its last chunk")
        except Exception as e:
            await self._abort(context, "UploadHead", _as_remote(e, "UploadHead"), sid)
            raise
        self.jlog.event("head", session=sid, bytes=total)
        return serde.upload_reply_to_proto(total)

    async def Train(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        sid = token = ""
        err: RemoteError | None = None
        me: _Stream | None = None
        try:
            sid, token = await self._authorize(context)
            me = await self._claim(sid)
            await me.run(self.pool, self._drop_step, sid, token)  # a step an old stream left
            wire, began = 0, time.perf_counter()
            while (req := await me.next(request_iterator)) is not None:
                req = _decoded(req)
                wire += req.ByteSize()
                msg = serde.train_request_from_proto(req)
                self._same(sid, msg.session_id)
                if isinstance(msg, StepBegin):
                    began = time.perf_counter()
                    call = self.manager.begin_step
                elif isinstance(msg, Gradient):
                    call = self.manager.add_gradient
                else:
                    call = self.manager.add_chunk
                for reply in await me.run(self.pool, call, sid, token, msg):
                    if isinstance(reply, Ack):
                        loss = reply.loss if math.isfinite(reply.loss) else None  # JSON
                        rec = {"step": reply.step, "loss": loss, "bytes": wire}
                        self.jlog.step(sid, rec | reply.metrics)
                        if self.metrics is not None:
                            latency = time.perf_counter() - began
                            batch = int(reply.metrics.get("batch", 1))
                            self.metrics.step(sid, wire, latency, batch)
                        wire = 0
                    yield serde.reply_to_proto(reply)
        except Exception as e:
            err = _as_remote(e, "Train")
        finally:
            if me is not None:
                await self._release(sid, token, me)
        if err is not None:
            await self._abort(context, "Train", err, sid)

    async def _claim(self, sid: str) -> _Stream:
        """Make the calling stream the session's only one: the newest stream wins.

        A device that reconnects after a dropped link must not wait until the server notices
        the dead stream, and two live streams must never interleave one session's steps: the
        old stream ends with ABORTED once its manager call in flight has finished.
        """
        old = self._streams.get(sid)
        me = self._streams[sid] = _Stream()
        if old is not None and not old.done.is_set():
            if not old.superseded.done():
                old.superseded.set_result(True)
            try:
                await asyncio.wait_for(old.done.wait(), STREAM_HANDOVER_SECONDS)
            except TimeoutError:
                raise RemoteError(
                    "UNAVAILABLE", f"session {sid}'s previous Train stream is still busy; retry"
                ) from None
        return me

    async def _release(self, sid: str, token: str, me: _Stream) -> None:
        """End a stream: wait for its manager call, drop its half-received step, hand over."""
        try:
            if me.inflight is not None and not me.inflight.done():
                await asyncio.wait([me.inflight])  # a thread cannot be cancelled: let it finish
            if self._streams.get(sid) is me:
                del self._streams[sid]
                await me.run(self.pool, self._drop_step, sid, token)
        except RemoteError:
            pass  # the server is stopping; nothing will train this step
        finally:
            me.done.set()

    def _drop_step(self, sid: str, token: str) -> None:
        with contextlib.suppress(RemoteError):  # a closed session has nothing pending
            self.manager.abort_step(sid, token)

    async def Resume(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        sid = ""
        try:
            sid, token = await self._authorize(context)
            self._same(sid, serde.resume_request_from_proto(_decoded(request)))
            state = await self._run(self.manager.resume, sid, token)
        except Exception as e:
            await self._abort(context, "Resume", _as_remote(e, "Resume"), sid)
            raise
        self.jlog.event("resume", session=sid, steps_done=state.steps_done)
        return serde.resume_reply_to_proto(state)

    async def Finish(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        sid = ""
        err: RemoteError | None = None
        try:
            sid, token = await self._authorize(context)
            self._same(sid, serde.finish_request_from_proto(_decoded(request)))
            reports = self.manager.finish(sid, token)
            # one epoch per worker-thread call: the event loop stays free meanwhile
            while (report := await self._run(next, reports, None)) is not None:
                self.jlog.event("epoch", session=sid, epoch=report.epoch, **report.metrics)
                yield serde.epoch_report_to_proto(report)
        except Exception as e:
            err = _as_remote(e, "Finish")
        if err is not None:
            await self._abort(context, "Finish", err, sid)

    async def Download(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        sid = ""
        try:
            sid, token = await self._authorize(context)
            self._same(sid, serde.download_request_from_proto(_decoded(request)))
            blob = await self._run(self.manager.download, sid, token)
        except Exception as e:
            await self._abort(context, "Download", _as_remote(e, "Download"), sid)
            return
        for chunk in serde.blob_to_proto(blob, self.manager.cfg.max_chunk_bytes):
            yield chunk
        self.jlog.event("download", session=sid, bytes=len(blob.weights))

    async def CloseSession(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        sid = ""
        try:
            sid, token = await self._authorize(context)
            self._same(sid, serde.close_request_from_proto(_decoded(request)))
            summary = await self._run(self.manager.close, sid, token)
        except Exception as e:
            await self._abort(context, "CloseSession", _as_remote(e, "CloseSession"), sid)
            raise
        self.jlog.event("close", session=sid, **summary)
        if self.metrics is not None:
            self.metrics.forget(sid)
        return serde.summary_to_proto(summary)


class GrpcServer:
    """A ``SideTuning`` server on ``host:port`` (0 = any free port), TLS or loopback plaintext.

    In a background thread (tests, notebooks)::

        with GrpcServer(ServerConfig(workdir=tmp)) as server:   # start() returns the port
            GrpcTransport(f"127.0.0.1:{server.port}")

    or on the caller's event loop with ``await start_async()`` / ``await stop_async()``.
    """

    def __init__(
        self,
        cfg: ServerConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsServerConfig | None = None,
        insecure: bool = False,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        manager: SessionManager | None = None,
        metrics_port: int | None = None,
    ) -> None:
        check(
            tls is not None or insecure or is_loopback(host),
            f"refusing to serve without TLS on {host}: session tokens and activations would "
            "cross the network in the clear; give --tls-cert/--tls-key, or --insecure if the "
            "network is trusted",
        )
        self.manager = manager or SessionManager(cfg)
        self.cfg = self.manager.cfg
        mutual = tls is not None and bool(tls.client_ca)
        check(
            not self.cfg.open_access or is_loopback(host),
            f"open access (--open) is for loopback only; on {host} give --api-keys FILE "
            "or --tls-client-ca",
        )
        check(
            self.cfg.open_access or bool(self.cfg.api_keys_file) or mutual,
            "say who may open sessions: --api-keys FILE (keys from --add-api-key), "
            "--tls-client-ca CA (mutual TLS), or --open (anyone, loopback only)",
        )
        self.keys = ApiKeys.load(self.cfg.api_keys_file) if self.cfg.api_keys_file else None
        self.mutual_tls = mutual
        self._reaper: asyncio.Task | None = None
        self.host, self.port, self.tls = host, port, tls
        self.interceptors = tuple(interceptors)
        self._server: grpc.aio.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._jlog: JsonlLog | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Prometheus text format on http://host:metrics_port/metrics (None = off, 0 = any port)
        self.metrics_port = metrics_port
        self.metrics: ServerMetrics | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def mode(self) -> str:
        if self.tls is None:
            return "insecure"
        return "mutual tls" if self.tls.client_ca else "tls"

    async def start_async(self) -> int:
        """Bind and start serving on the running loop; returns the bound port."""
        limit = max_message_bytes(self.cfg)
        self._jlog = JsonlLog(self.cfg.workdir)
        # One worker per session it may hold, plus a few for handshakes and refusals.
        self._pool = ThreadPoolExecutor(self.cfg.max_sessions + 4, "mobillm-session")
        server = grpc.aio.server(
            interceptors=self.interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # A second server on a busy port must fail, not silently share it.
                ("grpc.so_reuseport", 0),
                # Devices ping every KEEPALIVE_SECONDS to notice a dead server; allow it. The
                # server pings too, so a vanished device's streams end instead of hanging.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_SECONDS * 500),
                ("grpc.keepalive_time_ms", 3 * KEEPALIVE_SECONDS * 1000),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_SECONDS * 1000),
            ],
        )
        if self.metrics_port is not None and self.metrics is None:
            manager = self.manager
            self.metrics = ServerMetrics(
                manager.num_live, lambda: manager.batcher.depth if manager.batcher else 0
            )
            self.metrics_port = self.metrics.serve(self.metrics_port, self.host)
        servicer = SideTuningServicer(
            self.manager, self._jlog, self._pool, self.keys, self.mutual_tls, self.metrics
        )
        pb_grpc.add_SideTuningServicer_to_server(servicer, _SafeRegistration(server))
        try:
            if self.tls is None:
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, server_credentials(self.tls))
        except RuntimeError as e:
            port, why = 0, str(e)
        else:
            why = "address in use or not available"
        if port == 0:
            self._jlog.close()
            raise ServeError(f"cannot listen on {self.address}: {why}")
        self.port = port
        await server.start()
        self._server = server
        self._reaper = asyncio.ensure_future(self._reap(self._pool))
        self._jlog.event(
            "serving",
            address=self.address,
            mode=self.mode,
            max_message_bytes=limit,
            **self.cfg.to_dict(),
        )
        return port

    async def _reap(self, pool: ThreadPoolExecutor) -> None:
        """Evict idle sessions and delete expired folders, now and then, off the event loop."""
        period = min(REAP_SECONDS, self.cfg.lease_seconds / 4)
        while True:
            await asyncio.sleep(period)
            try:
                parked = await _in_pool(pool, self.manager.reap)
                if self.metrics is not None:
                    for sid in parked:
                        self.metrics.forget(sid)
            except RemoteError:
                return  # the pool is shut down: the server is stopping
            except Exception:  # a sweep that fails must not stop later ones
                log.exception("reaping sessions failed")

    async def stop_async(self, grace: float = 2.0) -> None:
        """Stop taking calls, give running ones ``grace`` seconds, then release everything."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._pool is not None:
            # a graceful stop keeps every session: a restarted server goes on from here
            await asyncio.get_running_loop().run_in_executor(self._pool, self.manager.park_all)
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self._jlog is not None:
            # the server's own peak memory, for benchmarks that compare device and server
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self._jlog.event("stop", address=self.address, peak_rss_mb=round(peak_mb, 1))
            self._jlog.close()

    def start(self) -> int:
        """Serve from a background thread with its own event loop; returns the bound port."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="mobillm-grpc", daemon=True)
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self.start_async(), loop).result()
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self, grace: float = 2.0) -> None:
        """Stop a server started with ``start``."""
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop_async(grace), self._loop).result()
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> GrpcServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
