"""``mobillm serve`` as a child process on loopback, for benchmarks, the demo and the harness."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mobillm.errors import MobiLLMError


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
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "mobillm.cli.main", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--port-file", str(port_file), "--workdir", str(workdir),
        "--threads", str(threads), *flags,
    ]  # fmt: skip
    if "--api-keys" not in flags:
        cmd.append("--open")
    log = log or workdir / "stderr.log"
    with log.open("a") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
    if cores:
        os.sched_setaffinity(proc.pid, cores)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise MobiLLMError(f"the server exited with code {proc.returncode}; see {log}")
        if port_file.is_file() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        time.sleep(0.1)
    proc.kill()
    raise MobiLLMError(f"the server did not start in 120 s; see {log}")
