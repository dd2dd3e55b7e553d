"""serde: every message survives the wire unchanged, and malformed ones are refused clearly."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mobillm.proto.v1 import mobillm_pb2 as pb
from mobillm.transport import serde
from mobillm.transport.messages import (
    Ack,
    ActivationChunk,
    EpochReport,
    Features,
    Gradient,
    RemoteError,
    SessionInfo,
    SideBlob,
    StepBegin,
)


def wire(msg):
    """Serialize and parse again, as the other side would."""
    return type(msg).FromString(msg.SerializeToString())


def _expect(code, fn, *needles):
    with pytest.raises(RemoteError) as e:
        fn()
    assert e.value.code == code, e.value
    for n in needles:
        assert n in e.value.message, e.value.message
    return e.value


int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 8),
    step=st.integers(0, 2**63 - 1),
    data=st.data(),
    with_labels=st.booleans(),
    with_targets=st.booleans(),
    validation=st.booleans(),
)
def test_step_begin_round_trip(b, step, data, with_labels, with_targets, validation):
    rows = torch.tensor(data.draw(st.lists(int32s, min_size=b, max_size=b)), dtype=torch.int32)
    pool = torch.tensor(data.draw(st.lists(int64s, min_size=b, max_size=b)), dtype=torch.int64)
    labels = (
        torch.tensor(data.draw(st.lists(int64s, min_size=b, max_size=b))) if with_labels else None
    )
    n = data.draw(st.integers(0, 20))
    targets = torch.tensor(data.draw(st.lists(int64s, min_size=n, max_size=n)), dtype=torch.long)
    msg = StepBegin("sess", step, rows, pool, labels, targets if with_targets else None, validation)
    back = serde.train_request_from_proto(wire(serde.train_request_to_proto(msg)))
    assert isinstance(back, StepBegin)
    assert (back.session_id, back.step, back.validation) == ("sess", step, validation)
    assert back.rows_per_sample.dtype == torch.int32 and torch.equal(back.rows_per_sample, rows)
    assert back.pool_rows.dtype == torch.int64 and torch.equal(back.pool_rows, pool)
    for got, want in ((back.labels, labels), (back.targets, msg.targets)):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == torch.int64 and torch.equal(got, want.long())


@given(
    epoch=st.integers(0, 2**32 - 1),
    metrics=st.dictionaries(st.text(max_size=8), st.floats(allow_nan=False)),
    last=st.booleans(),
)
def test_epoch_report_round_trip(epoch, metrics, last):
    report = EpochReport(epoch, metrics, last)
    back = serde.epoch_report_from_proto(wire(serde.epoch_report_to_proto(report)))
    assert back == report


def test_integer_arrays_are_little_endian():
    msg = StepBegin("s", 3, torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0, 258]))
    p = serde.step_begin_to_proto(msg)
    assert p.rows_per_sample == b"\x01\0\0\0\x02\0\0\0"
    assert p.pool_rows == b"\0" * 8 + b"\x02\x01" + b"\0" * 6
    assert not p.HasField("labels") and not p.HasField("targets")
    # an empty tensor is still present (not None) on the other side
    msg.labels = torch.zeros(0, dtype=torch.long)
    assert serde.step_begin_from_proto(wire(serde.step_begin_to_proto(msg))).labels.numel() == 0


@settings(max_examples=40, deadline=None)
@given(
    step=st.integers(0, 2**63 - 1),
    tap=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**32 - 1),
    last=st.booleans(),
    data=st.binary(max_size=300),
)
def test_activation_chunk_round_trip(step, tap, seq, last, data):
    msg = ActivationChunk("abc", step, tap, seq, last, data)
    assert serde.train_request_from_proto(wire(serde.train_request_to_proto(msg))) == msg


@settings(max_examples=40, deadline=None)
@given(
    step=st.integers(0, 2**63 - 1),
    loss=st.floats(allow_nan=False),
    metrics=st.dictionaries(st.text(max_size=10), st.floats(allow_nan=False), max_size=5),
)
def test_ack_round_trip(step, loss, metrics):
    ack = Ack(step, loss, metrics)
    assert serde.ack_from_proto(wire(serde.ack_to_proto(ack))) == ack


def test_ack_keeps_nan_metrics():
    back = serde.ack_from_proto(wire(serde.ack_to_proto(Ack(1, math.nan, {"x": math.inf}))))
    assert math.isnan(back.loss) and back.metrics == {"x": math.inf}


@settings(max_examples=40, deadline=None)
@given(
    weights=st.binary(max_size=200),
    meta=st.text(max_size=50),
    chunk=st.integers(1, 64),
)
def test_side_blob_round_trip_in_chunks(weights, meta, chunk):
    parts = [wire(c) for c in serde.blob_to_proto(SideBlob(meta, weights), chunk)]
    assert all(len(p.data) <= chunk for p in parts)
    assert [p.seq for p in parts] == list(range(len(parts))) and parts[-1].last
    assert sum(p.last for p in parts) == 1
    assert serde.blob_from_proto(parts) == SideBlob(meta, weights)


def test_side_blob_refuses_broken_streams():
    parts = list(serde.blob_to_proto(SideBlob("{}", b"x" * 10), 3))
    _expect("INTERNAL", lambda: serde.blob_from_proto(parts[:-1]), "before its last chunk")
    _expect("INTERNAL", lambda: serde.blob_from_proto([parts[1], parts[0]]), "chunk 1")
    _expect("INTERNAL", lambda: serde.blob_from_proto([*parts, parts[-1]]), "after its last")
    _expect("INTERNAL", lambda: serde.blob_from_proto([]), "before its last chunk")


@settings(max_examples=30, deadline=None)
@given(blob=st.binary(max_size=100), chunk=st.integers(1, 40))
def test_head_parts_round_trip(blob, chunk):
    parts = list(serde.head_parts("s", blob, chunk))
    back = [serde.head_part_from_proto(wire(serde.head_part_to_proto(p))) for p in parts]
    assert back == parts and b"".join(p.data for p in back) == blob
    assert [p.last for p in back] == [False] * (len(back) - 1) + [True]


@settings(max_examples=50, deadline=None)
@given(pieces=st.lists(st.binary(max_size=30), max_size=8), chunk=st.integers(1, 20))
def test_head_parts_from_pieces_are_the_blobs_chunks(pieces, chunk):
    """Pieces of any size (a streamed upload) go out as the joined blob would: full chunks."""
    got = list(serde.head_parts("s", (memoryview(p) for p in pieces), chunk))
    assert got == list(serde.head_parts("s", b"".join(pieces), chunk))
    sizes = [len(p.data) for p in got]
    assert all(n == chunk for n in sizes[:-1]) and sizes[-1] <= chunk


def test_head_parts_copy_each_piece_before_asking_for_the_next():
    """The device hands a piece's pages back once the next is asked for: by then its bytes
    must be in a chunk of their own, not a view of the piece."""
    buf = bytearray(b"abcdef")

    def pieces():
        for i in range(0, 6, 2):
            yield memoryview(buf)[i : i + 2]
            buf[i : i + 2] = b"XX"  # what a release may leave behind, at worst

    assert [p.data for p in serde.head_parts("s", pieces(), 4)] == [b"abcd", b"ef"]


def test_session_info_and_summary_round_trip():
    info = SessionInfo("id1", "tok", True, 4096, "mobillm")
    assert serde.session_info_from_proto(wire(serde.session_info_to_proto(info))) == info
    _expect(
        "INVALID_ARGUMENT", lambda: serde.session_info_from_proto(pb.OpenSessionReply()), "token"
    )
    summary = {"steps": 12, "samples": 96, "loss": 0.25, "checkpoint": "/w/step-000012"}
    back = serde.summary_from_proto(wire(serde.summary_to_proto(summary)))
    assert back == summary and isinstance(back["steps"], int)
    assert serde.upload_reply_from_proto(wire(serde.upload_reply_to_proto(123))) == 123
    assert serde.download_request_from_proto(wire(serde.download_request_to_proto("a"))) == "a"
    assert serde.close_request_from_proto(wire(serde.close_request_to_proto("b"))) == "b"


def test_session_spec_round_trip(make_tiny_backbone, session_spec):
    spec, _ = session_spec(make_tiny_backbone("llama"))
    assert serde.spec_from_proto(wire(serde.spec_to_proto(spec))) == spec


def test_bad_specs_are_refused_with_the_reason(make_tiny_backbone, session_spec):
    spec, _ = session_spec(make_tiny_backbone("llama"))

    def refuse(d, *needles):
        req = pb.OpenSessionRequest(spec_json=json.dumps(d) if isinstance(d, dict) else d)
        _expect("INVALID_ARGUMENT", lambda: serde.spec_from_proto(req), *needles)

    d = spec.to_dict()
    refuse({**d, "codec": {**d["codec"], "scheme": "int3"}}, "int3", "unknown scheme")
    refuse({**d, "taps": [0, 1]}, "last layer")
    refuse({**d, "colour": 1}, "unknown field", "colour")
    refuse({**d, "side": {**d["side"], "hidden_size": "wide"}}, "SideConfig")
    refuse("{not json", "invalid JSON")
    refuse("[]", "JSON object")


def _begin(**fields):
    good = {
        "session_id": "s",
        "step": 0,
        "rows_per_sample": b"\x01\0\0\0",
        "pool_rows": b"\0" * 8,
        "labels": b"\0" * 8,
    }
    return pb.TrainRequest(begin=pb.StepBegin(**{**good, **fields}))


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"rows_per_sample": b"\x01\0\0\0\x01"}, ("rows_per_sample", "5 bytes", "4-byte")),
        ({"pool_rows": b"\0" * 12}, ("pool_rows", "12 bytes", "8-byte")),
        ({"labels": b"\0" * 7}, ("labels", "7 bytes")),
        ({"targets": b"\0" * 9}, ("targets", "9 bytes")),
        ({"rows_per_sample": b""}, ("rows_per_sample is empty",)),
    ],
)
def test_bad_byte_lengths_are_refused(fields, needles):
    _expect(
        "INVALID_ARGUMENT", lambda: serde.train_request_from_proto(wire(_begin(**fields))), *needles
    )


def test_count_limits_and_empty_requests():
    big = _begin(targets=b"\0" * 8 * 11)
    _expect("INVALID_ARGUMENT", lambda: serde.train_request_from_proto(big, max_items=10), "limit")
    assert serde.train_request_from_proto(big, max_items=11).targets.numel() == 11
    _expect(
        "INVALID_ARGUMENT",
        lambda: serde.train_request_from_proto(pb.TrainRequest()),
        "a StepBegin, an ActivationChunk or a Gradient",
    )
    over = StepBegin("s", 0, torch.tensor([2**31]), torch.tensor([0]))
    _expect("INVALID_ARGUMENT", lambda: serde.step_begin_to_proto(over), "rows_per_sample")


def test_private_label_messages_round_trip():
    grad = torch.randn(3, 5)
    back = serde.train_request_from_proto(
        wire(serde.train_request_to_proto(Gradient("abc", 7, grad, 2.5)))
    )
    assert (
        back.step == 7 and back.device_sq_norm == 2.5 and torch.equal(back.grad, grad.reshape(-1))
    )
    empty = serde.gradient_from_proto(wire(serde.gradient_to_proto(Gradient("abc", 1, None))))
    assert empty.grad is None
    feats = Features(4, torch.randn(2, 6))
    reply = serde.reply_from_proto(wire(serde.reply_to_proto(feats)))
    assert reply.step == 4 and torch.equal(reply.data, feats.data)
    mask = torch.tensor([True, False, True])
    begin = StepBegin("abc", 0, torch.tensor([3], dtype=torch.int32), torch.tensor([2]))
    begin.loss_mask, begin.replay_of = mask, 5
    back = serde.step_begin_from_proto(wire(serde.step_begin_to_proto(begin)))
    assert torch.equal(back.loss_mask, mask) and back.replay_of == 5 and back.labels is None


def test_ragged_private_label_payloads_are_refused():
    with pytest.raises(RemoteError, match="not 2 rows"):
        serde.features_from_proto(pb.Features(step=0, rows=2, data=b"\0" * 12))
    with pytest.raises(RemoteError, match="whole number of float32"):
        serde.gradient_from_proto(pb.Gradient(step=0, data=b"\0" * 7))
    with pytest.raises(RemoteError, match="other than 0 and 1"):
        serde.step_begin_from_proto(
            pb.StepBegin(rows_per_sample=b"\1\0\0\0", pool_rows=b"\0" * 8, loss_mask=b"\2")
        )
