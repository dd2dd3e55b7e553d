"""The attacks of the reliability review, replayed against a real server process.

Each replay sends what an attacker sent and reports the status the server answered, the
server's memory before and after, and whether a legitimate session beside it still works.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
import torch
from safetensors.torch import save

from mobillm.codec import CodecConfig, encode
from mobillm.errors import ConfigError
from mobillm.transport import serde
from mobillm.transport.grpc_client import GrpcTransport
from mobillm.transport.messages import (
    ActivationChunk,
    RemoteError,
    SessionInfo,
    SessionSpec,
    StepBegin,
)

SERVICE = "/mobillm.v1.SideTuning/"


class Attacker:
    """A raw gRPC client for ``target`` and the public pieces of a session (spec, head)."""

    def __init__(self, target: str, spec: SessionSpec, head: dict[str, torch.Tensor]) -> None:
        self.target, self.spec, self.head = target, spec, head
        opts = [("grpc.max_send_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(target, options=opts)

    def call(self, method: str, payload: Any, md: Any = (), stream: bool = False) -> str:
        """The status name the server answers (OK or the error code)."""
        try:
            if stream:
                self.channel.stream_unary(SERVICE + method)(iter(payload), timeout=60, metadata=md)
            else:
                self.channel.unary_unary(SERVICE + method)(payload, timeout=60, metadata=md)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name  # type: ignore[attr-defined]

    def open(self, spec_json: str | None = None) -> tuple[str, SessionInfo | None]:
        req = serde.spec_to_proto(self.spec)
        if spec_json is not None:
            req.spec_json = spec_json
        try:
            fn = self.channel.unary_unary(SERVICE + "OpenSession")
            reply = fn(req.SerializeToString(), timeout=60)
        except grpc.RpcError as e:
            return e.code().name, None  # type: ignore[attr-defined]
        cls = type(serde.session_info_to_proto(SessionInfo("-", "-", False, 1, "")))
        return "OK", serde.session_info_from_proto(cls.FromString(reply))

    def spec_with(self, **side: Any) -> str:
        d = self.spec.to_dict()
        d["side"].update(side)
        return json.dumps(d)

    @staticmethod
    def md(info: SessionInfo) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {info.token}"), ("x-mobillm-session", info.session_id))

    def train(self, info: SessionInfo, messages: list[Any]) -> str:
        reqs = [serde.train_request_to_proto(m).SerializeToString() for m in messages]
        try:
            fn = self.channel.stream_stream(SERVICE + "Train")
            list(fn(iter(reqs), timeout=60, metadata=self.md(info)))
            return "OK"
        except grpc.RpcError as e:
            return e.code().name  # type: ignore[attr-defined]

    def close(self) -> None:
        self.channel.close()


def _row(attack: str, status: str, expected: tuple[str, ...], note: str = "") -> dict[str, Any]:
    return {"attack": attack, "status": status, "refused": status in expected, "note": note}


def replay_all(atk: Attacker, rss: Callable[[], float]) -> list[dict[str, Any]]:
    """Every attack in turn; each row adds the server's RSS growth it caused (MB)."""
    rows = []
    for fn in (
        infinite_ratio,
        huge_ratio,
        attention_rows,
        oversized_chunk,
        head_over_limit,
        unfinished_upload,
        echo,
        nested_spec,
        overflowing_scale,
        plaintext_device,
    ):
        before = rss()
        row = fn(atk)
        row["rss_growth_mb"] = round(rss() - before, 1)
        rows.append(row)
    return rows


def anonymous_flood(atk: Attacker) -> dict[str, Any]:
    """20 anonymous opens: none on a server with keys; on an open one, the rest once full."""
    statuses = [atk.open()[0] for _ in range(20)]
    opened = statuses.count("OK")
    rest = set(statuses[opened:])
    return {
        "attack": "20 anonymous OpenSession calls",
        "status": ",".join(sorted(set(statuses))),
        "refused": statuses[:opened] == ["OK"] * opened
        and rest <= {"RESOURCE_EXHAUSTED", "UNAUTHENTICATED"},
        "note": f"{opened} opened, the rest refused",
    }


def infinite_ratio(atk: Attacker) -> dict[str, Any]:
    status, _ = atk.open(atk.spec_with(adapter_ratio=float("inf")))
    return _row("spec with adapter_ratio Infinity", status, ("INVALID_ARGUMENT",))


def huge_ratio(atk: Attacker) -> dict[str, Any]:
    status, _ = atk.open(atk.spec_with(adapter_ratio=4e7, reduction=1))
    return _row("1 KB spec asking for a huge side network", status, ("RESOURCE_EXHAUSTED",))


def attention_rows(atk: Attacker) -> dict[str, Any]:
    d = json.loads(atk.spec_with(mixer="attention"))
    d["positions"] = "valid"
    status, info = atk.open(json.dumps(d))
    if info is None:
        return _row("32,768 rows in an attention step", status, ())
    upload(atk, info)
    rows = torch.tensor([32768], dtype=torch.int32)
    begin = StepBegin(info.session_id, 0, rows, torch.tensor([0]), torch.tensor([0]))
    return _row("46-byte step header, 32,768 rows in one attention sample",
                atk.train(info, [begin]), ("RESOURCE_EXHAUSTED",))  # fmt: skip


