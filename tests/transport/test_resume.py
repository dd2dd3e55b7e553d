"""Interrupted runs end bit for bit where uninterrupted ones do.

Dropped Train streams, a Finish cut off midway, a server process killed with SIGKILL and
started again on the same work folder: each time the device reconnects, learns how many steps
the server holds and resends only the rest.
"""

import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from mobillm.codec import CodecConfig
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.server.inprocess import InProcessTransport
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.transport.grpc_client import GrpcTransport
from mobillm.transport.messages import RemoteError, TrainConfig


def _trainer(bb, transport, **device):
    side = build_side_config(bb, "classification", 2, ("bad", "good"), dropout=0.1)
    cfg = DeviceConfig(
        **{"window": 2, "epochs": 3, "reconnect_seconds": 60, "private_labels": False, **device}
    )
    return DeviceTrainer(bb, side, transport, CodecConfig("int8"), TrainConfig(lr=5e-3), cfg)


def _run(bb, transport, data, val, **device):
    tr = _trainer(bb, transport, **device)
    summary = tr.train(data, 8, validation=val)
    weights = transport.download().weights
    transport.close()
    return tr, summary, weights


class Dropping(GrpcTransport):
    """Cuts its own Train stream right after the messages numbered in ``drop_after``."""

    def __init__(self, target, drop_after):
        super().__init__(target)
        self.drop_after, self.sent = set(drop_after), 0

    def _deliver(self, msg):
        out = super()._deliver(msg)
        self.sent += 1
        if self.sent in self.drop_after:
            self._train.cancel()
        return out


def test_dropped_streams_resume_bit_exact(make_tiny_backbone, cls_data, start_server):
    bb = make_tiny_backbone("llama")
    data, _ = cls_data(bb.tokenizer, n=48)
    val, _ = cls_data(bb.tokenizer, n=16, seed=1)
    server = start_server(checkpoint_every=2)
    target = f"127.0.0.1:{server.port}"
    _, ref_summary, ref = _run(bb, GrpcTransport(target), data, val)
    # 8 streamed steps of 4 messages (StepBegin + 3 layers): cut anywhere, several times
    drops = sorted(random.Random(0).sample(range(1, 33), 6))
    tr, summary, weights = _run(bb, Dropping(target, drops), data, val)
    assert tr.reconnects >= 3
    assert weights == ref
    assert summary["kept_epoch"] == ref_summary["kept_epoch"]


def test_private_label_runs_resume_bit_exact(make_tiny_backbone, cls_data, start_server):
    """Private labels: the device's classifier follows the server through dropped streams
    (a lost ack is resent on resume), ending where an uninterrupted run ends."""
    bb = make_tiny_backbone("llama")
    data, _ = cls_data(bb.tokenizer, n=32)
    val, _ = cls_data(bb.tokenizer, n=16, seed=1)
    server = start_server(checkpoint_every=2)
    target = f"127.0.0.1:{server.port}"
    ref_tr, ref_summary, ref = _run(bb, GrpcTransport(target), data, val, private_labels=True)
    # 2 validation + 4 streamed steps, then replays, 3 epochs' validation: gradients too
    drops = sorted(random.Random(1).sample(range(1, 70), 8))
    tr, summary, weights = _run(bb, Dropping(target, drops), data, val, private_labels=True)
    assert tr.reconnects >= 3
    assert weights == ref
    kept, ref_kept = tr.labels.state(), ref_tr.labels.state()
    assert kept.keys() == ref_kept.keys() and kept
    assert all(torch.equal(kept[k], ref_kept[k]) for k in kept)
    assert summary["kept_epoch"] == ref_summary["kept_epoch"]


class BreakingFinish(InProcessTransport):
    """Loses the link after the first epoch report of the first Finish."""

    broke = False

    def finish(self):
        for report in super().finish():
            yield report
            if not self.broke:
                self.broke = True
                raise RemoteError("UNAVAILABLE", "link lost")


def test_finish_cut_off_is_redone_from_its_checkpoint(tmp_path, make_tiny_backbone, cls_data):
    bb = make_tiny_backbone("llama")
    data, _ = cls_data(bb.tokenizer, n=48)
    val, _ = cls_data(bb.tokenizer, n=16, seed=1)
    runs = []
    for i, kind in enumerate((InProcessTransport, BreakingFinish)):
        mgr = SessionManager(ServerConfig(workdir=str(tmp_path / str(i))))
        runs.append(_run(bb, kind(mgr), data, val))
    (_, a, ref), (tr, b, weights) = runs
    assert tr.reconnects == 1 and weights == ref
    assert [e["val_accuracy"] for e in b["epochs"]] == [e["val_accuracy"] for e in a["epochs"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port, workdir):
    cmd = [
        sys.executable, "-m", "mobillm.cli.main", "serve", "--open", "--port", str(port),
        "--workdir", str(workdir), "--checkpoint-every", "3", "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.1)
    proc.kill()
    pytest.fail("server did not start")


def test_server_killed_and_restarted_resumes_bit_exact(tmp_path, make_tiny_backbone, cls_data):
    bb = make_tiny_backbone("llama")
    data, _ = cls_data(bb.tokenizer, n=96)
    val, _ = cls_data(bb.tokenizer, n=16, seed=1)
    port = _free_port()
    ref_server = _serve(port, tmp_path / "ref")
    try:
        _, _, ref = _run(bb, GrpcTransport(f"127.0.0.1:{port}"), data, val)
    finally:
        ref_server.kill()
        ref_server.wait()

    server = [_serve(port, tmp_path / "run")]
    acks = threading.Semaphore(0)

    class Counting(GrpcTransport):
        def _ack(self, ack, gen=None):
            super()._ack(ack, gen)
            acks.release()

    def killer():
        for _ in range(7):  # after the 7th ack (checkpoints at 3 and 6): kill -9, restart
            acks.acquire()
        server[0].send_signal(signal.SIGKILL)
        server[0].wait()
        time.sleep(1.0)
        server[0] = _serve(port, tmp_path / "run")

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        tr, _, weights = _run(bb, Counting(f"127.0.0.1:{port}"), data, val, window=1)
    finally:
        thread.join()
        server[0].send_signal(signal.SIGTERM)
        server[0].communicate(timeout=60)
    assert tr.reconnects == 1 and weights == ref


@pytest.mark.slow
def test_frozen_server_ends_the_run_with_one_clear_error(tmp_path, make_tiny_backbone, cls_data):
    """A server that stops answering (SIGSTOP): keepalive pings notice, the device tries to
    reconnect for its reconnect time, then fails with UNAVAILABLE, never a raw traceback."""
    bb = make_tiny_backbone("llama")
    data, _ = cls_data(bb.tokenizer, n=96)
    port = _free_port()
    server = _serve(port, tmp_path / "srv")
    acks = threading.Semaphore(0)

    class Counting(GrpcTransport):
        def _ack(self, ack, gen=None):
            super()._ack(ack, gen)
            acks.release()

    def freeze():
        acks.acquire()
        server.send_signal(signal.SIGSTOP)

    threading.Thread(target=freeze, daemon=True).start()
    transport = Counting(f"127.0.0.1:{port}", connect_timeout=2)
    tr = _trainer(bb, transport, reconnect_seconds=3)
    t0 = time.monotonic()
    try:
        with pytest.raises(RemoteError) as e:
            tr.train(data, 8)
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait()
        transport.shutdown()
    assert e.value.code == "UNAVAILABLE" and "gave up reconnecting after 3 s" in e.value.message
    # gRPC notices the silence through its keepalive pings; it takes about a minute here
    assert time.monotonic() - t0 < 120
