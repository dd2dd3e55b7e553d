"""``mobillm bench faults``: a server and devices as real processes on loopback, attacked, cut
off and killed. Every interrupted run must end, bit for bit, as the uninterrupted one.

Devices train a tiny random Llama (``mobillm.bench.tinymodel``) through ``mobillm train``, with
an emulated round trip so each run lasts long enough to be interrupted. Scenarios:

* ``fuzz``: mutated and random messages beside a legitimate device run (``mobillm.bench.fuzz``);
* ``disconnects``: a TCP proxy between device and server cuts every connection at random;
* ``server_kills``: the server is killed with SIGKILL mid-run and started again;
* ``device_kills``: the device is killed with SIGKILL and continued with ``--resume``;
* ``soak``: many devices training in turn against one server, its memory sampled;
* ``attacks``: the review's attacks replayed (``mobillm.bench.attacks``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mobillm.bench.serverproc import start_server
from mobillm.bench.tinymodel import TASK_FLAGS, write_task, write_tiny_model
from mobillm.config import Config, check
from mobillm.server.auth import add_key

CLI = [sys.executable, "-m", "mobillm.cli.main"]


@dataclasses.dataclass(frozen=True)
class FaultsConfig(Config):
    """Sizes of each scenario (0 skips it) and of the device runs."""

    fuzz_messages: int = 100_000
    disconnects: int = 20
    server_kills: int = 5
    device_kills: int = 1
    soak_devices: int = 16
    soak_seconds: float = 900.0
    attacks: bool = True
    attack_lease_seconds: float = 20.0
    samples: int = 640
    rtt_ms: float = 100.0
    seed: int = 0
    out: str = "results/faults"

    def validate(self) -> None:
        for name in ("fuzz_messages", "disconnects", "server_kills", "device_kills"):
            check(getattr(self, name) >= 0, f"FaultsConfig.{name} must be >= 0")
        check(self.soak_devices >= 0 and self.soak_seconds >= 0, "soak sizes must be >= 0")
        check(self.samples >= 32, "FaultsConfig.samples must be >= 32")
        check(self.rtt_ms >= 0, "FaultsConfig.rtt_ms must be >= 0")


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Server:
    """A ``mobillm serve`` process on a fixed loopback port; ``restart`` keeps port and folder."""

    def __init__(self, workdir: Path, *flags: str) -> None:
        self.workdir, self.flags = workdir, flags
        self.port = 0  # any free one first, then the same one at each restart
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc, self.port = start_server(self.workdir, *self.flags, port=self.port)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> float:
        return rss_mb(self.proc.pid) if self.proc is not None else 0.0

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        """SIGTERM (a graceful stop); returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9

    def events(self, kind: str) -> list[dict[str, Any]]:
        path = self.workdir / "server.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        return [r for r in rows if r.get("event") == kind]


