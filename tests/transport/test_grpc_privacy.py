"""What the server receives: activations, labels and metadata; never token ids, never text."""

import json

import grpc
import numpy as np
from google.protobuf.unknown_fields import UnknownFieldSet

from mobillm.proto.v1 import mobillm_pb2 as pb
from mobillm.transport.grpc_client import GrpcTransport

REQUEST_TYPES = {
    "OpenSession": pb.OpenSessionRequest,
    "UploadHead": pb.HeadChunk,
    "Train": pb.TrainRequest,
    "Finish": pb.FinishRequest,
    "Download": pb.DownloadRequest,
    "CloseSession": pb.CloseSessionRequest,
}
# Every field a classification session may put on the wire.
ALLOWED = {
    "mobillm.v1.OpenSessionRequest.spec_json",
    "mobillm.v1.HeadChunk.session_id",
    "mobillm.v1.HeadChunk.seq",
    "mobillm.v1.HeadChunk.last",
    "mobillm.v1.HeadChunk.data",
    "mobillm.v1.TrainRequest.begin",
    "mobillm.v1.TrainRequest.chunk",
    "mobillm.v1.StepBegin.session_id",
    "mobillm.v1.StepBegin.step",
    "mobillm.v1.StepBegin.rows_per_sample",
    "mobillm.v1.StepBegin.pool_rows",
    "mobillm.v1.StepBegin.labels",
    "mobillm.v1.ActivationChunk.session_id",
    "mobillm.v1.ActivationChunk.step",
    "mobillm.v1.ActivationChunk.tap",
    "mobillm.v1.ActivationChunk.seq",
    "mobillm.v1.ActivationChunk.last",
    "mobillm.v1.ActivationChunk.data",
    "mobillm.v1.StepBegin.validation",
    "mobillm.v1.FinishRequest.session_id",
    "mobillm.v1.DownloadRequest.session_id",
    "mobillm.v1.CloseSessionRequest.session_id",
}


class Capture(grpc.aio.ServerInterceptor):
    """Records the raw bytes of every request message before the server parses it."""

    def __init__(self):
        self.records: list[tuple[str, bytes]] = []

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        parse = handler.request_deserializer

        def record(raw):
            self.records.append((method, bytes(raw)))
            return parse(raw)

        return handler._replace(request_deserializer=record)


def _fields(msg, out):
    assert len(UnknownFieldSet(msg)) == 0, f"unknown fields in {msg.DESCRIPTOR.full_name}"
    for fd, value in msg.ListFields():
        out.add(fd.full_name)
        if fd.message_type is not None:
            _fields(value, out)
    return out


def test_wire_carries_no_token_ids_and_no_text(
    tmp_path, make_tiny_backbone, cls_data, start_server, device_trainer
):
    capture = Capture()
    server = start_server(interceptors=[capture])
    bb = make_tiny_backbone("llama")
    data, texts = cls_data(bb.tokenizer, n=32)
    val, val_texts = cls_data(bb.tokenizer, n=8, seed=1)
    tr = device_trainer(bb, GrpcTransport(f"127.0.0.1:{server.port}"), epochs=2)
    tr.train(data, 8, validation=val)  # a validation split and an epoch from the cache too
    tr.download(tmp_path / "side", {})
    tr.transport.close()

    methods = [m for m, _ in capture.records]
    assert set(methods) == set(REQUEST_TYPES) and methods.count("Train") > 4 * 3
    # Forbidden byte strings: every 3-token window of every input, as int32 and int64 LE, and
    # the UTF-8 of every text (prompt as formatted and raw).
    needles = {t.encode() for t in texts + val_texts}
    for ids in data.input_ids + val.input_ids:
        assert len(ids) >= 3
        for i in range(len(ids) - 2):
            window = ids[i : i + 3]
            needles.add(np.asarray(window, dtype="<i4").tobytes())
            needles.add(np.asarray(window, dtype="<i8").tobytes())
    # the check itself works: a message that did carry the ids would be caught
    leak = pb.StepBegin(targets=np.asarray(data.input_ids[0], dtype="<i8").tobytes())
    assert any(n in leak.SerializeToString() for n in needles)
    seen: set[str] = set()
    for method, raw in capture.records:
        for needle in needles:
            assert needle not in raw, f"{method} request carries input ids or text"
        msg = REQUEST_TYPES[method].FromString(raw)
        _fields(msg, seen)
        assert msg.SerializeToString() == raw  # nothing hidden beyond the parsed fields
        if method == "OpenSession":
            spec = json.loads(msg.spec_json)
            assert set(spec) == {
                "fingerprint", "taps", "side", "head", "head_sha256",
                "codec", "train", "positions", "protocol", "client",
            }  # fmt: skip
    assert seen <= ALLOWED, sorted(seen - ALLOWED)
    assert "mobillm.v1.StepBegin.labels" in seen and "mobillm.v1.ActivationChunk.data" in seen
