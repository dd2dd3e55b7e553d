"""The wire audit: what the server receives in every mode, byte for byte.

Every request a real gRPC server gets is captured before it is parsed and searched for the
inputs' token ids (3-token windows as int16, int32, int64, protobuf varints and decimal text),
the sample texts and their substrings, and the verbalizer ids. No mode sends token ids or text;
the standard modes send labels (classification) or the response's token ids as targets (causal
LM), and the test pins that down; private-label mode sends neither, nor the verbalizers.
"""

import json
import random

import grpc
import numpy as np
import pytest
from google.protobuf.unknown_fields import UnknownFieldSet

from mobillm.codec import CodecConfig
from mobillm.data import DataConfig, LMExample, tokenize_examples
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.proto.v1 import mobillm_pb2 as pb
from mobillm.transport.grpc_client import GrpcTransport
from mobillm.transport.messages import TrainConfig

REQUEST_TYPES = {
    "OpenSession": pb.OpenSessionRequest,
    "UploadHead": pb.HeadChunk,
    "Train": pb.TrainRequest,
    "Finish": pb.FinishRequest,
    "Download": pb.DownloadRequest,
    "CloseSession": pb.CloseSessionRequest,
}
P = "mobillm.v1."
# Every field any session may put on the wire, labels and targets aside.
ALLOWED = {
    P + f
    for f in (
        "OpenSessionRequest.spec_json",
        "HeadChunk.session_id",
        "HeadChunk.seq",
        "HeadChunk.last",
        "HeadChunk.data",
        "TrainRequest.begin",
        "TrainRequest.chunk",
        "StepBegin.session_id",
        "StepBegin.step",
        "StepBegin.rows_per_sample",
        "StepBegin.pool_rows",
        "StepBegin.validation",
        "ActivationChunk.session_id",
        "ActivationChunk.step",
        "ActivationChunk.tap",
        "ActivationChunk.seq",
        "ActivationChunk.last",
        "ActivationChunk.data",
        "FinishRequest.session_id",
        "DownloadRequest.session_id",
        "CloseSessionRequest.session_id",
    )
}
PRIVATE = {
    P + f
    for f in (
        "TrainRequest.gradient",
        "Gradient.session_id",
        "Gradient.step",
        "Gradient.data",
        "Gradient.device_sq_norm",
        "StepBegin.loss_mask",
        "StepBegin.replay_of",
    )
}
SPEC_KEYS = {
    "fingerprint", "taps", "side", "head", "head_sha256", "codec", "train", "positions",
    "protocol", "client", "private_labels",
}  # fmt: skip
# task, learner, positions, private labels
MODES = [
    ("classification", "ladder", "loss", False),
    ("classification", "ladder", "loss", True),
    ("classification", "ladder", "all", True),
    ("classification", "split", "valid", True),
    ("classification", "transformer", "valid", True),
    ("classification", "transformer", "valid", False),
    ("causal_lm", "ladder", "loss", False),
    ("causal_lm", "ladder", "loss", True),
    ("causal_lm", "ladder", "valid", True),
    ("causal_lm", "transformer", "valid", True),
]


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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _id_needles(ids: list[int]) -> set[bytes]:
    """A 3-token window in every encoding a careless protocol might use."""
    out = {np.asarray(ids, dtype=d).tobytes() for d in ("<i4", "<i8")}
    if max(ids) < 1 << 15:
        out.add(np.asarray(ids, dtype="<i2").tobytes())
    out.add(b"".join(_varint(i) for i in ids))
    for sep in (", ", ",", " "):
        out.add(sep.join(map(str, ids)).encode())
    return out


