"""``mobillm serve`` as a child process on loopback, for benchmarks, the demo and the harness."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mobillm.api.server import ServerProcess
from mobillm.server.sessions import ServerConfig


def split_cores() -> tuple[set[int], set[int]]:
    """(device cores, server cores): the server stands in for another machine, so on a box of
    several cores it gets one of its own and the device keeps the rest."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return set(cores), set(cores)
    return set(cores[:-1]), {cores[-1]}


def start_server(
    workdir: Path,
    *flags: str,
    port: int = 0,
    threads: int = 1,
    cores: set[int] | None = None,
    log: Path | None = None,
) -> tuple[subprocess.Popen, int]:
    """A `mobillm serve` child on ``port`` (0 = any free one); returns it and its port once it
    listens. Without ``--api-keys`` among ``flags`` it serves anyone on loopback (``--open``)."""
    server = ServerProcess(
        ServerConfig(workdir=str(workdir)), *flags, port=port, threads=threads, cores=cores, log=log
    )
    return server.proc, server.port
