"""``mobillm.Server``: the edge server, in a thread, an asyncio task or its own process.

In a background thread (a notebook, a test, an app that also does other things)::

    with mobillm.Server(mobillm.ServerConfig(open_access=True), port=50051) as server:
        device.train(data, server=server)

On the caller's event loop: ``await server.start_async()`` ... ``await server.stop_async()``,
or ``await server.serve_async()`` until cancelled. In its own process:
``mobillm.ServerProcess(config)``, the same server as ``mobillm serve``. In the foreground
until Ctrl-C or SIGTERM: ``server.serve_forever()``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from mobillm.errors import MobiLLMError
from mobillm.server.grpc_server import GrpcServer
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.transport.tls import TlsServerConfig


class Server:
    """A gRPC server that trains side networks for devices (what ``mobillm serve`` runs).

    ``config`` sets limits, credentials and where state goes; ``host``/``port`` where it
    listens (port 0 = any free one; ``port`` then tells which). A non-loopback host needs
    ``tls`` or ``insecure=True``. ``metrics_port`` serves Prometheus metrics (0 = any port).
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsServerConfig | None = None,
        insecure: bool = False,
        metrics_port: int | None = None,
    ) -> None:
        self._grpc = GrpcServer(
            config or ServerConfig(), host, port, tls, insecure, metrics_port=metrics_port
        )

    @property
    def config(self) -> ServerConfig:
        """Its limits and policy."""
        return self._grpc.cfg

    @property
    def manager(self) -> SessionManager:
        """The sessions it holds (what the gRPC servicer calls)."""
        return self._grpc.manager

    @property
    def port(self) -> int:
        """The port it listens on (the bound one once started, when asked for 0)."""
        return self._grpc.port

    @property
    def address(self) -> str:
        """``host:port`` to give a device (the bound port once started)."""
        return self._grpc.address

    @property
    def mode(self) -> str:
        """ "insecure" (plaintext), "tls" or "mutual tls"."""
        return self._grpc.mode

    @property
    def metrics_port(self) -> int | None:
        """Where Prometheus metrics are served (None = off)."""
        return self._grpc.metrics_port

    def start(self) -> str:
        """Serve from a background thread; returns the address once it listens."""
        self._grpc.start()
        return self.address

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving; running calls get ``grace`` seconds and every session is kept."""
        self._grpc.stop(grace)

    async def start_async(self) -> str:
        """Serve on the running event loop; returns the address once it listens."""
        await self._grpc.start_async()
        return self.address

    async def stop_async(self, grace: float = 2.0) -> None:
        """Stop a server started with ``start_async`` (sessions are kept, as by ``stop``)."""
        await self._grpc.stop_async(grace)

    async def serve_async(self) -> None:
        """Serve on the running event loop until this task is cancelled, then stop."""
        await self.start_async()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop_async()

    def serve_forever(
        self, grace: float = 5.0, on_ready: Callable[[Server], None] | None = None
    ) -> None:
        """Serve in the foreground until SIGINT or SIGTERM, then stop gracefully (every
        session is kept for a restart). ``on_ready`` runs once the server listens."""

        async def main() -> None:
            await self.start_async()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                if on_ready is not None:
                    on_ready(self)
                await stop.wait()
            finally:
                await self.stop_async(grace)

        asyncio.run(main())

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ServerProcess:
    """``mobillm serve`` as a child process on ``host`` (loopback by default).

    ``config`` travels as a JSON file (``mobillm serve --config``); ``args`` are extra
    ``mobillm serve`` flags (TLS files, ``--metrics-port``...). Without credentials in
    ``config`` or ``args`` it serves anyone on loopback (``--open``). The constructor returns
    once the server listens; ``stop()`` (or leaving a ``with`` block) ends it gracefully.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *args: str,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int = 1,
        cores: set[int] | None = None,
        log: str | Path | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.config = config or ServerConfig()
        workdir = Path(self.config.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        port_file = workdir / "port"
        port_file.unlink(missing_ok=True)
        fd, cfg_path = tempfile.mkstemp(prefix="server-config-", suffix=".json", dir=workdir)
        os.close(fd)
        Path(cfg_path).write_text(self.config.to_json())
        cmd = [
            sys.executable, "-m", "mobillm.cli.main", "serve", "--config", cfg_path,
            "--host", host, "--port", str(port), "--port-file", str(port_file),
            "--threads", str(threads), *args,
        ]  # fmt: skip
        has_credential = self.config.open_access or self.config.api_keys_file
        if not has_credential and "--api-keys" not in args and "--tls-client-ca" not in args:
            cmd.append("--open")
        self.log = Path(log) if log else workdir / "stderr.log"
        self.host = host
        with self.log.open("a") as err:
            self.proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
        if cores:
            os.sched_setaffinity(self.proc.pid, cores)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise MobiLLMError(
                    f"the server exited with code {self.proc.returncode}; see {self.log}"
                )
            if port_file.is_file() and port_file.read_text().strip():
                self.port = int(port_file.read_text())
                Path(cfg_path).unlink(missing_ok=True)
                return
            time.sleep(0.1)
        self.proc.kill()
        raise MobiLLMError(f"the server did not start in {timeout:.0f} s; see {self.log}")

    @property
    def address(self) -> str:
        """``host:port`` to give a device."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful stop that keeps every session), then SIGKILL after
        ``timeout`` seconds; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
