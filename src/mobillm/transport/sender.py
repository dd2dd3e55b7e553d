"""Sending and acks: the one implementation every transport's training stream runs on.

``send`` only enqueues (a bounded queue: when it is full the device's forward pass waits, which
is the backpressure); a sender thread drains the queue through the transport's ``_deliver``.
Acks become visible ``link.ack_delay()`` seconds after they arrive (the emulated round trip).
The first failure anywhere (a refusal, a dead stream, a crashed sender, a server silent for
``ack_timeout`` seconds) becomes the one ``RemoteError`` that every later ``send`` and
``next_ack`` raises, after the acks that arrived before it. ``_restart_sender`` starts afresh
after a failure (a reconnect); acks and failures of the stream before it are ignored.

A private-label session answers the server's ``Features`` through a responder (the device's
``LabelHead``): called as they arrive, in stream order with the acks, and its ``Gradient``
goes out ahead of the steps queued meanwhile, so the server is not left waiting behind the
device's next forward passes.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from typing import Protocol

from mobillm.transport.link import Link
from mobillm.transport.messages import (
    Ack,
    ActivationChunk,
    Features,
    Gradient,
    RemoteError,
    Reply,
    StepBegin,
)

_STOP = object()
_WAKE = object()  # a gradient is waiting: the sender must not sleep on an empty queue

Outgoing = StepBegin | ActivationChunk | Gradient


class Responder(Protocol):
    """The device's side of a private-label session (``device.labels.LabelHead``)."""

    def features(self, msg: Features) -> Gradient: ...

    def acked_step(self, ack: Ack) -> None: ...


class QueuedSender:
    """Base of the device-side transports: the send queue, the sender thread and the acks.

    Subclasses implement ``_deliver(msg)`` (hand one message to the server; return the
    replies if the server answered at once, else none and call ``_ack`` with each later) and
    may override ``_end_stream(failed)``, run by the sender thread once the queue is closed.
    """

    def __init__(self, link: Link, queue_size: int = 256, ack_timeout: float = 600.0) -> None:
        self.link = link
        self.ack_timeout = ack_timeout
        self._out: queue.Queue = queue.Queue(maxsize=queue_size)
        self._acks: queue.Queue = queue.Queue()
        self._error: RemoteError | None = None
        self._fail_lock = threading.Lock()
        self._sender: threading.Thread | None = None
        self._gen = 0  # which stream acks and failures belong to
        # gradients to send ahead of queued steps, each with the stream it answers
        self._urgent: collections.deque[tuple[int, Gradient]] = collections.deque()
        self._responder: Responder | None = None

    def set_responder(self, responder: Responder | None) -> None:
        """Answer private-label ``Features`` with ``responder`` (None: a standard session)."""
        self._responder = responder

    # --- to implement -----------------------------------------------------------------------
    def _deliver(self, msg: Outgoing) -> list[Reply]:
        raise NotImplementedError

    def _end_stream(self, failed: bool) -> None:
        """The queue is closed and drained; ``failed`` if the stream ended in an error."""

    # --- the sender -------------------------------------------------------------------------
    def _start_sender(self) -> None:
        self._sender = threading.Thread(target=self._pump, name="mobillm-sender", daemon=True)
        self._sender.start()

    def _restart_sender(self) -> None:
        """After a failure: drop what was queued, forget the error, start a new sender."""
        self._fail(RemoteError("CANCELLED", "restarting the stream"))
        self._stop_sender()
        with self._fail_lock:
            self._gen += 1
            self._out = queue.Queue(maxsize=self._out.maxsize)
            self._acks = queue.Queue()
            self._urgent.clear()
            self._error = None
        self._start_sender()

    def _stop_sender(self) -> None:
        """Close the queue after everything queued so far and wait for the sender to end."""
        if self._sender is not None:
            self._out.put(_STOP)
            self._sender.join()
            self._sender = None

    def send(self, msg: Outgoing) -> None:
        """Queue ``msg`` for the sender thread; blocks while the queue is full."""
        if self._error is not None:
            raise self._error
        self._out.put(msg)

    def _next(self) -> object:
        while True:
            try:
                gen, grad = self._urgent.popleft()
            except IndexError:
                return self._out.get()
            if gen == self._gen:  # a gradient for a stream since replaced answers nothing
                return grad

    def _pump(self) -> None:
        while (msg := self._next()) is not _STOP:
            if msg is _WAKE or self._error is not None:
                continue  # drain: the stream already failed; send() reports it
            try:
                replies = self._deliver(msg)  # type: ignore[arg-type]
            except RemoteError as e:
                self._fail(e)
                continue
            except Exception as e:  # never die silently: send() would block on a full queue
                self._fail(RemoteError("INTERNAL", f"sender failed: {type(e).__name__}: {e}"))
                continue
            for reply in replies:
                self._ack(reply)
        self._end_stream(self._error is not None)

    # --- acks and failures ------------------------------------------------------------------
    def _ack(self, reply: Reply, gen: int | None = None) -> None:
        """One reply of the server's, in stream order: an ack becomes visible to ``next_ack``
        (after the emulated delay); Features are answered by the responder at once."""
        with self._fail_lock:
            current = self._gen
            if gen is not None and gen != current:
                return
        responder = self._responder
        try:
            if isinstance(reply, Features):
                if responder is None:
                    raise RemoteError("INTERNAL", "Features in a session without private labels")
                grad = responder.features(reply)
                with self._fail_lock:
                    if current != self._gen:
                        return  # the stream was replaced meanwhile (a reconnect)
                    self._urgent.append((current, grad))
                # a full queue means a busy sender, which looks at _urgent before its next item
                with contextlib.suppress(queue.Full):
                    self._out.put_nowait(_WAKE)
                return
            if responder is not None:
                with self._fail_lock:  # never applied after a reconnect reset the responder
                    if current != self._gen:
                        return
                    responder.acked_step(reply)
        except RemoteError as e:
            self._fail(e, gen)
            return
        except Exception as e:  # a bug on the device must end the run, not hang it
            self._fail(RemoteError("INTERNAL", f"{type(e).__name__}: {e}"), gen)
            return
        with self._fail_lock:
            if gen is None or gen == self._gen:
                self._acks.put((time.perf_counter() + self.link.ack_delay(), reply))

    def _fail(self, err: RemoteError, gen: int | None = None) -> None:
        with self._fail_lock:
            if gen is not None and gen != self._gen:
                return
            if self._error is None:
                self._error = err
                self._acks.put(err)

    def next_ack(self, timeout: float | None = None) -> Ack:
        """The next step's ack; raises the stream's RemoteError once the acks before it are read,
        or DEADLINE_EXCEEDED after ``timeout`` (default ``ack_timeout``) seconds of silence."""
        wait = self.ack_timeout if timeout is None else timeout
        try:
            item = self._acks.get(timeout=wait)
        except queue.Empty:
            self._fail(
                RemoteError(
                    "DEADLINE_EXCEEDED",
                    f"no answer from the server for {wait:.0f} s (overloaded or stuck?); "
                    "the run stops here",
                )
            )
            item = self._acks.get()
        if isinstance(item, RemoteError):
            self._acks.put(item)  # stays the answer to every later call
            raise item
        visible_at, ack = item
        if (delay := visible_at - time.perf_counter()) > 0:
            time.sleep(delay)
        return ack
