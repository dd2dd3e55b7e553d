"""The device's view of a transport: one interface for the in-process and the gRPC client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from mobillm.transport.messages import (
    Ack,
    ActivationChunk,
    EpochReport,
    Gradient,
    HeadBytes,
    ResumeState,
    SessionInfo,
    SessionSpec,
    SideBlob,
    StepBegin,
)
from mobillm.transport.sender import Responder


class Transport(Protocol):
    """A device-side session client.

    ``send`` queues a message for the sender thread and returns at once unless the queue is
    full (back-pressure); ``next_ack`` blocks for the next step's ack and raises ``RemoteError``
    if the server refused anything sent before it.
    """

    bytes_sent: int

    def open(self, spec: SessionSpec) -> SessionInfo: ...

    def attach(self, info: SessionInfo) -> SessionInfo:
        """Use a session opened before (by a run that crashed)."""
        ...

    def resume(self) -> ResumeState:
        """After a failure: start the stream afresh and learn where the server's session
        stands; RemoteError (UNAVAILABLE while unreachable) if it cannot say."""
        ...

    def upload_head(self, data: HeadBytes) -> None:
        """Send the frozen head, a blob or its pieces (``HeadBytes``), in the server's
        ``max_chunk_bytes`` chunks, each made only when the one before it is sent."""
        ...

    def send(self, msg: StepBegin | ActivationChunk | Gradient) -> None: ...

    def set_responder(self, responder: Responder | None) -> None:
        """Private labels: answer the server's Features with ``responder``'s gradients."""
        ...

    def next_ack(self, timeout: float | None = None) -> Ack: ...

    def finish(self) -> Iterator[EpochReport]:
        """After the last step's ack: the server's remaining epochs, one report each."""
        ...

    def download(self) -> SideBlob: ...

    def close(self) -> dict[str, Any]: ...
