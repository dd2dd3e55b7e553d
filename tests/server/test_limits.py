"""Every client-chosen size is priced before it is allocated; sessions expire; heads are bounded.

Each attack from the reliability review, replayed against the session manager: refused with a
precise status, nothing registered or allocated, and the other sessions unaffected.
"""

import json
import os
import time

import pytest
import torch
from safetensors.torch import save

from mobillm.codec import CodecConfig, encode
from mobillm.device.runtime import build_session, build_side_config
from mobillm.proto.v1 import mobillm_pb2 as pb
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.transport import serde
from mobillm.transport.messages import (
    ActivationChunk,
    RemoteError,
    SessionSpec,
    StepBegin,
    TrainConfig,
)


def _spec(bb, mixer="none"):
    side = build_side_config(bb, "classification", 2, ("bad", "good"), dropout=0.0, mixer=mixer)
    positions = "valid" if mixer != "none" else "loss"
    spec, head = build_session(
        bb, side, CodecConfig("int8"), TrainConfig(total_steps=10), positions
    )
    return spec, save({k: v.contiguous() for k, v in head.items()})


def _with(spec: SessionSpec, **side) -> dict:
    d = spec.to_dict()
    d["side"].update(side)
    return d


def _code(fn, code):
    with pytest.raises(RemoteError) as e:
        fn()
    assert e.value.code == code, e.value
    return e.value.message


def _opened(mgr, spec, head, client=""):
    info = mgr.open(spec, client)
    if info.need_head:
        mgr.upload_head(info.session_id, info.token, head, last=True, first=True)
    return info


def test_hostile_specs_are_refused_before_anything_is_registered(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    mgr = SessionManager(
        ServerConfig(workdir=str(tmp_path), max_sessions=2, max_side_bytes=16 << 20)
    )
    spec, head = _spec(bb)
    good = _opened(mgr, spec, head)  # the head is now cached: later opens build at once

    # a non-finite ratio never parses; 16 of them leave no session behind
    inf = pb.OpenSessionRequest(spec_json=json.dumps(_with(spec, adapter_ratio=float("inf"))))
    for _ in range(16):
        msg = _code(lambda: serde.spec_from_proto(inf), "INVALID_ARGUMENT")
    assert "finite" in msg
    # a 1 KB spec asking for a huge side network: priced on a meta build, never allocated
    huge = SessionSpec.from_dict(_with(spec, adapter_ratio=40000.0))
    rss = _rss_mb()
    assert "MiB" in _code(lambda: mgr.open(huge), "RESOURCE_EXHAUSTED")
    assert _rss_mb() - rss < 100
    # deep nesting and oversized specs are client mistakes, not INTERNAL
    deep = pb.OpenSessionRequest(spec_json="[" * 20_000 + "]" * 20_000)
    assert "nested too deeply" in _code(lambda: serde.spec_from_proto(deep), "INVALID_ARGUMENT")
    big = pb.OpenSessionRequest(spec_json=" " * (serde.MAX_SPEC_CHARS + 1))
    _code(lambda: serde.spec_from_proto(big), "RESOURCE_EXHAUSTED")
    assert len(mgr._sessions) == 1
    # the good session is untouched and one more fits
    _opened(mgr, spec, head)
    assert good.session_id in mgr._sessions and len(mgr._sessions) == 2


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_step_layouts_are_priced(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    spec, head = _spec(bb, mixer="attention")
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path), max_step_bytes=64 << 20))
    info = _opened(mgr, spec, head)
    sid, tok = info.session_id, info.token
    # one sample of 32,768 rows: the mixer's rows x rows attention alone would be gigabytes
    one = StepBegin(sid, 0, torch.tensor([32768]), torch.tensor([0]), torch.tensor([1]))
    assert "32768 rows" in _code(lambda: mgr.begin_step(sid, tok, one), "RESOURCE_EXHAUSTED")
    # rows of separate samples only cost linear memory
    ok = StepBegin(sid, 0, torch.ones(2, dtype=torch.int32), torch.arange(2), torch.tensor([0, 1]))
    mgr.begin_step(sid, tok, ok)


def test_overflowing_frames_are_refused_and_the_session_goes_on(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    spec, head = _spec(bb)
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path)))
    info = _opened(mgr, spec, head)
    sid, tok = info.session_id, info.token
    before = {k: v.clone() for k, v in mgr._sessions[sid].trainer.net.state_dict().items()}

    def step(scale):
        begin = StepBegin(
            sid, 0, torch.ones(2, dtype=torch.int32), torch.arange(2), torch.tensor([0, 1])
        )
        mgr.begin_step(sid, tok, begin)
        frame = bytearray(encode(torch.randn(2, 32), CodecConfig("int8")))
        if scale is not None:  # int8 row scales follow the header; set the first one
            at = len(frame) - (4 * 2 + 2 * 32)
            frame[at : at + 4] = torch.tensor([scale], dtype=torch.float32).numpy().tobytes()
        replies = []
        for tap in range(len(spec.taps)):
            replies = mgr.add_chunk(sid, tok, ActivationChunk(sid, 0, tap, 0, True, bytes(frame)))
        return replies[0]

    assert "infinity" in _code(lambda: step(1e38), "INVALID_ARGUMENT")
    mgr.abort_step(sid, tok)
    after = mgr._sessions[sid].trainer.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained
    assert step(None).step == 0  # the same step id, now well formed, trains


