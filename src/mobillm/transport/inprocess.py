"""In-process transport: the server's session manager in a thread of the device's process.

It behaves like the network client (a bounded send queue drained by a sender thread, acks
coming back asynchronously, the same errors), so the device runtime cannot tell them apart.
Tests and single-machine experiments use it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from mobillm.server.sessions import SessionManager
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

_STOP = object()


def message_nbytes(msg: StepBegin | ActivationChunk) -> int:
    """Payload bytes a message puts on the link (labels and row layout, or codec bytes)."""
    if isinstance(msg, ActivationChunk):
        return len(msg.data) + 24
    n = 16 + msg.rows_per_sample.numel() * 4 + msg.pool_rows.numel() * 8
    for t in (msg.labels, msg.targets):
        n += t.numel() * 8 if t is not None else 0
    return n


class InProcessTransport:
    """A ``Transport`` that calls a ``SessionManager`` directly from a sender thread."""

    def __init__(
        self, manager: SessionManager, link: LinkConfig | None = None, queue_size: int = 256
    ) -> None:
        self.manager = manager
        self.link = Link(link)
        self.info: SessionInfo | None = None
        self._out: queue.Queue = queue.Queue(maxsize=queue_size)
        self._acks: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: RemoteError | None = None

    @property
    def bytes_sent(self) -> int:
        return self.link.bytes_sent

    def _session(self) -> SessionInfo:
        if self.info is None:
            raise RuntimeError("open a session first")
        return self.info

    def open(self, spec: SessionSpec) -> SessionInfo:
        self.info = self.manager.open(spec)
        self._thread = threading.Thread(target=self._pump, name="mobillm-sender", daemon=True)
        self._thread.start()
        return self.info

    def upload_head(self, blob: bytes) -> None:
        info = self._session()
        step = info.max_chunk_bytes
        parts = [blob[i : i + step] for i in range(0, len(blob), step)] or [b""]
        for i, part in enumerate(parts):
            self.link.send(len(part))
            self.manager.upload_head(
                info.session_id, info.token, part, i == len(parts) - 1, first=i == 0
            )

    def send(self, msg: StepBegin | ActivationChunk) -> None:
        if self._error is not None:
            raise self._error
        self._out.put(msg)

    def _pump(self) -> None:
        info = self._session()
        while (msg := self._out.get()) is not _STOP:
            if self._error is not None:
                continue  # drain: the server already refused this stream
            self.link.send(message_nbytes(msg))
            try:
                if isinstance(msg, StepBegin):
                    self.manager.begin_step(info.session_id, info.token, msg)
                    continue
                ack = self.manager.add_chunk(info.session_id, info.token, msg)
            except RemoteError as e:
                self._error = e
                self._acks.put(e)
                continue
            if ack is not None:
                self._acks.put((time.perf_counter() + self.link.ack_delay(), ack))

    def next_ack(self, timeout: float | None = None) -> Ack:
        item = self._acks.get(timeout=timeout)
        if isinstance(item, RemoteError):
            raise item
        visible_at, ack = item
        if (wait := visible_at - time.perf_counter()) > 0:
            time.sleep(wait)
        return ack

    def finish(self) -> Iterator[EpochReport]:
        info = self._session()
        yield from self.manager.finish(info.session_id, info.token)

    def download(self) -> SideBlob:
        info = self._session()
        return self.manager.download(info.session_id, info.token)

    def close(self) -> dict[str, Any]:
        info = self._session()
        if self._thread is not None:
            self._out.put(_STOP)
            self._thread.join()
            self._thread = None
        return self.manager.close(info.session_id, info.token)
