"""Conversions between the wire (generated protobuf classes) and ``transport.messages`` types.

The only module that imports the generated message code: everything else speaks the Python
types of ``messages.py``. Every ``*_from_proto`` validates what it reads and raises
``RemoteError("INVALID_ARGUMENT", ...)`` with a message a person can act on, so a malformed
message is refused at the boundary, before it reaches a trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from mobillm.errors import ConfigError
from mobillm.proto.v1 import mobillm_pb2 as pb
from mobillm.transport.messages import (
    Ack,
    ActivationChunk,
    EpochReport,
    Features,
    Gradient,
    HeadBytes,
    RemoteError,
    ResumeState,
    SessionInfo,
    SessionSpec,
    SideBlob,
    StepBegin,
)

# Integer arrays travel as packed little-endian bytes; this caps the values in one array. It
# is a sanity bound far above any real batch: the gRPC message size limit binds first.
MAX_ITEMS = 1 << 22
# Room for a message's fields around its bulk bytes (ids, flags, the spec, a chunk's meta).
ENVELOPE_BYTES = 64 << 10
# The largest session spec a server parses (a real one, split layers' config included, is a few KB).
MAX_SPEC_CHARS = 48 << 10
# The largest chunk any server may announce (the upper bound ServerConfig accepts).
MAX_CHUNK_BYTES = 4 << 20
INT32, INT64 = np.dtype("<i4"), np.dtype("<i8")


def _bad(msg: str) -> RemoteError:
    return RemoteError("INVALID_ARGUMENT", msg)


# --- session handshake ----------------------------------------------------------------------
def spec_to_proto(spec: SessionSpec) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(spec_json=spec.to_json(indent=None))


def spec_from_proto(req: pb.OpenSessionRequest) -> SessionSpec:
    """The proposed spec; its Config classes validate it and say precisely what is wrong."""
    if len(req.spec_json) > MAX_SPEC_CHARS:
        raise RemoteError(
            "RESOURCE_EXHAUSTED",
            f"session spec of {len(req.spec_json)} characters; limit {MAX_SPEC_CHARS}",
        )
    try:
        return SessionSpec.from_json(req.spec_json)
    except ConfigError as e:
        raise _bad(f"session spec refused: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        # A value of the wrong JSON type can fail inside validate() before check() sees it.
        raise _bad(f"session spec malformed: {type(e).__name__}: {e}") from None


def session_info_to_proto(info: SessionInfo) -> pb.OpenSessionReply:
    return pb.OpenSessionReply(
        session_id=info.session_id,
        token=info.token,
        need_head=info.need_head,
        max_chunk_bytes=info.max_chunk_bytes,
        server=info.server,
    )


def session_info_from_proto(msg: pb.OpenSessionReply) -> SessionInfo:
    if not msg.session_id or not msg.token or msg.max_chunk_bytes <= 0:
        raise _bad("server's session reply lacks an id, a token or a chunk size")
    return SessionInfo(
        msg.session_id, msg.token, msg.need_head, int(msg.max_chunk_bytes), msg.server
    )


# --- frozen head upload ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeadPart:
    """Chunk ``seq`` of the frozen head's safetensors bytes; ``last`` ends the upload."""

    session_id: str
    seq: int
    last: bool
    data: bytes


def _fixed_chunks(pieces: Iterable[bytes | memoryview], size: int) -> Iterator[bytes]:
    """The bytes of ``pieces`` cut into chunks of ``size`` (the last shorter; one empty chunk
    if there are no bytes). Each piece is copied out before the next is asked for."""
    buf, sent = bytearray(), False
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while view:
            n = min(size - len(buf), len(view))
            buf += view[:n]
            view = view[n:]
            if len(buf) == size:
                yield bytes(buf)
                buf.clear()
                sent = True
    if buf or not sent:
        yield bytes(buf)


