"""Bad traffic is refused with the right gRPC status while another session trains undisturbed."""

import json
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load

from mobillm.codec import CodecConfig, encode
from mobillm.proto.v1 import mobillm_pb2 as pb
from mobillm.proto.v1 import mobillm_pb2_grpc as pb_grpc
from mobillm.transport import serde
from mobillm.transport.grpc_client import GrpcTransport
from mobillm.transport.link import LinkConfig
from mobillm.transport.messages import ActivationChunk, RemoteError, StepBegin

CHUNK = 16384  # the server's max_chunk_bytes in this test
ROWS = 512  # max_rows_per_step: with CHUNK, gRPC's message limit is 16 KiB + 64 KiB


class Raw:
    """A bare synchronous client that can send what GrpcTransport never would."""

    def __init__(self, port):
        opts = [("grpc.max_send_message_length", 8 << 20)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
        self.stub = pb_grpc.SideTuningStub(self.channel)

    @staticmethod
    def md(sid, token):
        return (("authorization", f"Bearer {token}"), ("x-mobillm-session", sid))

    def train(self, sid, token, messages):
        """Send ``messages`` on one Train stream; returns the acks (raises the stream's error)."""
        reqs = [
            serde.train_request_to_proto(m) if not isinstance(m, pb.TrainRequest) else m
            for m in messages
        ]
        replies = self.stub.Train(iter(reqs), metadata=self.md(sid, token))
        return [serde.reply_from_proto(r) for r in replies]


def expect(code, fn, *needles):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == getattr(grpc.StatusCode, code), e.value
    for n in needles:
        assert n in e.value.details(), e.value.details()
    return e.value.details()


def a_step(sid, step=0):
    """A valid two-sample classification step for the tiny llama (3 taps, hidden 32)."""
    begin = StepBegin(
        sid, step, torch.ones(2, dtype=torch.int32), torch.arange(2), torch.tensor([0, 1])
    )
    frame = encode(torch.randn(2, 32), CodecConfig("int8"))
    return [begin] + [ActivationChunk(sid, step, tap, 0, True, frame) for tap in range(3)]


def test_refusals_while_another_session_trains(
    make_tiny_backbone, cls_data, start_server, device_trainer, session_spec
):
    bb = make_tiny_backbone("llama")
    server = start_server(
        allowed_backbones=(bb.fingerprint.config_sha256,),
        max_chunk_bytes=CHUNK,
        max_rows_per_step=ROWS,
    )
    target = f"127.0.0.1:{server.port}"
    data, _ = cls_data(bb.tokenizer, n=48)

    # Reference: the good session alone.
    ref = device_trainer(bb, GrpcTransport(target), epochs=4, window=1, replay=False)
    ref.train(data, 8)
    ref_weights = ref.transport.download().weights
    ref.transport.close()

    # The same session again, slowed by an emulated round trip so that it is still training
    # while the bad traffic below arrives.
    slow = GrpcTransport(target, link=LinkConfig(rtt_ms=100))
    good = device_trainer(bb, slow, epochs=4, window=1, replay=False)
    first_ack = threading.Event()
    result = {}

    def run_good():
        try:
            result["summary"] = good.train(data, 8, progress=lambda m: first_ack.set())
        except BaseException as e:  # surfaced by the asserts below
            result["error"] = e
            first_ack.set()

    thread = threading.Thread(target=run_good)
    thread.start()
    assert first_ack.wait(60) and "error" not in result
    good_sid = good.info.session_id
    raw = Raw(server.port)
    spec, _ = session_spec(bb)

    # wrong backbone: the server serves only the llama's config
    other = GrpcTransport(target)
    with pytest.raises(RemoteError) as e:
        other.open(session_spec(make_tiny_backbone("qwen2"))[0])
    other.shutdown()
    assert e.value.code == "FAILED_PRECONDITION" and "is not served here" in e.value.message

    # a spec naming an unknown codec
    d = spec.to_dict()
    d["codec"]["scheme"] = "int3"
    bad_spec = pb.OpenSessionRequest(spec_json=json.dumps(d))
    expect("INVALID_ARGUMENT", lambda: raw.stub.OpenSession(bad_spec), "int3", "unknown scheme")

    # a second, well-behaved session to misuse (the head is cached: no upload needed)
    info = serde.session_info_from_proto(raw.stub.OpenSession(serde.spec_to_proto(spec)))
    assert not info.need_head
    sid, token = info.session_id, info.token

    # wrong or missing credentials, unknown session
    dl = serde.download_request_to_proto(sid)
    expect(
        "PERMISSION_DENIED",
        lambda: raw.stub.Download(dl, metadata=raw.md(sid, "x")).next(),
        "wrong token",
    )
    expect("UNAUTHENTICATED", lambda: raw.stub.Download(dl).next(), "Bearer")
    expect("PERMISSION_DENIED", lambda: raw.train(sid, good.info.token, a_step(sid)), "wrong token")
    expect(
        "NOT_FOUND",
        lambda: raw.stub.Download(
            serde.download_request_to_proto("feedbeef"), metadata=raw.md("feedbeef", token)
        ).next(),
        "unknown session",
    )

    # a frame naming another session (the good one) on this session's stream
    expect(
        "PERMISSION_DENIED",
        lambda: raw.train(sid, token, a_step(good_sid)),
        "frame for another session",
    )
    expect(
        "PERMISSION_DENIED",
        lambda: raw.stub.CloseSession(
            serde.close_request_to_proto(good_sid), metadata=raw.md(sid, token)
        ),
        "frame for another session",
    )

    # a truncated activation frame, and a StepBegin whose int arrays are cut short
    step = a_step(sid)
    cut = ActivationChunk(sid, 0, 0, 0, True, step[1].data[:-3])
    expect("INVALID_ARGUMENT", lambda: raw.train(sid, token, [step[0], cut]), "tap 0")
    torn = serde.train_request_to_proto(step[0])
    torn.begin.pool_rows = torn.begin.pool_rows[:-1]
    expect("INVALID_ARGUMENT", lambda: raw.train(sid, token, [torn]), "pool_rows", "15 bytes")

    # a chunk over max_chunk_bytes (refused by the session manager) ...
    big = ActivationChunk(sid, 0, 0, 0, False, b"\0" * (CHUNK + 1))
    expect("RESOURCE_EXHAUSTED", lambda: raw.train(sid, token, [step[0], big]), f"limit {CHUNK}")
    # ... and a message over gRPC's limit (refused by gRPC before any handler sees it)
    huge = ActivationChunk(sid, 0, 0, 0, False, b"\0" * (200 << 10))
    expect("RESOURCE_EXHAUSTED", lambda: raw.train(sid, token, [step[0], huge]), "larger than")
    huge_spec = pb.OpenSessionRequest(spec_json=" " * (200 << 10))
    expect("RESOURCE_EXHAUSTED", lambda: raw.stub.OpenSession(huge_spec), "larger than")

    # after all that, the misused session still trains on a new stream
    acks = raw.train(sid, token, a_step(sid))
    assert [a.step for a in acks] == [0]
    raw.channel.close()
    assert thread.is_alive(), "the good session ended before the bad traffic did"

    thread.join(120)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["steps"] == 24 and [r.step for r in good.records] == list(range(24))
    # The misused session's last, valid step may share a batched round with one of the good
    # session's: same weights up to reassociation (mobillm.server.batching), not bit for bit.
    # Any leak of the other session's data into this one would be far larger.
    got, want = load(good.transport.download().weights), load(ref_weights)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    assert good.transport.close()["steps"] == 24

    log = Path(server.cfg.workdir) / "server.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    codes = {(e["event"], e.get("code")) for e in events if e["event"] in ("refuse", "error")}
    assert {
        ("refuse", "FAILED_PRECONDITION"),
        ("refuse", "INVALID_ARGUMENT"),
        ("error", "PERMISSION_DENIED"),
        ("error", "UNAUTHENTICATED"),
        ("error", "NOT_FOUND"),
        ("error", "INVALID_ARGUMENT"),
        ("error", "RESOURCE_EXHAUSTED"),
    } <= codes


def test_client_reports_a_refused_stream(make_tiny_backbone, start_server, session_spec):
    """GrpcTransport reports a refusal from next_ack, then from send, as in-process does."""
    bb = make_tiny_backbone("llama")
    server = start_server()
    t = GrpcTransport(f"127.0.0.1:{server.port}")
    spec, head = session_spec(bb)
    info = t.open(spec)
    if info.need_head:
        t.upload_head(head)
    step = a_step(info.session_id)
    for m in step:
        t.send(m)
    assert t.next_ack(timeout=30).step == 0
    t.send(a_step(info.session_id, step=5)[0])  # a step out of order
    with pytest.raises(RemoteError) as e:
        t.next_ack(timeout=30)
    assert e.value.code == "FAILED_PRECONDITION" and "expected step 1" in e.value.message
    with pytest.raises(RemoteError, match="expected step 1"):
        t.send(step[0])
    with pytest.raises(RemoteError, match="expected step 1"):
        t.next_ack(timeout=1)  # the error stays the answer
    assert t.close()["steps"] == 1


def test_a_new_stream_replaces_a_stale_one(make_tiny_backbone, start_server, session_spec):
    """A device reconnecting mid-step: its new stream takes over and the half step is dropped."""
    bb = make_tiny_backbone("llama")
    server = start_server()
    raw = Raw(server.port)
    spec, head = session_spec(bb)
    info = serde.session_info_from_proto(raw.stub.OpenSession(serde.spec_to_proto(spec)))
    sid, token = info.session_id, info.token
    if info.need_head:
        parts = [serde.head_part_to_proto(p) for p in serde.head_parts(sid, head, CHUNK)]
        raw.stub.UploadHead(iter(parts), metadata=raw.md(sid, token))
    hold = threading.Event()
    half = [serde.train_request_to_proto(m) for m in a_step(sid)[:2]]

    def stale():  # half a step, then the link goes quiet without closing the stream
        yield from half
        hold.wait(30)

    old = raw.stub.Train(stale(), metadata=raw.md(sid, token))
    # wait until the server holds the half step: a new step 0 now would be refused...
    deadline = time.monotonic() + 10
    while server.manager._sessions[sid].trainer._pending is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # ...but a new stream takes the session over and trains step 0 from scratch
    assert [a.step for a in raw.train(sid, token, a_step(sid))] == [0]
    expect("ABORTED", lambda: list(old), "newer Train stream")
    hold.set()
    assert [a.step for a in raw.train(sid, token, a_step(sid, step=1))] == [1]
    raw.channel.close()