class Harness:
    """Runs the scenarios of ``cfg``; ``say`` reports progress."""

    def __init__(self, cfg: FaultsConfig, say: Callable[[str], None] = print) -> None:
        self.cfg, self.say = cfg, say
        self.out = Path(cfg.out)
        self.work = self.out / "work"
        self.model = write_tiny_model(self.work / "tiny")
        self.data = write_task(self.work / "task.tsv", cfg.samples, cfg.seed)
        self.rnd = random.Random(cfg.seed)
        self._reference: bytes | None = None
        self._runs = 0

    # --- device runs ------------------------------------------------------------------------
    def device_cmd(self, target: str, out: Path, *extra: str) -> list[str]:
        return [
            *CLI, "train", "--model", str(self.model), "--train-file", str(self.data),
            *TASK_FLAGS, "--batch-size", "8", "--window", "1", "--dropout", "0.1",
            "--log-every", "1", "--link-rtt-ms", str(self.cfg.rtt_ms), "--no-eval",
            "--server", target, "--out", str(out), "--threads", "1", *extra,
        ]  # fmt: skip

    def _out(self, name: str) -> Path:
        self._runs += 1
        return self.work / "runs" / f"{self._runs:03d}-{name}"

    def run_device(self, target: str, name: str, *extra: str) -> tuple[int, dict, Path]:
        out = self._out(name)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "stderr.log").open("w") as err:
            proc = subprocess.run(self.device_cmd(target, out, *extra), stdout=subprocess.PIPE,
                                  stderr=err, text=True)  # fmt: skip
        result = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout else {}
        return proc.returncode, result, out

    @staticmethod
    def weights(out: Path) -> bytes | None:
        path = out / "side.safetensors"
        return path.read_bytes() if path.is_file() else None

    def reference(self) -> bytes:
        """The side network of an uninterrupted run on a server of its own."""
        if self._reference is None:
            server = Server(self.work / "server-reference")
            try:
                code, _, out = self.run_device(server.target, "reference")
            finally:
                server.stop()
            weights = self.weights(out)
            if code != 0 or weights is None:
                raise RuntimeError(f"the reference run failed: see {out / 'stderr.log'}")
            self._reference = weights
        return self._reference

    def same(self, out: Path) -> bool:
        return self.weights(out) == self.reference()

    # --- scenarios --------------------------------------------------------------------------
    def fuzz(self) -> dict[str, Any]:
        from mobillm.bench.fuzz import Fuzzer

        self.say(f"[faults] fuzz: {self.cfg.fuzz_messages} messages beside a training run")
        spec, head = self._session()
        # two credentials: the fuzzer's quota is full in seconds, the device's is its own
        keys = self.work / "fuzz-keys"
        keys.unlink(missing_ok=True)
        fuzz_key, device_key = add_key(keys, "fuzzer"), add_key(keys, "device")
        (self.work / "device.key").write_text(device_key)
        server = Server(self.work / "server-fuzz", "--api-keys", str(keys))
        result: dict[str, Any] = {}

        def legit() -> None:
            key = ("--api-key-file", str(self.work / "device.key"))
            code, _, out = self.run_device(server.target, "beside-fuzz", *key)
            result.update(code=code, out=out)

        device = threading.Thread(target=legit)
        try:
            fuzzer = Fuzzer(server.target, spec, head, self.cfg.seed, fuzz_key)
            warm = max(1, self.cfg.fuzz_messages // 10)
            fuzzer.run(warm, 3600)  # allocations that come once (pools, caches) come first
            rss0 = server.rss()
            device.start()
            t0 = time.monotonic()
            stats = fuzzer.run(
                self.cfg.fuzz_messages,
                3600,
                lambda n: self.say(f"[faults] fuzz: {n} messages, server {server.rss():.0f} MB"),
            )
            seconds = time.monotonic() - t0
            device.join()
            rss1 = server.rss()
            fuzzer.close()
            crashed = not server.alive
        finally:
            server.stop()
        return {
            **stats.to_dict(),
            "seconds": round(seconds, 1),
            "crashes": int(crashed),
            "server_rss_mb": [round(rss0, 1), round(rss1, 1)],
            "rss_growth": round(rss1 / rss0 - 1, 4) if rss0 else None,
            "legit_run_ok": result.get("code") == 0,
            "legit_weights_identical": self.same(result["out"]) if "out" in result else False,
        }

    def _session(self) -> tuple[Any, bytes]:
        from safetensors.torch import save

        from mobillm.backbone import Backbone, BackboneConfig
        from mobillm.codec import CodecConfig
        from mobillm.device.runtime import build_session, build_side_config
        from mobillm.transport.messages import TrainConfig

        bb = Backbone.load(BackboneConfig(source=str(self.model)))
        side = build_side_config(bb, "classification", 2, ("bad", "good"))
        spec, head = build_session(bb, side, CodecConfig("int8"), TrainConfig(total_steps=100))
        self._head_tensors = head
        return spec, save({k: v.contiguous() for k, v in head.items()})

    def disconnects(self) -> dict[str, Any]:
        from mobillm.bench.proxy import CutProxy

        self.say(f"[faults] disconnects: {self.cfg.disconnects} cuts of a training run")
        server = Server(self.work / "server-disconnects")
        proxy = CutProxy(server.port)
        proxy.start()
        out = self._out("disconnects")
        out.mkdir(parents=True, exist_ok=True)
        cuts = 0
        try:
            with (out / "stderr.log").open("w") as err:
                # a slower link than the other runs: long enough for every planned cut
                rtt = str(3 * self.cfg.rtt_ms)
                cmd = self.device_cmd(f"127.0.0.1:{proxy.port}", out, "--link-rtt-ms", rtt)
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
                # cut a training run, not the handshake (which fails fast on purpose)
                while proc.poll() is None and not server.events("step"):
                    time.sleep(0.05)
                while cuts < self.cfg.disconnects and proc.poll() is None:
                    time.sleep(self.rnd.uniform(0.3, 1.2))
                    if proc.poll() is None and proxy.cut() > 0:
                        cuts += 1
                        # the next cut only once this one is mended (the device resumed and
                        # trained a step): a cut during the reconnect would count without one
                        resumes = len(server.events("resume")) + 1
                        steps = len(server.events("step"))
                        while proc.poll() is None and (
                            len(server.events("resume")) < resumes
                            or len(server.events("step")) <= steps
                        ):
                            time.sleep(0.05)
                stdout, _ = proc.communicate()
        finally:
            proxy.stop()
            server.stop()
        res = json.loads(stdout) if proc.returncode == 0 and stdout else {}
        return {
            "disconnects": cuts,
            "device_exit": proc.returncode,
            "reconnects": res.get("train", {}).get("reconnects"),
            "weights_identical": self.same(out),
        }

    def server_kills(self) -> dict[str, Any]:
        self.say(f"[faults] server kills: {self.cfg.server_kills} x SIGKILL mid-run")
        server = Server(self.work / "server-kills", "--checkpoint-every", "1")
        out = self._out("server-kills")
        out.mkdir(parents=True, exist_ok=True)
        kills = []
        try:
            with (out / "stderr.log").open("w") as err:
                cmd = self.device_cmd(server.target, out)
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
                while len(kills) < self.cfg.server_kills and proc.poll() is None:
                    # kill mid-run: after a few more steps trained since the last restart
                    want = len(server.events("step")) + self.rnd.randint(2, 6)
                    while proc.poll() is None and len(server.events("step")) < want:
                        time.sleep(0.05)
                    if proc.poll() is not None:
                        break
                    acked = [e["step"] for e in server.events("step")]
                    server.kill()
                    kills.append({"last_acked_step": max(acked) if acked else -1})
                    time.sleep(0.5)
                    server.start()
                stdout, _ = proc.communicate()
        finally:
            server.stop()
        resumes = server.events("resume")
        # each kill is followed by one resume: the steps the restarted server held
        for kill, resume in zip(kills, resumes[-len(kills) :] if kills else [], strict=False):
            kill["server_held_steps"] = resume["steps_done"]
            kill["acked_steps_redone"] = kill["last_acked_step"] + 1 - resume["steps_done"]
        res = json.loads(stdout) if proc.returncode == 0 and stdout else {}
        return {
            "kills": len(kills),
            "device_exit": proc.returncode,
            "reconnects": res.get("train", {}).get("reconnects"),
            "per_kill": kills,
            "weights_identical": self.same(out),
        }

    def device_kills(self) -> dict[str, Any]:
        self.say(f"[faults] device kills: {self.cfg.device_kills} x SIGKILL, then --resume")
        server = Server(self.work / "server-device-kills")
        rows = []
        try:
            for i in range(self.cfg.device_kills):
                out = self._out(f"device-kill-{i}")
                out.mkdir(parents=True, exist_ok=True)
                step = self.rnd.randint(3, max(4, self.cfg.samples // 16))
                cmd = self.device_cmd(server.target, out)
                proc = subprocess.Popen(
                    cmd, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                assert proc.stderr is not None
                killed = False
                for line in proc.stderr:
                    if f"step {step}/" in line:
                        proc.send_signal(signal.SIGKILL)
                        killed = True
                        break
                proc.wait()
                resumed = subprocess.run([*CLI, "train", "--resume", str(out)],
                                         capture_output=True, text=True)  # fmt: skip
                (out / "resume.stderr.log").write_text(resumed.stderr)
                rows.append(
                    {
                        "killed_at_step": step if killed else None,
                        "resume_exit": resumed.returncode,
                        "weights_identical": self.same(out),
                    }
                )
        finally:
            server.stop()
        return {"runs": rows}

    def soak(self) -> dict[str, Any]:
        n, seconds = self.cfg.soak_devices, self.cfg.soak_seconds
        self.say(f"[faults] soak: {n} devices for {seconds:.0f} s")
        server = Server(self.work / "server-soak", "--max-sessions", str(max(16, n)))
        deadline = time.monotonic() + seconds
        runs: list[int] = []
        lock = threading.Lock()

        def device(i: int) -> None:
            while time.monotonic() < deadline:
                code, _, _ = self.run_device(server.target, f"soak-{i}", "--link-rtt-ms", "0")
                with lock:
                    runs.append(code)

        threads = [threading.Thread(target=device, args=(i,)) for i in range(n)]
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples.append((time.monotonic() - t0, server.rss()))
            time.sleep(2.0)
        code = server.stop()
        rss = [r for _, r in samples if r > 0]
        k = max(1, len(rss) // 4)
        early = sorted(rss[k : 2 * k] or rss)[len(rss[k : 2 * k] or rss) // 2]
        late = sorted(rss[-k:])[len(rss[-k:]) // 2]
        return {
            "devices": n,
            "seconds": seconds,
            "runs": len(runs),
            "failures": sum(c != 0 for c in runs),
            "server_exit": code,
            "rss_mb_samples": [(round(t, 1), round(r, 1)) for t, r in samples],
            "rss_growth": round(late / early - 1, 4) if early else None,
        }

    def attacks(self) -> dict[str, Any]:
        from mobillm.bench.attacks import Attacker, anonymous_flood, poisoning, replay_all

        self.say("[faults] attacks: the review's attacks, replayed")
        spec, _ = self._session()
        keys = self.work / "attack-keys"
        if not keys.is_file():
            add_key(keys, "device")
        keyed = Server(self.work / "server-keyed", "--api-keys", str(keys))
        atk = Attacker(keyed.target, spec, self._head_tensors)
        try:
            rows = [anonymous_flood(atk)]
            rows[0]["attack"] += " on a server with API keys"
        finally:
            atk.close()
            keyed.stop()
        lease = self.cfg.attack_lease_seconds
        server = Server(self.work / "server-attacks", "--lease-s", str(lease))
        atk = Attacker(server.target, spec, self._head_tensors)
        try:
            rss0 = server.rss()
            rows.append(poisoning(atk))
            rows += replay_all(atk, server.rss)
            code, _, out = self.run_device(server.target, "after-attacks")
            victim = code == 0 and self.same(out)
            rows.append(anonymous_flood(atk))  # last: it fills the open server
            time.sleep(lease + 10)  # abandoned sessions are parked after the lease
            status, _ = atk.open()
            rows[-1]["note"] += f"; {lease:.0f} s later a new session opens: {status}"
            rows[-1]["refused"] = rows[-1]["refused"] and status == "OK"
            rss1 = server.rss()
            alive = server.alive
        finally:
            atk.close()
            server.stop()
        return {
            "replays": rows,
            "server_alive_throughout": alive,
            "server_rss_mb": [round(rss0, 1), round(rss1, 1)],
            "victim_weights_identical": victim,
        }

    def run(self) -> dict[str, Any]:
        c = self.cfg
        results: dict[str, Any] = {"config": c.to_dict()}
        self.say("[faults] reference run (uninterrupted)")
        self.reference()
        plan: list[tuple[str, bool, Callable[[], dict[str, Any]]]] = [
            ("attacks", c.attacks, self.attacks),
            ("fuzz", c.fuzz_messages > 0, self.fuzz),
            ("disconnects", c.disconnects > 0, self.disconnects),
            ("server_kills", c.server_kills > 0, self.server_kills),
            ("device_kills", c.device_kills > 0, self.device_kills),
            ("soak", c.soak_devices > 0 and c.soak_seconds > 0, self.soak),
        ]
        for name, enabled, fn in plan:
            if enabled:
                t0 = time.monotonic()
                results[name] = fn()
                results[name]["wall_seconds"] = round(time.monotonic() - t0, 1)
                self.say(f"[faults] {name}: {json.dumps(_brief(results[name]))}")
        return results


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if not isinstance(v, list | dict)}