def head_parts(session_id: str, data: HeadBytes, max_chunk: int) -> Iterator[HeadPart]:
    """The head's bytes, one blob or pieces of any size, as chunks of ``max_chunk`` bytes
    (the last shorter), numbered and made as they are sent: one chunk ahead of the sender,
    so ``last`` is known when the final chunk goes out."""
    pieces = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    chunks = _fixed_chunks(pieces, max_chunk)
    seq, held = 0, next(chunks)
    for chunk in chunks:
        yield HeadPart(session_id, seq, False, held)
        seq, held = seq + 1, chunk
    yield HeadPart(session_id, seq, True, held)


def head_part_to_proto(part: HeadPart) -> pb.HeadChunk:
    return pb.HeadChunk(session_id=part.session_id, seq=part.seq, last=part.last, data=part.data)


def head_part_from_proto(msg: pb.HeadChunk) -> HeadPart:
    return HeadPart(msg.session_id, msg.seq, msg.last, msg.data)


def upload_reply_to_proto(nbytes: int) -> pb.UploadHeadReply:
    return pb.UploadHeadReply(bytes=nbytes)


def upload_reply_from_proto(msg: pb.UploadHeadReply) -> int:
    return int(msg.bytes)


# --- training stream ------------------------------------------------------------------------
def _pack(t: torch.Tensor, dtype: np.dtype, name: str) -> bytes:
    arr = t.detach().cpu().reshape(-1).to(torch.int64).numpy()
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise _bad(f"StepBegin.{name} holds values outside {dtype.name}")
    return arr.astype(dtype).tobytes()


def _unpack(data: bytes, dtype: np.dtype, name: str, max_items: int) -> torch.Tensor:
    size = dtype.itemsize
    if len(data) % size:
        raise _bad(
            f"StepBegin.{name}: {len(data)} bytes is not a whole number of {size}-byte "
            f"little-endian int{8 * size} values (truncated or wrong type)"
        )
    n = len(data) // size
    if n > max_items:
        raise _bad(f"StepBegin.{name}: {n} values; limit {max_items}")
    native = np.int32 if size == 4 else np.int64
    # astype copies into a writable native array, which torch can own.
    return torch.from_numpy(np.frombuffer(data, dtype=dtype).astype(native))


def step_begin_to_proto(msg: StepBegin) -> pb.StepBegin:
    out = pb.StepBegin(
        session_id=msg.session_id,
        step=msg.step,
        rows_per_sample=_pack(msg.rows_per_sample, INT32, "rows_per_sample"),
        pool_rows=_pack(msg.pool_rows, INT64, "pool_rows"),
        validation=msg.validation,
    )
    if msg.labels is not None:
        out.labels = _pack(msg.labels, INT64, "labels")
    if msg.targets is not None:
        out.targets = _pack(msg.targets, INT64, "targets")
    if msg.loss_mask is not None:
        out.loss_mask = msg.loss_mask.detach().cpu().to(torch.uint8).numpy().tobytes()
    if msg.replay_of is not None:
        out.replay_of = msg.replay_of
    return out


def step_begin_from_proto(msg: pb.StepBegin, max_items: int = MAX_ITEMS) -> StepBegin:
    """A StepBegin with (B,) int32 rows, (B,) int64 pool rows, int64 labels/targets or None."""
    rows = _unpack(msg.rows_per_sample, INT32, "rows_per_sample", max_items)
    if rows.numel() == 0:
        raise _bad("StepBegin.rows_per_sample is empty: a step needs at least one sample")
    pool = _unpack(msg.pool_rows, INT64, "pool_rows", max_items)
    labels = _unpack(msg.labels, INT64, "labels", max_items) if msg.HasField("labels") else None
    targets = _unpack(msg.targets, INT64, "targets", max_items) if msg.HasField("targets") else None
    mask = None
    if msg.HasField("loss_mask"):
        if len(msg.loss_mask) > max_items:
            raise _bad(f"StepBegin.loss_mask: {len(msg.loss_mask)} values; limit {max_items}")
        arr = np.frombuffer(msg.loss_mask, dtype=np.uint8)
        if arr.size and arr.max() > 1:
            raise _bad("StepBegin.loss_mask holds values other than 0 and 1")
        mask = torch.from_numpy(arr.astype(np.bool_))
    replay = int(msg.replay_of) if msg.HasField("replay_of") else None
    return StepBegin(
        msg.session_id, int(msg.step), rows, pool, labels, targets, msg.validation, mask, replay
    )


