"""Link emulation on the gRPC client: the sender is paced at the link rate, acks come late."""

import time

import pytest
import torch

from mobillm.codec import CodecConfig, encode
from mobillm.transport.grpc_client import GrpcTransport
from mobillm.transport.link import LinkConfig
from mobillm.transport.messages import StepBegin, chunk_frame

ROWS = 256


def _open(server, bb, session_spec, link):
    t = GrpcTransport(f"127.0.0.1:{server.port}", link=link)
    spec, head = session_spec(bb)
    info = t.open(spec)
    if info.need_head:
        t.upload_head(head)
    return t, info


def _send_step(t, info, step=0):
    b = ROWS
    t.send(
        StepBegin(
            info.session_id,
            step,
            torch.ones(b, dtype=torch.int32),
            torch.arange(b),
            torch.randint(0, 2, (b,)),
        )
    )
    for tap in range(3):
        frame = encode(torch.randn(ROWS, 32), CodecConfig("int8"))
        for part in chunk_frame(info.session_id, step, tap, frame, 1024):
            t.send(part)


def test_rate_limit_paces_the_sender(make_tiny_backbone, start_server, session_spec):
    server = start_server()
    bb = make_tiny_backbone("llama")
    t, info = _open(server, bb, session_spec, LinkConfig(mbps=0.25))  # about 1.3 s a step
    before = t.bytes_sent
    t0 = time.perf_counter()
    _send_step(t, info)
    queued = time.perf_counter() - t0
    assert t.next_ack(timeout=30).step == 0
    elapsed = time.perf_counter() - t0
    nbytes = t.bytes_sent - before
    assert nbytes > 3 * ROWS * 32  # the int8 frames, plus labels and framing
    assert elapsed >= nbytes * 8 / 1e6 * 0.95, (elapsed, nbytes)
    assert queued < 0.5 * elapsed  # send() only queued: the device was free meanwhile
    assert t.close()["steps"] == 1


@pytest.mark.parametrize("rtt_ms", [0, 1000])
def test_round_trip_delays_acks(make_tiny_backbone, start_server, session_spec, rtt_ms):
    server = start_server()
    bb = make_tiny_backbone("llama")
    t, info = _open(server, bb, session_spec, LinkConfig(rtt_ms=rtt_ms))
    _send_step(t, info)
    t0 = time.perf_counter()
    assert t.next_ack(timeout=30).step == 0
    waited = time.perf_counter() - t0
    if rtt_ms:
        assert waited >= 0.95 * rtt_ms / 1000
    else:
        assert waited < 0.5  # the first step of a fresh server: 0.02-0.1 s on a busy 2-core box
    t.close()
