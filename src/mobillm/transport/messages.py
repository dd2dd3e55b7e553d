"""The messages device and server exchange: the only types the two sides share.

A session is: ``SessionSpec`` -> ``SessionInfo``; optionally the frozen head (safetensors bytes);
then per step one ``StepBegin`` (labels and row layout) followed by, for each tapped layer in
order, one or more ``ActivationChunk`` (codec bytes, split into bounded chunks); the server
answers each completed step with an ``Ack``. In private-label mode (``SessionSpec.
private_labels``) a ``StepBegin`` carries no labels or targets: the server answers the step's
frames with its ``Features``, the device answers those with a ``Gradient``, and then the
server trains and acks. Validation steps (``StepBegin.validation``) are
scored, never trained on. ``Finish`` then trains the remaining epochs from the server's
activation cache, one ``EpochReport`` per epoch, and keeps the best epoch by validation
accuracy. At the end the device downloads the side network (``SideBlob``). No token ids and no
text ever appear in these types.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import torch

from mobillm.codec import CodecConfig
from mobillm.config import Config, check
from mobillm.errors import MobiLLMError
from mobillm.fingerprint import BackboneFingerprint
from mobillm.side.config import SideConfig
from mobillm.side.head import HeadSpec

# 2: Train answers with TrainReply (an Ack or, in private-label mode, Features)
PROTOCOL_VERSION = 2
POSITIONS = ("loss", "valid", "all")
SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_CHUNK_BYTES = 1 << 20
# Private labels: steps a server queues, decoded, behind one that waits for its gradient; a
# device keeps no more than this many steps in flight.
MAX_PRIVATE_WINDOW = 8
MAX_EPOCHS = 100
# The frozen head's safetensors bytes: one blob, or its pieces in order (the device streams
# them from the weights, ``side.io.safetensors_stream``, and never holds the whole upload).
HeadBytes = bytes | Iterable[bytes | memoryview]


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Server-side optimisation: AdamW with linear warm-up then ``schedule`` decay to 0.

    ``total_steps`` counts optimizer steps over all ``epochs``. With ``replay`` the device
    streams the training set once and the server replays epochs 2..N from its activation
    cache, so they cost the device nothing; without it the device re-streams every epoch in
    ``epoch_step_order``. Both train on the same sequence of steps.
    """

    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "cosine"
    total_steps: int = 0
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    epochs: int = 1
    replay: bool = True

    def validate(self) -> None:
        check(0 < self.lr < 1, f"TrainConfig.lr must be in (0, 1), got {self.lr}")
        check(self.weight_decay >= 0, "TrainConfig.weight_decay must be >= 0")
        check(0 <= self.warmup_ratio < 1, "TrainConfig.warmup_ratio must be in [0, 1)")
        check(self.schedule in SCHEDULES, f"TrainConfig.schedule must be one of {SCHEDULES}")
        check(self.total_steps >= 0, "TrainConfig.total_steps must be >= 0")
        check(self.grad_clip >= 0, "TrainConfig.grad_clip must be >= 0 (0 = off)")
        check(0 <= self.label_smoothing < 1, "TrainConfig.label_smoothing must be in [0, 1)")
        check(1 <= self.epochs <= MAX_EPOCHS, f"TrainConfig.epochs must be in [1, {MAX_EPOCHS}]")


