"""``mobillm serve``: the edge server that trains side networks for devices over gRPC."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mobillm.cli import common
from mobillm.errors import ConfigError
from mobillm.server.batching import BatchConfig
from mobillm.server.cache import CacheConfig
from mobillm.transport.messages import DEFAULT_CHUNK_BYTES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the server that trains side networks for devices (gRPC)",
        description=__doc__,
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="0 = any free port (default: 50051)")
    p.add_argument("--port-file", default="", help="write the bound port to this file once ready")
    p.add_argument("--workdir", default="runs/server", help="logs and checkpoints go here")
    p.add_argument("--device", default="cpu", help="where side networks train: cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    g = p.add_argument_group("who may open sessions (one is required)")
    g.add_argument(
        "--api-keys",
        default="",
        metavar="FILE",
        help="accept the API keys whose salted hashes FILE holds (see --add-api-key)",
    )
    g.add_argument(
        "--open",
        action="store_true",
        help="anyone may open sessions: loopback only, for one machine's own use",
    )
    g.add_argument(
        "--add-api-key",
        default="",
        metavar="NAME",
        help="append a new key for NAME to the --api-keys file, print it once, and exit",
    )
    g = p.add_argument_group("limits and policy")
    g.add_argument("--max-sessions", type=int, default=16, help="concurrent sessions (default: 16)")
    g.add_argument(
        "--max-sessions-per-client",
        type=int,
        default=4,
        help="concurrent sessions of one credential (default: %(default)s)",
    )
    g.add_argument(
        "--max-side-mb",
        type=int,
        default=None,
        help="largest side network a session may ask for, with its optimizer state (default: 4096)",
    )
    g.add_argument(
        "--max-step-mb",
        type=int,
        default=None,
        help="largest step a session may send, as its activations would take in memory "
        "(default: 4096)",
    )
    g.add_argument(
        "--lease-s",
        type=float,
        default=900.0,
        help="a session nobody calls for this long is checkpointed and evicted "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--retention-h",
        type=float,
        default=168.0,
        help="ended sessions' folders are deleted after this many hours (default: %(default)s)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="checkpoint each session every N steps (default: 0 = at close only)",
    )
    g.add_argument(
        "--max-chunk-bytes",
        type=int,
        default=DEFAULT_CHUNK_BYTES,
        help="largest chunk a device may send, 4 KiB..4 MiB (default: %(default)s)",
    )
    g.add_argument(
        "--allow-backbone",
        action="append",
        default=[],
        metavar="SHA256",
        help="accept only backbones with this config sha256 (repeatable; default: any)",
    )
    g.add_argument(
        "--max-batch",
        type=int,
        default=BatchConfig.max_batch,
        help="train up to this many sessions' ready steps together in one stacked round, when "
        "their side networks have the same shape (1 = each session on its own; default: "
        "%(default)s)",
    )
    g.add_argument(
        "--batch-wait-ms",
        type=float,
        default=BatchConfig.wait_ms,
        help="how long a round waits for more sessions' steps (default: %(default)s)",
    )
    g.add_argument(
        "--batch-round-mb",
        type=int,
        default=BatchConfig.round_bytes >> 20,
        help="memory one batched round may take, as estimated from its steps; fewer sessions "
        "train per round when theirs is larger (0 = no bound; default: %(default)s)",
    )
    g.add_argument(
        "--cache-mb",
        type=int,
        default=CacheConfig.memory_bytes >> 20,
        help="the part of each session's activation cache also kept in memory, MB "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--cache-disk-mb",
        type=int,
        default=CacheConfig.disk_bytes >> 20,
        help="each session's activation cache in the workdir (every step), MB; 0 and "
        "--cache-mb 0: no cache, devices must re-stream every epoch (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = any free port; "
        "default: off)",
    )
    g = p.add_argument_group("TLS")
    g.add_argument("--tls-cert", default="", help="server certificate chain (PEM)")
    g.add_argument("--tls-key", default="", help="server private key (PEM)")
    g.add_argument("--tls-client-ca", default="", help="require client certs signed by this CA")
    g.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback address (tokens and activations in the clear)",
    )
    g.add_argument(
        "--make-certs",
        default="",
        metavar="DIR",
        help="write a CA, a server cert and a client cert to DIR, then exit",
    )
    g.add_argument(
        "--cert-host",
        action="append",
        default=[],
        metavar="HOST",
        help="with --make-certs: extra name or IP for the server cert (repeatable)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    common.setup(args)
    from mobillm.server.grpc_server import GrpcServer, serve
    from mobillm.server.sessions import ServerConfig
    from mobillm.transport.tls import TlsServerConfig, make_certs

    if args.add_api_key:
        from mobillm.server.auth import add_key

        if not args.api_keys:
            raise ConfigError("--add-api-key needs --api-keys FILE to append to")
        key = add_key(args.api_keys, args.add_api_key)
        common.say(
            f"[serve] key for {args.add_api_key} added to {args.api_keys}; give it to the device "
            "(only its hash is stored: this is the one time it is shown)"
        )
        return {"api_keys": args.api_keys, "name": args.add_api_key, "key": key}
    if args.make_certs:
        hosts = ("localhost", "127.0.0.1", *args.cert_host)
        files = make_certs(args.make_certs, hosts=hosts)
        common.say(
            f"[serve] certificates in {args.make_certs}: serve with --tls-cert {files['cert']} "
            f"--tls-key {files['key']} [--tls-client-ca {files['ca']}]; train with --tls-ca "
            f"{files['ca']} [--tls-cert {files['client_cert']} --tls-key {files['client_key']}]"
        )
        return {"certs": files}
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        tls = TlsServerConfig(args.tls_cert, args.tls_key, args.tls_client_ca)
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    cfg = ServerConfig(
        device=args.device,
        max_sessions=args.max_sessions,
        max_sessions_per_client=args.max_sessions_per_client,
        **{
            f"max_{name}_bytes": mb << 20
            for name, mb in (("side", args.max_side_mb), ("step", args.max_step_mb))
            if mb is not None
        },
        lease_seconds=args.lease_s,
        retention_seconds=args.retention_h * 3600,
        checkpoint_every=args.checkpoint_every,
        api_keys_file=args.api_keys,
        open_access=args.open,
        max_chunk_bytes=args.max_chunk_bytes,
        allowed_backbones=tuple(args.allow_backbone),
        workdir=args.workdir,
        cache_memory_bytes=args.cache_mb << 20,
        cache_disk_bytes=args.cache_disk_mb << 20,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        batch_round_bytes=args.batch_round_mb << 20,
    )
    for sha in cfg.allowed_backbones:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ConfigError(f"--allow-backbone takes a config sha256 hex digest, got {sha!r}")

    def ready(server: GrpcServer) -> None:
        if args.port_file:
            Path(args.port_file).write_text(f"{server.port}\n")
        print(f"serving on {server.address} ({server.mode})", file=sys.stderr, flush=True)
        if server.metrics is not None:
            print(
                f"metrics on http://{server.host}:{server.metrics_port}/metrics",
                file=sys.stderr,
                flush=True,
            )

    serve(
        cfg,
        args.host,
        args.port,
        tls=tls,
        insecure=args.insecure,
        on_ready=ready,
        metrics_port=args.metrics_port,
    )
    common.say("[serve] stopped")
    return None
