"""The device's gRPC client: a synchronous ``Transport`` over the ``SideTuning`` service.

The device runtime is synchronous, so the client keeps a grpc.aio channel on an event loop in a
background thread and offers blocking calls. ``send`` only enqueues (a bounded queue: when it
is full the device's forward pass waits, which is the backpressure); a sender thread drains
the queue, paces the bytes through the emulated link (sleeping there, never on the event loop)
and writes them to one long-lived Train stream, whose writes wait on gRPC flow control. Acks
come back on the same stream and become visible ``link.ack_delay()`` seconds late. Every
gRPC failure surfaces as ``RemoteError(status name, details)``, as with the in-process
transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import grpc

from mobillm.proto.v1 import mobillm_pb2_grpc as pb_grpc
from mobillm.transport import serde
from mobillm.transport.link import Link, LinkConfig
from mobillm.transport.messages import (
    Ack,
    ActivationChunk,
    EpochReport,
    RemoteError,
    SessionInfo,
    SessionSpec,
    SideBlob,
    StepBegin,
)
from mobillm.transport.tls import TlsClientConfig, channel_credentials

__all__ = ["GrpcTransport", "TlsClientConfig"]

# The largest message a server may send or accept: a full chunk of the biggest size any server
# announces, plus the fields around it.
MAX_MESSAGE_BYTES = serde.MAX_CHUNK_BYTES + serde.ENVELOPE_BYTES
_STOP = object()


def _remote(e: grpc.aio.AioRpcError) -> RemoteError:
    return RemoteError(e.code().name, e.details() or "")


class GrpcTransport:
    """A ``Transport`` talking to a ``mobillm serve`` at ``target`` ("host:port").

    ``tls``: server CA (and client cert/key for mutual TLS); None or all empty = plaintext.
    ``link``: emulated upload rate and round-trip time. ``queue_size``: messages ``send`` may
    queue before it blocks. ``connect_timeout``: seconds ``open`` waits for the server.
    """

    def __init__(
        self,
        target: str,
        tls: TlsClientConfig | None = None,
        link: LinkConfig | None = None,
        queue_size: int = 256,
        connect_timeout: float = 10.0,
        close_timeout: float = 600.0,
    ) -> None:
        self.target = target
        self.tls = tls if tls is not None and tls.enabled else None
        self.link = Link(link)
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.info: SessionInfo | None = None
        self._out: queue.Queue = queue.Queue(maxsize=queue_size)
        self._acks: queue.Queue = queue.Queue()
        self._error: RemoteError | None = None
        self._lock = threading.Lock()
        self._md: tuple[tuple[str, str], ...] = ()
        self._train: Any = None  # the Train stream call, opened by the first send
        self._reader: Any = None  # concurrent Future of the ack reader task
        self._sender: threading.Thread | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="mobillm-grpc-client", daemon=True
        )
        self._thread.start()
        self._channel: grpc.aio.Channel = self._run(self._connect())
        self._stub = pb_grpc.SideTuningStub(self._channel)

    # --- plumbing ---------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the client's loop and wait for it; gRPC errors become RemoteError."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)
        except grpc.aio.AioRpcError as e:
            raise _remote(e) from None

    async def _connect(self) -> grpc.aio.Channel:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, channel_credentials(self.tls), options)

    def _session(self) -> SessionInfo:
        if self.info is None:
            raise RuntimeError("open a session first")
        return self.info

    def _fail(self, err: RemoteError) -> None:
        with self._lock:
            if self._error is None:
                self._error = err
                self._acks.put(err)

    @staticmethod
    async def _status(call: Any) -> RemoteError | None:
        code = await call.code()
        if code == grpc.StatusCode.OK:
            return None
        return RemoteError(code.name, await call.details() or "")

    async def _write(self, call: Any, msg: Any) -> RemoteError | None:
        """Write one message; the call's final status if the stream has ended instead."""
        try:
            await call.write(msg)
            return None
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return await self._status(call) or RemoteError("UNAVAILABLE", "stream closed")

    # --- session ----------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        if self.tls is None:
            return "plaintext"
        return "mutual TLS" if self.tls.cert else "TLS"

    @property
    def bytes_sent(self) -> int:
        """Serialized message bytes handed to the link (payload and protobuf framing)."""
        return self.link.bytes_sent

    def open(self, spec: SessionSpec) -> SessionInfo:
        """Propose ``spec``; UNAVAILABLE quickly if nothing answers at the target."""
        request = serde.spec_to_proto(spec)

        async def call() -> Any:
            return await self._stub.OpenSession(request, timeout=self.connect_timeout)

        try:
            reply = asyncio.run_coroutine_threadsafe(call(), self._loop).result()
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RemoteError(
                    "UNAVAILABLE",
                    f"cannot reach server at {self.target} over {self.mode} (is it running, "
                    f"with the same TLS settings?): {e.details()}",
                ) from None
            raise _remote(e) from None
        self.info = serde.session_info_from_proto(reply)
        self._md = (
            ("authorization", f"Bearer {self.info.token}"),
            ("x-mobillm-session", self.info.session_id),
        )
        self._sender = threading.Thread(target=self._pump, name="mobillm-sender", daemon=True)
        self._sender.start()
        return self.info

    def upload_head(self, blob: bytes) -> None:
        """Stream the frozen head in ``max_chunk_bytes`` chunks, paced by the link."""
        info = self._session()

        async def start() -> Any:
            return self._stub.UploadHead(metadata=self._md)

        call = self._run(start())
        for part in serde.head_parts(info.session_id, blob, info.max_chunk_bytes):
            msg = serde.head_part_to_proto(part)
            self.link.send(msg.ByteSize())
            if (err := self._run(self._write(call, msg))) is not None:
                raise err

        async def finish() -> Any:
            await call.done_writing()
            return await call

        serde.upload_reply_from_proto(self._run(finish()))

    # --- training stream --------------------------------------------------------------------
    def send(self, msg: StepBegin | ActivationChunk) -> None:
        """Queue ``msg`` for the sender thread; blocks while the queue is full."""
        if self._error is not None:
            raise self._error
        self._out.put(msg)

    def _pump(self) -> None:
        while (msg := self._out.get()) is not _STOP:
            if self._error is not None:
                continue  # drain: the stream already failed; send() reports it
            try:
                req = serde.train_request_to_proto(msg)
                if self._train is None:
                    self._train = self._run(self._open_train())
                self.link.send(req.ByteSize())
                err = self._run(self._write(self._train, req))
            except RemoteError as e:
                err = e
            except Exception as e:  # never die silently: send() would block on a full queue
                err = RemoteError("INTERNAL", f"sender failed: {type(e).__name__}: {e}")
            if err is not None:
                self._fail(err)
        if self._train is not None:
            # If the stream ended meanwhile, the reader reports how.
            with contextlib.suppress(RemoteError, asyncio.InvalidStateError):
                self._run(self._end_train(self._train, cancel=self._error is not None))

    @staticmethod
    async def _end_train(call: Any, cancel: bool) -> None:
        if cancel:  # a local failure left the stream open: the server must not wait for more
            call.cancel()
        else:
            await call.done_writing()

    async def _open_train(self) -> Any:
        call = self._stub.Train(metadata=self._md)
        self._reader = asyncio.run_coroutine_threadsafe(self._read_acks(call), self._loop)
        return call

    async def _read_acks(self, call: Any) -> None:
        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                ack = serde.ack_from_proto(resp)
                self._acks.put((time.perf_counter() + self.link.ack_delay(), ack))
            err = await self._status(call)
        except grpc.aio.AioRpcError as e:
            err = _remote(e)
        except Exception as e:  # never die silently: next_ack() would wait forever
            err = RemoteError("INTERNAL", f"ack reader failed: {type(e).__name__}: {e}")
        if err is not None:
            self._fail(err)

    def next_ack(self, timeout: float | None = None) -> Ack:
        """The next step's ack; raises the stream's RemoteError once the acks before it are read.

        Raises ``queue.Empty`` after ``timeout`` seconds without one.
        """
        item = self._acks.get(timeout=timeout)
        if isinstance(item, RemoteError):
            self._acks.put(item)  # stays the answer to every later call
            raise item
        visible_at, ack = item
        if (wait := visible_at - time.perf_counter()) > 0:
            time.sleep(wait)
        return ack

    # --- results ----------------------------------------------------------------------------
    def finish(self) -> Iterator[EpochReport]:
        """Have the server train its remaining epochs; yields one report per epoch."""
        sid = self._session().session_id

        async def start() -> Any:
            return self._stub.Finish(serde.finish_request_to_proto(sid), metadata=self._md)

        call = self._run(start())
        while (resp := self._run(call.read())) is not grpc.aio.EOF:
            yield serde.epoch_report_from_proto(resp)
        if (err := self._run(self._status(call))) is not None:
            raise err

    def download(self) -> SideBlob:
        """The side network as the server holds it now."""
        sid = self._session().session_id

        async def fetch() -> SideBlob:
            call = self._stub.Download(serde.download_request_to_proto(sid), metadata=self._md)
            return serde.blob_from_proto([c async for c in call])

        return self._run(fetch())

    def close(self) -> dict[str, Any]:
        """End the Train stream (after every queued message), close the session, disconnect."""
        sid = self._session().session_id
        try:
            if self._sender is not None:
                self._out.put(_STOP)
                self._sender.join()
                self._sender = None
            if self._reader is not None:
                self._reader.result(self.close_timeout)  # the server has handled everything

            async def close() -> Any:
                request = serde.close_request_to_proto(sid)
                return await self._stub.CloseSession(request, metadata=self._md)

            return serde.summary_from_proto(self._run(close()))
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Close the channel and stop the client's thread (idempotent; close() calls it)."""
        if self._loop.is_closed():
            return
        if self._sender is not None:  # a session left open: stop its sender first
            self._fail(RemoteError("CANCELLED", "transport shut down"))
            self._out.put(_STOP)
            self._sender.join()
            self._sender = None
        asyncio.run_coroutine_threadsafe(self._channel.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