def test_refusals_do_not_echo_client_input(tmp_path, make_tiny_backbone):
    spec, _ = _spec(make_tiny_backbone("llama"))
    d = spec.to_dict()
    d["x" * 40_000] = 1
    msg = _code(
        lambda: serde.spec_from_proto(pb.OpenSessionRequest(spec_json=json.dumps(d))),
        "INVALID_ARGUMENT",
    )
    assert len(msg) < 500 and "more characters" in msg


def test_session_quotas(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    spec, head = _spec(bb)
    mgr = SessionManager(
        ServerConfig(workdir=str(tmp_path), max_sessions=3, max_sessions_per_client=2)
    )
    a1 = _opened(mgr, spec, head, "key:alice")
    _opened(mgr, spec, head, "key:alice")
    assert "key:alice" in _code(lambda: mgr.open(spec, "key:alice"), "RESOURCE_EXHAUSTED")
    _opened(mgr, spec, head, "key:bob")
    assert "server is full" in _code(lambda: mgr.open(spec, "key:carol"), "RESOURCE_EXHAUSTED")
    mgr.close(a1.session_id, a1.token)  # a closed session frees its slot at once
    _opened(mgr, spec, head, "key:carol")


def test_idle_sessions_are_parked_and_old_folders_go(tmp_path, make_tiny_backbone):
    bb = make_tiny_backbone("llama")
    spec, head = _spec(bb)
    mgr = SessionManager(
        ServerConfig(
            workdir=str(tmp_path), max_sessions=1, lease_seconds=60, retention_seconds=3600
        )
    )
    info = _opened(mgr, spec, head)  # a device that went quiet after opening
    assert mgr.reap(time.monotonic() + 30) == []
    assert mgr.reap(time.monotonic() + 61) == [info.session_id]
    assert not mgr._sessions  # its slot and memory are free
    other = _opened(mgr, spec, head)
    # the parked session comes back when its device calls, once there is room
    msg = _code(lambda: mgr.stats(info.session_id, info.token), "RESOURCE_EXHAUSTED")
    assert "server is full" in msg
    mgr.close(other.session_id, other.token)
    assert mgr.stats(info.session_id, info.token)["steps"] == 0
    _code(lambda: mgr.stats(info.session_id, "wrong"), "PERMISSION_DENIED")
    _code(lambda: mgr.stats(other.session_id, other.token), "FAILED_PRECONDITION")
    _code(lambda: mgr.stats("0123456789abcdef", "x"), "NOT_FOUND")
    _code(lambda: mgr.stats("../../etc", "x"), "NOT_FOUND")
    old = tmp_path / "sessions" / "0123456789abcdef"
    old.mkdir(parents=True)
    stale = time.time() - 7200
    os.utime(old, (stale, stale))
    mgr.reap()
    assert not old.exists() and (tmp_path / "sessions" / info.session_id).exists()


def test_head_cache_and_uploads_are_bounded(tmp_path, make_tiny_backbone):
    spec_a, head_a = _spec(make_tiny_backbone("llama", seed=0))
    spec_b, head_b = _spec(make_tiny_backbone("llama", seed=1))
    size = len(head_a)
    mgr = SessionManager(
        ServerConfig(workdir=str(tmp_path), head_cache_bytes=size, max_upload_bytes=3 * size)
    )
    _opened(mgr, spec_a, head_a)
    assert not mgr.open(spec_a).need_head  # cached
    _opened(mgr, spec_b, head_b)  # over the budget: A, least recently used, goes
    assert mgr.open(spec_a).need_head and not mgr.open(spec_b).need_head
    assert mgr._heads.nbytes <= size
    # an upload broken off and closed leaves nothing buffered
    info = mgr.open(spec_a)
    mgr.upload_head(info.session_id, info.token, head_a[:100], last=False, first=True)
    assert mgr._uploading == 100
    # the chunks go to the session's folder as they come, not to memory (a split head is GBs)
    spool = mgr.store.upload_path(info.session_id)
    assert spool.read_bytes() == head_a[:100]
    mgr.close(info.session_id, info.token)
    assert mgr._uploading == 0 and not spool.exists()
    # uploads in progress together are bounded server-wide
    big = [mgr.open(spec_a) for _ in range(4)]
    for i in big[:3]:
        mgr.upload_head(i.session_id, i.token, head_a[:size], last=False, first=True)
    msg = _code(
        lambda: mgr.upload_head(big[3].session_id, big[3].token, head_a, last=False, first=True),
        "RESOURCE_EXHAUSTED",
    )
    assert "too many heads" in msg
