"""The device's gRPC client: a synchronous ``Transport`` over the ``SideTuning`` service.

The device runtime is synchronous, so the client keeps a grpc.aio channel on an event loop in a
background thread and offers blocking calls. Sending and acks are ``QueuedSender``'s, shared
with the in-process transport: its sender thread paces the bytes through the emulated link
(sleeping there, never on the event loop) and writes them to one long-lived Train stream, whose
writes wait on gRPC flow control; acks come back on the same stream. Keepalive pings end a run
whose server has vanished or frozen within ``KEEPALIVE_SECONDS`` plus its timeout. Every gRPC
failure surfaces as ``RemoteError(status name, details)``, as with the in-process transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import grpc

from mobillm.errors import ConfigError
from mobillm.proto.v1 import mobillm_pb2_grpc as pb_grpc
from mobillm.transport import serde
from mobillm.transport.link import Link, LinkConfig
from mobillm.transport.messages import (
    ActivationChunk,
    EpochReport,
    Gradient,
    HeadBytes,
    RemoteError,
    Reply,
    ResumeState,
    SessionInfo,
    SessionSpec,
    SideBlob,
    StepBegin,
)
from mobillm.transport.sender import QueuedSender
from mobillm.transport.tls import TlsClientConfig, channel_credentials, is_loopback

__all__ = ["GrpcTransport", "TlsClientConfig"]

API_KEY_HEADER = "x-mobillm-api-key"
# The largest message a server may send or accept: a full chunk of the biggest size any server
# announces, plus the fields around it.
MAX_MESSAGE_BYTES = serde.MAX_CHUNK_BYTES + serde.ENVELOPE_BYTES
# HTTP/2 pings: a server that does not answer one within half the interval is gone or frozen.
KEEPALIVE_SECONDS = 20


def _remote(e: grpc.aio.AioRpcError) -> RemoteError:
    return RemoteError(e.code().name, e.details() or "")


class GrpcTransport(QueuedSender):
    """A ``Transport`` talking to a ``mobillm serve`` at ``target`` ("host:port").

    ``tls``: server CA (and client cert/key for mutual TLS); None or all empty = plaintext,
    which is refused for a non-loopback host unless ``insecure``. ``api_key``: the credential
    ``OpenSession`` presents (``mobillm serve --add-api-key``). ``link``: emulated upload rate
    and round-trip time. ``queue_size``: messages ``send`` may queue before it blocks.
    ``connect_timeout``: seconds ``open`` waits for the server. ``keepalive``: seconds between
    pings that notice a vanished or frozen server (it has half that long to answer).
    """

    def __init__(
        self,
        target: str,
        tls: TlsClientConfig | None = None,
        link: LinkConfig | None = None,
        queue_size: int = 256,
        connect_timeout: float = 10.0,
        close_timeout: float = 600.0,
        api_key: str = "",
        insecure: bool = False,
        ack_timeout: float = 600.0,
        keepalive: float = KEEPALIVE_SECONDS,
    ) -> None:
        super().__init__(Link(link), queue_size, ack_timeout)
        self.target = target
        self.tls = tls if tls is not None and tls.enabled else None
        host = target.rpartition(":")[0] or target
        if self.tls is None and not insecure and not is_loopback(host):
            raise ConfigError(
                f"refusing plaintext to {host}: the session token, the API key and the "
                "activations would cross the network in the clear; give the server's CA "
                "(--tls-ca), or --insecure if the network is trusted"
            )
        self.api_key = api_key
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.info: SessionInfo | None = None
        self._md: tuple[tuple[str, str], ...] = ()
        self._train: Any = None  # the Train stream call, opened by the first send
        self._reader: Any = None  # concurrent Future of the ack reader task
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
            ("grpc.keepalive_time_ms", int(self.keepalive * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive * 500)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # gRPC otherwise spaces pings without data 5 minutes apart: a frozen server, which
            # sends no data, would go unnoticed that long
            ("grpc.http2.min_sent_ping_interval_without_data_ms", int(self.keepalive * 1000)),
            ("grpc.http2.min_time_between_pings_ms", int(self.keepalive * 1000)),
        ]
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, channel_credentials(self.tls), options)

    def _session(self) -> SessionInfo:
        if self.info is None:
            raise RuntimeError("open a session first")
        return self.info

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

        md = ((API_KEY_HEADER, self.api_key),) if self.api_key else ()

        async def call() -> Any:
            return await self._stub.OpenSession(request, timeout=self.connect_timeout, metadata=md)

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
        return self.attach(serde.session_info_from_proto(reply))

    def attach(self, info: SessionInfo) -> SessionInfo:
        """Use the session ``info`` (opened here, or by a run that crashed: ``--resume``)."""
        self.info = info
        self._md = (
            ("authorization", f"Bearer {info.token}"),
            ("x-mobillm-session", info.session_id),
        )
        self._start_sender()
        return info

    def resume(self) -> ResumeState:
        """After a failure: a new Train stream, and where the server's session stands.

        One attempt; UNAVAILABLE while the server is unreachable (the caller backs off).
        """
        sid = self._session().session_id
        if self._train is not None:
            self._train.cancel()  # a write blocked on the dead stream returns
        self._restart_sender()

        async def call() -> Any:
            request = serde.resume_request_to_proto(sid)
            return await self._stub.Resume(request, metadata=self._md, timeout=self.connect_timeout)

        try:
            reply = asyncio.run_coroutine_threadsafe(call(), self._loop).result()
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RemoteError("UNAVAILABLE", f"no answer from {self.target}") from None
            raise _remote(e) from None
        return serde.resume_reply_from_proto(reply)

    def upload_head(self, data: HeadBytes) -> None:
        """Stream the frozen head in ``max_chunk_bytes`` chunks, paced by the link."""
        info = self._session()

        async def start() -> Any:
            return self._stub.UploadHead(metadata=self._md)

        call = self._run(start())
        for part in serde.head_parts(info.session_id, data, info.max_chunk_bytes):
            msg = serde.head_part_to_proto(part)
            self.link.send(msg.ByteSize())
            if (err := self._run(self._write(call, msg))) is not None:
                raise err

        async def finish() -> Any:
            await call.done_writing()
            return await call

        serde.upload_reply_from_proto(self._run(finish()))

    # --- training stream --------------------------------------------------------------------
    def _deliver(self, msg: StepBegin | ActivationChunk | Gradient) -> list[Reply]:
        req = serde.train_request_to_proto(msg)
        if self._train is None:
            self._train = self._run(self._open_train())
        self.link.send(req.ByteSize())
        if (err := self._run(self._write(self._train, req))) is not None:
            raise err
        return []  # replies arrive on the stream, read by _read_acks

    def _end_stream(self, failed: bool) -> None:
        if self._train is not None:
            # If the stream ended meanwhile, the reader reports how.
            with contextlib.suppress(RemoteError, asyncio.InvalidStateError):
                self._run(self._end_train(self._train, cancel=failed))
            self._train = None

    @staticmethod
    async def _end_train(call: Any, cancel: bool) -> None:
        if cancel:  # a local failure left the stream open: the server must not wait for more
            call.cancel()
        else:
            await call.done_writing()

    async def _open_train(self) -> Any:
        call = self._stub.Train(metadata=self._md)
        reader = self._read_acks(call, self._gen)
        self._reader = asyncio.run_coroutine_threadsafe(reader, self._loop)
        return call

    async def _read_acks(self, call: Any, gen: int) -> None:
        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                self._ack(serde.reply_from_proto(resp), gen)
            err = await self._status(call)
        except grpc.aio.AioRpcError as e:
            err = _remote(e)
        except asyncio.CancelledError:
            # a cancelled call ends its read this way, not with a status: a device waiting
            # for an ack (and sending nothing that could fail) must still hear of it
            err = RemoteError("CANCELLED", "the Train stream was cancelled")
        except Exception as e:  # never die silently: next_ack() would wait forever
            err = RemoteError("INTERNAL", f"ack reader failed: {type(e).__name__}: {e}")
        if err is not None:
            self._fail(err, gen)

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
            self._stop_sender()
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
            self._stop_sender()
        asyncio.run_coroutine_threadsafe(self._channel.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