@dataclasses.dataclass(frozen=True)
class SessionSpec(Config):
    """What a device proposes: backbone identity, taps, codec, task, side network, training."""

    fingerprint: BackboneFingerprint
    taps: tuple[int, ...]
    side: SideConfig
    head: HeadSpec
    head_sha256: str
    codec: CodecConfig = dataclasses.field(default_factory=CodecConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    positions: str = "loss"
    protocol: int = PROTOCOL_VERSION
    client: str = ""
    private_labels: bool = False

    def validate(self) -> None:
        fp = self.fingerprint
        check(self.positions in POSITIONS, f"SessionSpec.positions must be one of {POSITIONS}")
        check(
            len(self.taps) > 0 and list(self.taps) == sorted(set(self.taps)),
            f"SessionSpec.taps must be sorted, unique and non-empty: {self.taps}",
        )
        check(
            all(0 <= t < fp.num_layers for t in self.taps),
            f"SessionSpec.taps {self.taps} out of range for {fp.num_layers} layers",
        )
        split = self.side.kind == "split"
        if split:
            boundary = fp.num_layers - 1 - self.side.split_layers
            check(
                self.side.split_layers < fp.num_layers and self.taps == (boundary,),
                f"split mode over the top {self.side.split_layers} of {fp.num_layers} layers "
                f"taps exactly layer {boundary}, got {self.taps}",
            )
            check(self.positions == "valid", "split mode needs positions='valid' (every token)")
        else:
            check(
                self.taps[-1] == fp.num_layers - 1,
                "SessionSpec.taps must include the last layer (the head reads it)",
            )
        if self.side.kind == "transformer":
            check(self.positions == "valid", "a side transformer needs positions='valid'")
        check(
            self.side.num_taps == len(self.taps),
            f"side network has {self.side.num_taps} taps, session taps {len(self.taps)} layers",
        )
        check(
            self.side.hidden_size == fp.hidden_size == self.head.hidden_size,
            "hidden sizes of side network, head and backbone differ",
        )
        rows = self.side.head_rows
        if self.private_labels:
            # the LM-head rows would name the verbalizers (or be the head the device keeps)
            check(self.head.vocab_rows == 0, "a private-label session uploads no LM-head rows")
        check(
            self.private_labels or rows is None or self.head.vocab_rows == len(rows),
            "head spec carries the wrong number of LM rows for this task",
        )
        check(
            self.private_labels or rows is not None or self.head.vocab_rows == fp.vocab_size,
            "causal-LM tuning needs the whole LM head",
        )
        check(
            self.side.mixer == "none" or self.positions == "valid",
            "a side network that mixes rows (mixer='attention') needs positions='valid'",
        )
        check(
            not (self.side.pooling == "mean" and self.positions != "valid"),
            "pooling='mean' needs positions='valid' (every real token, no padding)",
        )
        check(
            not (self.side.task == "causal_lm" and self.positions == "all"),
            "causal-LM tuning takes positions 'loss' or 'valid'",
        )
        check(len(self.head_sha256) == 64, "SessionSpec.head_sha256 must be a sha256 hex digest")
        # the whole head is the backbone's, unless layers ride with it (split, transformer)
        head_only = self.side.kind == "ladder"
        check(
            rows is not None
            or not head_only
            or self.private_labels
            or self.head_sha256 == fp.head_sha256,
            "SessionSpec.head_sha256 differs from the backbone's head hash: the head to upload "
            "is not this backbone's",
        )


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    """The server's acceptance: ids, the bearer token, and whether it needs the head uploaded."""

    session_id: str
    token: str
    need_head: bool
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    server: str = ""


@dataclasses.dataclass
class StepBegin:
    """Opens step ``step``: the row layout of its activations and its labels.

    Rows are the selected token positions of the batch, grouped by sample in order.
    ``rows_per_sample`` (B,) int; ``pool_rows`` (B,) the row each sample's classifier reads;
    ``labels`` (B,) class ids (classification) or None; ``targets`` (rows,) next-token ids with
    -100 where no loss is taken (causal LM) or None. A ``validation`` step is scored with the
    side network as it stands and kept for scoring every later epoch; it is never trained on.

    Private-label sessions send neither labels nor targets: ``loss_mask`` (rows,) bool marks
    the rows that carry loss (causal LM), and ``replay_of`` asks for cached step ``replay_of``
    (the index among the cached train steps, or validation steps for a ``validation`` step)
    to be run again as this step, with no frames following.
    """

    session_id: str
    step: int
    rows_per_sample: torch.Tensor
    pool_rows: torch.Tensor
    labels: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    validation: bool = False
    loss_mask: torch.Tensor | None = None
    replay_of: int | None = None

    @property
    def num_samples(self) -> int:
        return int(self.rows_per_sample.numel())

    @functools.cached_property
    def num_rows(self) -> int:
        # cached: a server reads it for every chunk, and the layout of a step never changes
        return int(self.rows_per_sample.sum())


@dataclasses.dataclass(frozen=True)
class ResumeState:
    """Where a session stands after a reconnect: the steps the server holds (the next step the
    device sends is ``steps_done``), the optimizer steps taken on them, and whether the server
    still lacks the frozen head (an upload that broke off)."""

    steps_done: int
    optimizer_steps: int
    need_head: bool = False
    last_ack: Ack | None = None


@dataclasses.dataclass
class ActivationChunk:
    """Part ``seq`` of tapped layer ``tap``'s codec frame for step ``step``; ``last`` ends it."""

    session_id: str
    step: int
    tap: int
    seq: int
    last: bool
    data: bytes


@dataclasses.dataclass
class Features:
    """Private-label mode, server to device: step ``step``'s side-network output features,
    float32 ``(rows, out_size)``: one row per sample (classification, pooled as the
    classifier reads them) or per loss row (causal LM)."""

    step: int
    data: torch.Tensor


@dataclasses.dataclass
class Gradient:
    """Private-label mode, device to server: d loss / d ``Features.data`` for step ``step``
    (None for a validation step, which trains nothing) and the squared norm of the gradients
    of the parameters the device holds (clipping covers the whole model). The loss and the
    accuracy stay on the device: the server's ack reports NaN for them."""

    session_id: str
    step: int
    grad: torch.Tensor | None
    device_sq_norm: float = 0.0


@dataclasses.dataclass
class Ack:
    """The server trained step ``step``: its loss and a few metrics (lr, accuracy, ...)."""

    step: int
    loss: float
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


# What the server answers on a Train stream.
Reply = Ack | Features


@dataclasses.dataclass
class EpochReport:
    """One finished epoch: train loss, validation score, and which epoch is kept so far.

    ``epoch`` counts from 1; epoch 0 in ``metrics["best_epoch"]`` means the untrained side
    network (the frozen backbone) scored best on the validation split and is what is kept.
    ``last`` marks the final report, after which the side network holds the kept epoch.
    """

    epoch: int
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    last: bool = False


def epoch_step_order(num_steps: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` (0 = as streamed) visits the first epoch's steps.

    The server replays its cache in this order, and a device without a cache re-streams its
    batches in it, so both paths train on the same sequence of steps.
    """
    if epoch == 0:
        return list(range(num_steps))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_steps, generator=g).tolist()


@dataclasses.dataclass
class SideBlob:
    """A downloaded side network: ``side.json`` text and ``side.safetensors`` bytes."""

    meta_json: str
    weights: bytes


# Status codes shared by every transport; gRPC maps them to grpc.StatusCode of the same name.
CODES = (
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "NOT_FOUND",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "ALREADY_EXISTS",
    "INTERNAL",
    "UNAVAILABLE",
)


class RemoteError(MobiLLMError):
    """The other side refused a message; ``code`` is one of ``CODES``."""

    MAX_MESSAGE_CHARS = 400

    def __init__(self, code: str, message: str) -> None:
        # messages often quote what the other side sent; a refusal must not echo megabytes
        # into logs and replies
        if len(message) > self.MAX_MESSAGE_CHARS:
            cut = len(message) - self.MAX_MESSAGE_CHARS
            message = f"{message[: self.MAX_MESSAGE_CHARS]}... ({cut} more characters)"
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def chunk_frame(
    session_id: str, step: int, tap: int, frame: bytes, max_chunk: int
) -> list[ActivationChunk]:
    """Split one layer's codec frame into chunks of at most ``max_chunk`` bytes."""
    parts = [frame[i : i + max_chunk] for i in range(0, len(frame), max_chunk)] or [b""]
    return [
        ActivationChunk(session_id, step, tap, i, i == len(parts) - 1, p)
        for i, p in enumerate(parts)
    ]


def spec_summary(spec: SessionSpec) -> dict[str, Any]:
    """A short description of a session for logs."""
    return {
        "backbone": spec.fingerprint.short(),
        "taps": len(spec.taps),
        "codec": spec.codec.scheme,
        "task": spec.side.task,
        "positions": spec.positions,
        "width": spec.side.width,
    }
