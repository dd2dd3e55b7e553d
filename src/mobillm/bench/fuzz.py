"""A message fuzzer for a running server: what a hostile or broken client could send.

It speaks raw gRPC (method paths, byte payloads), so nothing it sends has to parse: it starts
from valid messages of a real session (spec, head, steps of a tiny backbone) and mutates them,
as fields (huge or negative sizes, NaN, deep nesting, wrong ids and tokens) and as bytes (bit
flips, truncation, splicing, random bytes). Every RPC has a deadline; the outcome of each is
tallied by status. INTERNAL or UNKNOWN means the server mishandled a client mistake; a
DEADLINE_EXCEEDED means it hung.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from mobillm.codec import encode
from mobillm.transport import serde
from mobillm.transport.grpc_client import API_KEY_HEADER
from mobillm.transport.messages import ActivationChunk, SessionInfo, SessionSpec, StepBegin

SERVICE = "/mobillm.v1.SideTuning/"
DEADLINE_S = 30.0


@dataclass
class FuzzStats:
    messages: int = 0
    rpcs: int = 0
    statuses: Counter = field(default_factory=Counter)
    internal: list[str] = field(default_factory=list)  # first few INTERNAL/UNKNOWN details
    hangs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "rpcs": self.rpcs,
            "statuses": dict(self.statuses),
            "internal": len(self.internal),
            "internal_examples": self.internal[:5],
            "hangs": self.hangs,
        }


def _mutate_bytes(rnd: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rnd.randrange(6)
    if op == 0 and b:  # flip bits
        for _ in range(rnd.randint(1, 8)):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
    elif op == 1 and b:  # truncate
        del b[rnd.randrange(len(b)) :]
    elif op == 2:  # insert random bytes
        at = rnd.randrange(len(b) + 1)
        b[at:at] = rnd.randbytes(rnd.randint(1, 64))
    elif op == 3 and b:  # duplicate a range
        i = rnd.randrange(len(b))
        b[i:i] = b[i : i + rnd.randint(1, 256)]
    elif op == 4:  # random message
        return rnd.randbytes(rnd.randint(0, 512))
    elif b:  # overwrite with extremes
        i = rnd.randrange(len(b))
        b[i : i + 4] = rnd.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\x7f\x7f\x7f"])
    return bytes(b)


_EXTREMES: list[Any] = [
    0, -1, 1 << 31, 1 << 62, -(1 << 62), 1e308, -1e308, 1e-320, "x" * 5000, None, [], {},
    [[[[[]]]]], True, "NaN", float("nan"), float("inf"),
]  # fmt: skip


def _mutate_json(rnd: random.Random, d: Any) -> Any:
    """One field somewhere in ``d`` replaced, deleted or added."""
    if isinstance(d, dict) and d:
        k = rnd.choice(list(d))
        op = rnd.randrange(4)
        out = dict(d)
        if op == 0:
            del out[k]
        elif op == 1:
            out[k] = rnd.choice(_EXTREMES)
        elif op == 2:
            out[k] = _mutate_json(rnd, d[k])
        else:
            out[rnd.choice(["zz", "x" * 300, k + "_"])] = rnd.choice(_EXTREMES)
        return out
    if isinstance(d, list) and d:
        out_l = list(d)
        i = rnd.randrange(len(d))
        out_l[i] = rnd.choice([*_EXTREMES, _mutate_json(rnd, d[i])])
        return out_l
    return rnd.choice(_EXTREMES)


class Fuzzer:
    """Fuzzes the server at ``target`` with mutations of ``spec``'s session (``head`` bytes)."""

    def __init__(
        self, target: str, spec: SessionSpec, head: bytes, seed: int = 0, api_key: str = ""
    ) -> None:
        self.spec, self.head, self.api_key = spec, head, api_key
        self.rnd = random.Random(seed)
        self.stats = FuzzStats()
        opts = [("grpc.max_send_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(target, options=opts)
        self.sid, self.token = "", ""

    def _call(self, kind: str, method: str, payload: Any, md: Any = ()) -> bytes | None:
        """One RPC with raw bytes; ``payload`` is bytes (unary) or an iterator (stream)."""
        self.stats.rpcs += 1
        try:
            if kind == "unary":
                self.stats.messages += 1
                fn = self.channel.unary_unary(SERVICE + method)
                out = fn(payload, timeout=DEADLINE_S, metadata=md)
            elif kind == "client_stream":
                fn = self.channel.stream_unary(SERVICE + method)
                out = fn(self._count(payload), timeout=DEADLINE_S, metadata=md)
            elif kind == "server_stream":
                self.stats.messages += 1
                fn = self.channel.unary_stream(SERVICE + method)
                out = b"".join(fn(payload, timeout=DEADLINE_S, metadata=md))
            else:
                fn = self.channel.stream_stream(SERVICE + method)
                out = b"".join(fn(self._count(payload), timeout=DEADLINE_S, metadata=md))
            self.stats.statuses["OK"] += 1
            return out
        except grpc.RpcError as e:
            code = e.code().name  # type: ignore[attr-defined]
            self.stats.statuses[code] += 1
            if code in ("INTERNAL", "UNKNOWN") and len(self.stats.internal) < 20:
                self.stats.internal.append(f"{method}: {e.details()}")  # type: ignore[attr-defined]
            if code == "DEADLINE_EXCEEDED":
                self.stats.hangs += 1
            return None

    def _count(self, it: Iterator[bytes]) -> Iterator[bytes]:
        for m in it:
            self.stats.messages += 1
            yield m

    def _md(self, mutate: bool = False) -> tuple[tuple[str, str], ...]:
        sid, tok = self.sid, self.token
        if mutate:
            sid = self.rnd.choice([sid, "", "0" * 16, "../" * 5, sid[:-1] + "0", "%" * 4])
            tok = self.rnd.choice([tok, "", "x" * 10_000, tok[::-1]])
        return (("authorization", f"Bearer {tok}"), ("x-mobillm-session", sid))

    def _key(self, mutate: bool = False) -> tuple[tuple[str, str], ...]:
        key = self.api_key
        if mutate:
            key = self.rnd.choice(["", "mk_0_0", key[:-1], key + "x", "x" * 5000])
        return ((API_KEY_HEADER, key),) if key else ()

    # --- the scenarios ----------------------------------------------------------------------
    def open_session(self) -> None:
        """A valid session of the fuzzer's own, so mutations reach the authorized code."""
        request = serde.spec_to_proto(self.spec).SerializeToString()
        reply = self._call("unary", "OpenSession", request, self._key())
        if reply is None:
            return
        # the reply's message class, without naming the generated module (serde owns it)
        cls = type(serde.session_info_to_proto(SessionInfo("-", "-", False, 1, "")))
        info = serde.session_info_from_proto(cls.FromString(reply))
        self.sid, self.token = info.session_id, info.token
        parts = serde.head_parts(self.sid, self.head, 1 << 20)
        self._call(
            "client_stream",
            "UploadHead",
            iter([serde.head_part_to_proto(p).SerializeToString() for p in parts]),
            self._md(),
        )

    def _valid_step(self, step: int) -> list[bytes]:
        rows = self.rnd.randint(1, 8)
        begin = StepBegin(
            self.sid,
            step,
            torch.ones(rows, dtype=torch.int32),
            torch.arange(rows),
            torch.randint(0, self.spec.side.num_labels, (rows,)),
        )
        out = [serde.train_request_to_proto(begin).SerializeToString()]
        for tap in range(len(self.spec.taps)):
            frame = encode(torch.randn(rows, self.spec.side.hidden_size), self.spec.codec)
            chunk = ActivationChunk(self.sid, step, tap, 0, True, frame)
            out.append(serde.train_request_to_proto(chunk).SerializeToString())
        return out

    def fuzz_open(self) -> None:
        d = self.spec.to_dict()
        for _ in range(self.rnd.randint(1, 3)):
            d = _mutate_json(self.rnd, d)
        req = serde.spec_to_proto(self.spec)
        try:
            req.spec_json = json.dumps(d)
        except (ValueError, TypeError):
            req.spec_json = "{"
        data = req.SerializeToString()
        if self.rnd.random() < 0.3:
            data = _mutate_bytes(self.rnd, data)
        self._call("unary", "OpenSession", data, self._key(self.rnd.random() < 0.2))

    def fuzz_train(self) -> None:
        msgs = self._valid_step(self.rnd.randrange(3))
        if self.rnd.random() < 0.5:
            msgs = msgs + self._valid_step(self.rnd.randrange(3))
        out = [_mutate_bytes(self.rnd, m) if self.rnd.random() < 0.3 else m for m in msgs]
        if self.rnd.random() < 0.2:
            self.rnd.shuffle(out)
        self._call("bidi", "Train", iter(out), self._md(self.rnd.random() < 0.2))

    def fuzz_head(self) -> None:
        parts = [serde.head_part_to_proto(p) for p in serde.head_parts(self.sid, self.head, 4096)]
        data = [p.SerializeToString() for p in parts[: self.rnd.randint(0, len(parts))]]
        data = [_mutate_bytes(self.rnd, m) if self.rnd.random() < 0.5 else m for m in data]
        self._call("client_stream", "UploadHead", iter(data), self._md(self.rnd.random() < 0.3))

    def fuzz_unary(self) -> None:
        sid = self.sid if self.rnd.random() < 0.7 else self.rnd.choice(["", "zz", "0" * 16])
        method, kind, req = self.rnd.choice(
            [
                ("Resume", "unary", serde.resume_request_to_proto(sid)),
                ("Download", "server_stream", serde.download_request_to_proto(sid)),
                ("Finish", "server_stream", serde.finish_request_to_proto(sid)),
            ]
        )
        data = req.SerializeToString()
        if self.rnd.random() < 0.3:
            data = _mutate_bytes(self.rnd, data)
        self._call(kind, method, data, self._md(self.rnd.random() < 0.3))

    def run(self, messages: int, seconds: float, progress: Callable[[int], None] | None = None):
        """Fuzz until ``messages`` are sent or ``seconds`` pass; returns the tallies."""
        t0 = time.monotonic()
        scenarios = [self.fuzz_open, self.fuzz_train, self.fuzz_train, self.fuzz_head]
        scenarios += [self.fuzz_unary]
        last = 0
        while self.stats.messages < messages and time.monotonic() - t0 < seconds:
            if not self.sid or self.rnd.random() < 0.01:
                self.open_session()
            self.rnd.choice(scenarios)()
            if progress is not None and self.stats.messages - last >= 5000:
                last = self.stats.messages
                progress(last)
        self.stats_seconds = time.monotonic() - t0
        return self.stats

    def close(self) -> None:
        self.channel.close()
