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
from mobillm.server.sessions import ServerConfig
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
    p.add_argument(
        "--config",
        default="",
        metavar="FILE",
        help="a ServerConfig as JSON (what mobillm.ServerProcess writes); flags given win",
    )
    p.add_argument(
        "--workdir", default=None, help="logs and checkpoints go here (default: runs/server)"
    )
    p.add_argument(
        "--device", default=None, help="where side networks train: cpu, cuda, cuda:N (default: cpu)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    g = p.add_argument_group("who may open sessions (one is required)")
    g.add_argument(
        "--api-keys",
        default=None,
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
    g.add_argument(
        "--max-sessions", type=int, default=None, help="concurrent sessions (default: 16)"
    )
    g.add_argument(
        "--max-sessions-per-client",
        type=int,
        default=None,
        help="concurrent sessions of one credential (default: 4)",
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
        default=None,
        help="a session nobody calls for this long is checkpointed and evicted (default: 900)",
    )
    g.add_argument(
        "--retention-h",
        type=float,
        default=None,
        help="ended sessions' folders are deleted after this many hours (default: 168)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="checkpoint each session every N steps (0 = only around Finish, on eviction and "
        f"at stop; default: {ServerConfig.checkpoint_every})",
    )
    g.add_argument(
        "--max-chunk-bytes",
        type=int,
        default=None,
        help=f"largest chunk a device may send, 4 KiB..4 MiB (default: {DEFAULT_CHUNK_BYTES})",
    )
    g.add_argument(
        "--allow-backbone",
        action="append",
        default=None,
        metavar="SHA256",
        help="accept only backbones with this config sha256 (repeatable; default: any)",
    )
    g.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="train up to this many sessions' ready steps together in one stacked round, when "
        "their side networks have the same shape (1 = each session on its own; default: "
        f"{BatchConfig.max_batch})",
    )
    g.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on CUDA, float32 matmuls on TF32 tensor cores: faster, 10-bit mantissa inputs "
        "(default: on; no effect on CPU)",
    )
    g.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help=f"how long a round waits for more sessions' steps (default: {BatchConfig.wait_ms})",
    )
    g.add_argument(
        "--batch-round-mb",
        type=int,
        default=None,
        help="memory one batched round may take, as estimated from its steps; fewer sessions "
        f"train per round when theirs is larger (0 = no bound; default: "
        f"{BatchConfig.round_bytes >> 20})",
    )
    g.add_argument(
        "--cache-mb",
        type=int,
        default=None,
        help="the part of each session's activation cache also kept in memory, MB "
        f"(default: {CacheConfig.memory_bytes >> 20})",
    )
    g.add_argument(
        "--cache-disk-mb",
        type=int,
        default=None,
        help="each session's activation cache in the workdir (every step), MB; 0 and "
        "--cache-mb 0: no cache, devices must re-stream every epoch (default: "
        f"{CacheConfig.disk_bytes >> 20})",
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


# flag -> (ServerConfig field, how the flag's value becomes the field's)
_CONFIG_FLAGS: dict[str, tuple[str, Any]] = {
    "device": ("device", str),
    "workdir": ("workdir", str),
    "max_sessions": ("max_sessions", int),
    "max_sessions_per_client": ("max_sessions_per_client", int),
    "max_side_mb": ("max_side_bytes", lambda mb: mb << 20),
    "max_step_mb": ("max_step_bytes", lambda mb: mb << 20),
    "lease_s": ("lease_seconds", float),
    "retention_h": ("retention_seconds", lambda h: h * 3600),
    "checkpoint_every": ("checkpoint_every", int),
    "api_keys": ("api_keys_file", str),
    "max_chunk_bytes": ("max_chunk_bytes", int),
    "allow_backbone": ("allowed_backbones", tuple),
    "cache_mb": ("cache_memory_bytes", lambda mb: mb << 20),
    "cache_disk_mb": ("cache_disk_bytes", lambda mb: mb << 20),
    "max_batch": ("max_batch", int),
    "batch_wait_ms": ("batch_wait_ms", float),
    "batch_round_mb": ("batch_round_bytes", lambda mb: mb << 20),
    "tf32": ("tf32", bool),
}


def server_config(args: argparse.Namespace) -> ServerConfig:
    """``--config FILE`` (a ``ServerConfig`` as JSON) or the defaults, then the flags given."""
    base = ServerConfig.load(args.config) if args.config else ServerConfig()
    changes = {
        field: convert(getattr(args, flag))
        for flag, (field, convert) in _CONFIG_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if args.open:
        changes["open_access"] = True
    return base.replace(**changes)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    common.setup(args)
    from mobillm.api.server import Server
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
    cfg = server_config(args)
    for sha in cfg.allowed_backbones:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ConfigError(f"--allow-backbone takes a config sha256 hex digest, got {sha!r}")

    def ready(server: Server) -> None:
        if args.port_file:
            Path(args.port_file).write_text(f"{server.port}\n")
        print(f"serving on {server.address} ({server.mode})", file=sys.stderr, flush=True)
        if server.metrics_port is not None:
            print(f"metrics on http://{args.host}:{server.metrics_port}/metrics", file=sys.stderr)

    server = Server(
        cfg, host=args.host, port=args.port, tls=tls, insecure=args.insecure,
        metrics_port=args.metrics_port,
    )  # fmt: skip
    server.serve_forever(on_ready=ready)
    common.say("[serve] stopped")
    return None
