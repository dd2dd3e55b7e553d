"""The server's metrics in the Prometheus text format (``prometheus_client``), over HTTP.

Whole-server series: sessions open, steps and bytes received (counters; ``rate()`` gives
steps/s), a sliding steps/s gauge for dashboards without PromQL, the batcher's queue depth and
round sizes, and the ack latency (StepBegin received to ack sent) as a histogram. Per-session
series (steps, bytes, last ack latency) carry a ``session`` label; they are dropped when the
session closes or is parked, so their number stays bounded by the live sessions.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RATE_WINDOW_S = 60.0
# ack latency buckets: a GPU round takes milliseconds, a CPU step on a big shape seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """Counters and gauges the servicer updates; ``serve`` exposes them on ``/metrics``."""

    def __init__(
        self,
        sessions_open: Callable[[], int],
        queue_depth: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("mobillm_sessions_open", "Sessions held in memory", registry=r).set_function(
            sessions_open
        )
        Gauge(
            "mobillm_batch_queue_depth", "Steps waiting for a batched round", registry=r
        ).set_function(queue_depth)
        self.steps = Counter("mobillm_steps", "Training and validation steps acked", registry=r)
        self.bytes = Counter("mobillm_received_bytes", "Train stream bytes received", registry=r)
        self.latency = Histogram(
            "mobillm_ack_latency_seconds",
            "StepBegin received to ack sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "mobillm_batch_size",
            "Sessions trained together in the round of an acked step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
            registry=r,
        )
        Gauge(
            "mobillm_steps_per_second",
            f"Steps acked per second over {RATE_WINDOW_S:.0f} s",
            registry=r,
        ).set_function(self._rate)
        self.session_steps = Counter(
            "mobillm_session_steps", "Steps acked, per session", ["session"], registry=r
        )
        self.session_bytes = Counter(
            "mobillm_session_received_bytes",
            "Bytes received, per session",
            ["session"],
            registry=r,
        )
        self.session_latency = Gauge(
            "mobillm_session_last_ack_latency_seconds",
            "Latency of the session's last ack",
            ["session"],
            registry=r,
        )
        self._lock = threading.Lock()
        self._recent: collections.deque[float] = collections.deque()
        self._sessions: set[str] = set()

    def step(self, session: str, nbytes: int, latency_s: float, batch: int = 1) -> None:
        """One acked step of ``session``: ``nbytes`` received for it, acked ``latency_s`` after
        its StepBegin, trained in a round of ``batch`` sessions."""
        self.steps.inc()
        self.bytes.inc(nbytes)
        self.latency.observe(latency_s)
        self.batch.observe(batch)
        self.session_steps.labels(session).inc()
        self.session_bytes.labels(session).inc(nbytes)
        self.session_latency.labels(session).set(latency_s)
        now = time.monotonic()
        with self._lock:
            self._sessions.add(session)
            self._recent.append(now)
            self._prune(now)

    def forget(self, session: str) -> None:
        """Drop a session's labelled series (it closed or was parked)."""
        with self._lock:
            if session not in self._sessions:
                return
            self._sessions.discard(session)
        for m in (self.session_steps, self.session_bytes, self.session_latency):
            with contextlib.suppress(KeyError):  # the session never acked a step
                m.remove(session)

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            return len(self._recent) / RATE_WINDOW_S

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose ``/metrics`` over HTTP on ``port`` (0 = any free port); returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