def upload(atk: Attacker, info: SessionInfo, blob: bytes | None = None) -> str:
    blob = blob if blob is not None else save({k: v.contiguous() for k, v in atk.head.items()})
    parts = serde.head_parts(info.session_id, blob, info.max_chunk_bytes)
    reqs = [serde.head_part_to_proto(p).SerializeToString() for p in parts]
    return atk.call("UploadHead", reqs, atk.md(info), stream=True)


def oversized_chunk(atk: Attacker) -> dict[str, Any]:
    _, info = atk.open()
    if info is None:
        return _row("activation chunk over the declared frame", "no session", ())
    upload(atk, info)
    sid = info.session_id
    begin = StepBegin(sid, 0, torch.ones(2, dtype=torch.int32), torch.arange(2), torch.zeros(2))
    frame = encode(torch.randn(2, atk.spec.side.hidden_size), CodecConfig("int8"))
    chunks = [ActivationChunk(sid, 0, 0, i, False, frame) for i in range(4)]
    return _row("chunks past the bytes the step's rows take",
                atk.train(info, [begin, *chunks]), ("RESOURCE_EXHAUSTED",))  # fmt: skip


def head_over_limit(atk: Attacker) -> dict[str, Any]:
    d = json.loads(atk.spec.to_json())
    d["head"]["norm_eps"] = 2e-6  # a head no session uploaded yet: the server asks for it
    _, info = atk.open(json.dumps(d))
    if info is None or not info.need_head:
        return _row("head upload over the limit", "no session needing a head", ())
    junk = b"\0" * info.max_chunk_bytes
    parts = [(junk, False)] * 3000  # 3 GB at 1 MB a chunk; the head is a few hundred KB
    reqs = (
        serde.head_part_to_proto(serde.HeadPart(info.session_id, i, last, data)).SerializeToString()
        for i, (data, last) in enumerate(parts)
    )
    return _row("3 GB head upload", atk.call("UploadHead", reqs, atk.md(info), stream=True),
                ("RESOURCE_EXHAUSTED",))  # fmt: skip


def unfinished_upload(atk: Attacker) -> dict[str, Any]:
    _, info = atk.open()
    if info is None:
        return _row("head upload left unfinished, then closed", "no session", ())
    part = serde.HeadPart(info.session_id, 0, False, b"\0" * (512 << 10))
    atk.call("UploadHead", [serde.head_part_to_proto(part).SerializeToString()], atk.md(info),
             stream=True)  # fmt: skip
    req = serde.close_request_to_proto(info.session_id).SerializeToString()
    status = atk.call("CloseSession", req, atk.md(info))
    return _row("unfinished head upload, then CloseSession", status, ("OK",),
                "the partial upload is freed at close")  # fmt: skip


def echo(atk: Attacker) -> dict[str, Any]:
    d = json.loads(atk.spec.to_json())
    d["x" * 40_000] = 1
    status, _ = atk.open(json.dumps(d))
    return _row("refusal that would echo 40 KB of input", status, ("INVALID_ARGUMENT",),
                "messages are cut to 400 characters")  # fmt: skip


def nested_spec(atk: Attacker) -> dict[str, Any]:
    status, _ = atk.open("[" * 20_000 + "]" * 20_000)
    return _row("deeply nested spec JSON", status, ("INVALID_ARGUMENT",))


def overflowing_scale(atk: Attacker) -> dict[str, Any]:
    _, info = atk.open()
    if info is None:
        return _row("int8 frame with a scale of 1e38", "no session", ())
    upload(atk, info)
    sid, n = info.session_id, len(atk.spec.taps)
    begin = StepBegin(sid, 0, torch.ones(2, dtype=torch.int32), torch.arange(2), torch.zeros(2))
    frame = bytearray(encode(torch.randn(2, atk.spec.side.hidden_size), CodecConfig("int8")))
    at = len(frame) - (8 + 2 * atk.spec.side.hidden_size)
    frame[at : at + 4] = torch.tensor([1e38], dtype=torch.float32).numpy().tobytes()
    chunks = [ActivationChunk(sid, 0, t, 0, True, bytes(frame)) for t in range(n)]
    return _row("int8 frame with a scale of 1e38", atk.train(info, [begin, *chunks]),
                ("INVALID_ARGUMENT",))  # fmt: skip


def plaintext_device(atk: Attacker) -> dict[str, Any]:
    try:
        GrpcTransport("192.0.2.1:50051")
        status = "connected"
    except ConfigError:
        status = "refused by the device"
    return _row("device asked to send plaintext to a non-loopback host", status,
                ("refused by the device",))  # fmt: skip


def poisoning(atk: Attacker) -> dict[str, Any]:
    """Upload the public head tensors with another norm epsilon, before the victim."""
    d = json.loads(atk.spec.to_json())
    d["head"]["norm_eps"] = 1e30
    status, info = atk.open(json.dumps(d))
    up = upload(atk, info) if info is not None else status
    note = "accepted, but cached under its own settings: the victim uploads its own"
    return _row("head-cache poisoning (public head, norm_eps 1e30)", up, ("OK",), note)


__all__ = ["Attacker", "RemoteError", "poisoning", "replay_all"]
