"""Link emulation on the device's sender: a rate limit and a round-trip delay on loopback."""

from __future__ import annotations

import dataclasses
import threading
import time

from mobillm.config import Config, check


@dataclasses.dataclass(frozen=True)
class LinkConfig(Config):
    """``mbps``: upload rate in Mbit/s (0 = unthrottled); ``rtt_ms``: round-trip time added."""

    mbps: float = 0.0
    rtt_ms: float = 0.0

    def validate(self) -> None:
        check(self.mbps >= 0, f"LinkConfig.mbps must be >= 0, got {self.mbps}")
        check(self.rtt_ms >= 0, f"LinkConfig.rtt_ms must be >= 0, got {self.rtt_ms}")

    @property
    def active(self) -> bool:
        return self.mbps > 0 or self.rtt_ms > 0


class Link:
    """Paces bytes like a serial link of ``mbps`` and delays acks by ``rtt_ms``.

    ``send(n)`` blocks until ``n`` bytes would have left the device's radio; it is called by
    the transport's sender thread only, so the device's forward pass keeps running meanwhile.
    """

    def __init__(self, cfg: LinkConfig | None = None) -> None:
        self.cfg = cfg or LinkConfig()
        self._free_at = 0.0
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.busy_seconds = 0.0

    def send(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent += nbytes
            if self.cfg.mbps <= 0:
                return
            now = time.perf_counter()
            duration = nbytes * 8 / (self.cfg.mbps * 1e6)
            self._free_at = max(self._free_at, now) + duration
            self.busy_seconds += duration
            wait = self._free_at - now
        if wait > 0:
            time.sleep(wait)

    def ack_delay(self) -> float:
        """Seconds an ack takes to come back beyond the server's own time."""
        return self.cfg.rtt_ms / 1000.0
