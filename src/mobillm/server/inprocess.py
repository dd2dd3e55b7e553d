"""In-process transport: the server's session manager in a thread of the device's process.

It shares the network client's sending and acks (``QueuedSender``: a bounded send queue drained
by a sender thread, acks coming back asynchronously, the same errors), so the device runtime
cannot tell them apart.
Tests and single-machine experiments use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mobillm.server.sessions import SessionManager
from mobillm.transport.link import Link, LinkConfig
from mobillm.transport.messages import (
    ActivationChunk,
    EpochReport,
    Gradient,
    HeadBytes,
    Reply,
    ResumeState,
    SessionInfo,
    SessionSpec,
    SideBlob,
    StepBegin,
)
from mobillm.transport.sender import QueuedSender
from mobillm.transport.serde import head_parts


def message_nbytes(msg: StepBegin | ActivationChunk | Gradient) -> int:
    """Payload bytes a message puts on the link (labels and row layout, codec bytes, or a
    private-label gradient)."""
    if isinstance(msg, ActivationChunk):
        return len(msg.data) + 24
    if isinstance(msg, Gradient):
        return 32 + (0 if msg.grad is None else 4 * msg.grad.numel())
    n = 16 + msg.rows_per_sample.numel() * 4 + msg.pool_rows.numel() * 8
    for t in (msg.labels, msg.targets):
        n += t.numel() * 8 if t is not None else 0
    return n + (msg.loss_mask.numel() if msg.loss_mask is not None else 0)


class InProcessTransport(QueuedSender):
    """A ``Transport`` that calls a ``SessionManager`` directly from the sender thread."""

    def __init__(
        self,
        manager: SessionManager,
        link: LinkConfig | None = None,
        queue_size: int = 256,
        ack_timeout: float = 600.0,
    ) -> None:
        super().__init__(Link(link), queue_size, ack_timeout)
        self.manager = manager
        self.info: SessionInfo | None = None

    @property
    def bytes_sent(self) -> int:
        return self.link.bytes_sent

    def _session(self) -> SessionInfo:
        if self.info is None:
            raise RuntimeError("open a session first")
        return self.info

    def open(self, spec: SessionSpec) -> SessionInfo:
        return self.attach(self.manager.open(spec))

    def attach(self, info: SessionInfo) -> SessionInfo:
        self.info = info
        self._start_sender()
        return info

    def resume(self) -> ResumeState:
        info = self._session()
        self._restart_sender()
        return self.manager.resume(info.session_id, info.token)

    def upload_head(self, data: HeadBytes) -> None:
        info = self._session()
        for part in head_parts(info.session_id, data, info.max_chunk_bytes):
            self.link.send(len(part.data))
            self.manager.upload_head(
                info.session_id, info.token, part.data, part.last, first=part.seq == 0
            )

    def _deliver(self, msg: StepBegin | ActivationChunk | Gradient) -> list[Reply]:
        info = self._session()
        self.link.send(message_nbytes(msg))
        if isinstance(msg, StepBegin):
            return self.manager.begin_step(info.session_id, info.token, msg)
        if isinstance(msg, Gradient):
            return self.manager.add_gradient(info.session_id, info.token, msg)
        return self.manager.add_chunk(info.session_id, info.token, msg)

    def finish(self) -> Iterator[EpochReport]:
        info = self._session()
        yield from self.manager.finish(info.session_id, info.token)

    def download(self) -> SideBlob:
        info = self._session()
        return self.manager.download(info.session_id, info.token)

    def close(self) -> dict[str, Any]:
        info = self._session()
        self._stop_sender()
        return self.manager.close(info.session_id, info.token)