def _data(task, tok, n, seed):
    rnd = random.Random(seed)
    if task == "causal_lm":
        heads = ["the quick brown fox", "lazy dog", "a bad movie", "a good movie"]
        ex = [
            LMExample(rnd.choice(heads), rnd.choice(["Answer: four", "journey"])) for _ in range(n)
        ]
        texts = [e.prompt + e.response for e in ex]
        cfg = DataConfig(task="causal_lm", batch_size=8)
    else:
        from mobillm.data import ClassificationExample

        ex = [
            ClassificationExample(
                f"{rnd.choice(['the quick fox', 'lazy dog'])} {w}", int(w == "good")
            )
            for w in (rnd.choice(["good", "bad"]) for _ in range(n))
        ]
        texts = [e.text for e in ex]
        cfg = DataConfig(labels=("0", "1"), verbalizers=("bad", "good"), batch_size=8)
    return tokenize_examples(ex, tok, cfg), texts


@pytest.mark.parametrize(("task", "kind", "positions", "private"), MODES)
def test_what_the_server_receives(
    tmp_path, make_tiny_backbone, start_server, task, kind, positions, private
):
    capture = Capture()
    server = start_server(interceptors=[capture])
    bb = make_tiny_backbone("qwen2")
    data, texts = _data(task, bb.tokenizer, 24, 0)
    val, val_texts = _data(task, bb.tokenizer, 8, 1)
    verbalizers = ("bad", "good") if task == "classification" else ()
    opts = {"kind": "split", "split_layers": 1} if kind == "split" else {"kind": kind}
    side = build_side_config(bb, task, 2, verbalizers, dropout=0.0, **opts)
    tr = DeviceTrainer(
        bb,
        side,
        GrpcTransport(f"127.0.0.1:{server.port}"),
        CodecConfig("int8"),
        TrainConfig(lr=5e-3),
        DeviceConfig(epochs=2, positions=positions, private_labels=private),
    )
    tr.train(data, 8, validation=val)  # a validation split and a cache epoch too
    tr.download(tmp_path / "side", {})
    tr.transport.close()

    methods = [m for m, _ in capture.records]
    # 4 steps (3 to train, 1 to validate), each a begin and at least one frame
    assert set(methods) == set(REQUEST_TYPES) and methods.count("Train") >= 4 * 2
    ids = {n for seq in data.input_ids + val.input_ids for i in range(len(seq) - 2)
           for n in _id_needles(seq[i : i + 3])}  # fmt: skip
    texts = [t.encode() for t in texts + val_texts]
    substrings = {t[i : i + 8] for t in texts for i in range(max(1, len(t) - 7))}
    # the search itself works: a message that carried the ids would be caught
    leak = pb.StepBegin(targets=np.asarray(data.input_ids[0], dtype="<i8").tobytes())
    assert any(n in leak.SerializeToString() for n in ids)

    seen: set[str] = set()
    targets = []
    for method, raw in capture.records:
        for needle in substrings:
            assert needle not in raw, f"{method} request carries sample text {needle!r}"
        msg = REQUEST_TYPES[method].FromString(raw)
        _fields(msg, seen)
        assert msg.SerializeToString() == raw  # nothing hidden beyond the parsed fields
        if method == "Train" and msg.begin.HasField("targets"):
            targets.append(msg.begin.targets)
            continue
        for needle in ids:
            assert needle not in raw, f"{method} request carries input token ids"
        if method == "OpenSession":
            spec = json.loads(msg.spec_json)
            assert set(spec) == SPEC_KEYS and spec["private_labels"] is private
            words = bb.word_token_ids(["bad", "good"]) if verbalizers else []
            assert spec["side"]["verbalizer_ids"] == ([] if private else words)
            assert (spec["head"]["vocab_rows"] == 0) is private

    extra = seen - ALLOWED
    if private:
        # no labels, no targets: only layout, frames and gradients
        assert extra <= PRIVATE and P + "TrainRequest.gradient" in extra, sorted(extra)
        assert (P + "StepBegin.loss_mask" in extra) is (task == "causal_lm")
        assert not targets
    elif task == "classification":
        assert extra == {P + "StepBegin.labels"}  # the class ids travel in the clear
    else:
        # the response's next-token ids travel as targets: token ids of the sample
        assert extra == {P + "StepBegin.targets"}
        assert any(n in t for t in targets for n in ids)