def _floats(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()


def _matrix(data: bytes, rows: int, name: str) -> torch.Tensor:
    """A float32 ``(rows, width)`` matrix from little-endian bytes, refused when ragged."""
    if rows <= 0 or len(data) % (4 * rows):
        raise _bad(f"{name}: {len(data)} bytes are not {rows} rows of float32 values")
    arr = np.frombuffer(data, dtype="<f4").astype(np.float32)
    return torch.from_numpy(arr).reshape(rows, -1)


def gradient_to_proto(g: Gradient) -> pb.Gradient:
    return pb.Gradient(
        session_id=g.session_id,
        step=g.step,
        data=b"" if g.grad is None else _floats(g.grad),
        device_sq_norm=g.device_sq_norm,
    )


def gradient_from_proto(msg: pb.Gradient) -> Gradient:
    """The gradient as a flat float32 vector (the server knows its shape) or None if empty."""
    if len(msg.data) % 4:
        raise _bad(f"Gradient.data: {len(msg.data)} bytes is not a whole number of float32")
    grad = _matrix(msg.data, 1, "Gradient.data")[0] if msg.data else None
    return Gradient(msg.session_id, int(msg.step), grad, float(msg.device_sq_norm))


def features_to_proto(f: Features) -> pb.Features:
    return pb.Features(step=f.step, rows=f.data.shape[0], data=_floats(f.data))


def features_from_proto(msg: pb.Features) -> Features:
    return Features(int(msg.step), _matrix(msg.data, int(msg.rows), "Features.data"))


def chunk_to_proto(msg: ActivationChunk) -> pb.ActivationChunk:
    return pb.ActivationChunk(
        session_id=msg.session_id,
        step=msg.step,
        tap=msg.tap,
        seq=msg.seq,
        last=msg.last,
        data=msg.data,
    )


def chunk_from_proto(msg: pb.ActivationChunk) -> ActivationChunk:
    return ActivationChunk(
        msg.session_id, int(msg.step), int(msg.tap), int(msg.seq), msg.last, msg.data
    )


def train_request_to_proto(msg: StepBegin | ActivationChunk | Gradient) -> pb.TrainRequest:
    if isinstance(msg, StepBegin):
        return pb.TrainRequest(begin=step_begin_to_proto(msg))
    if isinstance(msg, Gradient):
        return pb.TrainRequest(gradient=gradient_to_proto(msg))
    return pb.TrainRequest(chunk=chunk_to_proto(msg))


def train_request_from_proto(
    msg: pb.TrainRequest, max_items: int = MAX_ITEMS
) -> StepBegin | ActivationChunk | Gradient:
    kind = msg.WhichOneof("msg")
    if kind == "begin":
        return step_begin_from_proto(msg.begin, max_items)
    if kind == "chunk":
        return chunk_from_proto(msg.chunk)
    if kind == "gradient":
        return gradient_from_proto(msg.gradient)
    raise _bad("empty TrainRequest: it must carry a StepBegin, an ActivationChunk or a Gradient")


def ack_to_proto(ack: Ack) -> pb.Ack:
    return pb.Ack(step=ack.step, loss=ack.loss, metrics=ack.metrics)


def ack_from_proto(msg: pb.Ack) -> Ack:
    return Ack(int(msg.step), float(msg.loss), dict(msg.metrics))


def reply_to_proto(reply: Ack | Features) -> pb.TrainReply:
    if isinstance(reply, Features):
        return pb.TrainReply(features=features_to_proto(reply))
    return pb.TrainReply(ack=ack_to_proto(reply))


def reply_from_proto(msg: pb.TrainReply) -> Ack | Features:
    kind = msg.WhichOneof("msg")
    if kind == "features":
        return features_from_proto(msg.features)
    if kind == "ack":
        return ack_from_proto(msg.ack)
    raise _bad("empty TrainReply: it must carry an Ack or Features")


# --- finish: epochs from the cache ------------------------------------------------------------
def resume_request_to_proto(session_id: str) -> pb.ResumeRequest:
    return pb.ResumeRequest(session_id=session_id)


def resume_request_from_proto(msg: pb.ResumeRequest) -> str:
    return msg.session_id


def resume_reply_to_proto(state: ResumeState) -> pb.ResumeReply:
    out = pb.ResumeReply(
        steps_done=state.steps_done,
        optimizer_steps=state.optimizer_steps,
        need_head=state.need_head,
    )
    if state.last_ack is not None:
        out.last_ack.CopyFrom(ack_to_proto(state.last_ack))
    return out


def resume_reply_from_proto(msg: pb.ResumeReply) -> ResumeState:
    last = ack_from_proto(msg.last_ack) if msg.HasField("last_ack") else None
    return ResumeState(int(msg.steps_done), int(msg.optimizer_steps), msg.need_head, last)


def finish_request_to_proto(session_id: str) -> pb.FinishRequest:
    return pb.FinishRequest(session_id=session_id)


def finish_request_from_proto(msg: pb.FinishRequest) -> str:
    return msg.session_id


def epoch_report_to_proto(report: EpochReport) -> pb.EpochReport:
    return pb.EpochReport(epoch=report.epoch, metrics=report.metrics, last=report.last)


def epoch_report_from_proto(msg: pb.EpochReport) -> EpochReport:
    return EpochReport(int(msg.epoch), dict(msg.metrics), msg.last)


# --- download and close ---------------------------------------------------------------------
def download_request_to_proto(session_id: str) -> pb.DownloadRequest:
    return pb.DownloadRequest(session_id=session_id)


def download_request_from_proto(msg: pb.DownloadRequest) -> str:
    return msg.session_id


def blob_to_proto(blob: SideBlob, max_chunk: int) -> Iterator[pb.WeightsChunk]:
    """The side network in chunks of at most ``max_chunk`` weight bytes; meta in the first."""
    w = blob.weights
    n = max(1, -(-len(w) // max_chunk))
    for i in range(n):
        yield pb.WeightsChunk(
            seq=i,
            last=i == n - 1,
            data=w[i * max_chunk : (i + 1) * max_chunk],
            meta_json=blob.meta_json if i == 0 else "",
        )


def blob_from_proto(chunks: Iterable[pb.WeightsChunk]) -> SideBlob:
    """Reassemble a download; refuses chunks out of order or a stream without its last chunk."""
    meta, parts, done = "", [], False
    for i, c in enumerate(chunks):
        if done:
            raise RemoteError("INTERNAL", "download went on after its last chunk")
        if c.seq != i:
            raise RemoteError("INTERNAL", f"download chunk {c.seq} arrived as chunk {i}")
        if i == 0:
            meta = c.meta_json
        parts.append(c.data)
        done = c.last
    if not done:
        raise RemoteError("INTERNAL", "download ended before its last chunk")
    return SideBlob(meta, b"".join(parts))


def close_request_to_proto(session_id: str) -> pb.CloseSessionRequest:
    return pb.CloseSessionRequest(session_id=session_id)


def close_request_from_proto(msg: pb.CloseSessionRequest) -> str:
    return msg.session_id


def summary_to_proto(summary: dict[str, Any]) -> pb.CloseSessionReply:
    """Numbers go to ``summary``, anything else (a checkpoint path) to ``notes`` as text."""
    out = pb.CloseSessionReply()
    for k, v in summary.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out.summary[k] = float(v)
        else:
            out.notes[k] = str(v)
    return out


def summary_from_proto(msg: pb.CloseSessionReply) -> dict[str, Any]:
    # Counts come back as ints, as the in-process transport returns them.
    out: dict[str, Any] = {
        k: int(v) if float(v).is_integer() else float(v) for k, v in msg.summary.items()
    }
    out.update(msg.notes)
    return out
