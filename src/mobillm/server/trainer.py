"""The server's training loop for one session: frames in, side-network steps out.

Frames of a step arrive tap by tap; each decoded layer is folded into the ladder at once, so
the server's side forward overlaps the arrival of later layers. When the last layer arrives
the trainer computes the loss, back-propagates through the side network only, and steps AdamW.
"""

from __future__ import annotations

import math
import threading
import time

import torch
import torch.nn.functional as F

from mobillm.codec import CodecError, decode, encoded_nbytes, read_header
from mobillm.side.head import FrozenHead
from mobillm.side.model import SideNetwork, same_sample_mask
from mobillm.transport.messages import Ack, ActivationChunk, RemoteError, SessionSpec, StepBegin

IGNORE = -100
_INIT_LOCK = threading.Lock()


def lr_lambda(total: int, warmup_ratio: float, schedule: str):
    """Multiplier on the base LR at each step: linear warm-up, then the chosen decay to zero."""
    warmup = max(1, round(total * warmup_ratio)) if total else 0

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if not total or schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _bad(msg: str) -> RemoteError:
    return RemoteError("INVALID_ARGUMENT", msg)


class _Pending:
    """One step in progress: its labels, the ladder state so far, and the chunks of one layer."""

    def __init__(self, begin: StepBegin, frame_nbytes: int, mixes: bool) -> None:
        self.begin = begin
        self.row_sample = torch.repeat_interleave(
            torch.arange(begin.num_samples), begin.rows_per_sample.long()
        )
        self.frame_nbytes = frame_nbytes
        self.same = same_sample_mask(begin.rows_per_sample) if mixes else None
        self.next_tap = 0
        self.next_seq = 0
        self.parts: list[bytes] = []
        self.received = 0
        self.state: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None
        self.started = time.perf_counter()


class Trainer:
    """Trains one session's side network on the frames its device streams."""

    def __init__(
        self, spec: SessionSpec, head: FrozenHead, device: str = "cpu", max_rows: int = 1 << 16
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.max_rows = max_rows
        # Seed the initial weights, and give dropout its own generator, without touching other
        # sessions' random streams: a session's run is the same whoever else is training.
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.train.seed)
            self.net = SideNetwork(spec.side, head).to(self.device)
        self.net.seed_dropout(spec.train.seed + 1)
        self.net.train()
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        tc = spec.train
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": tc.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=tc.lr,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(tc.total_steps, tc.warmup_ratio, tc.schedule)
        )
        self.steps_done = 0
        self.samples_seen = 0
        self.bytes_received = 0
        self._pending: _Pending | None = None

    # --- message handling -------------------------------------------------------------------
    def begin(self, msg: StepBegin) -> None:
        """Open a step; reject it unless it is the next one and its labels are well formed."""
        if self._pending is not None:
            raise RemoteError(
                "FAILED_PRECONDITION",
                f"step {msg.step} began before step {self._pending.begin.step} ended",
            )
        if msg.step != self.steps_done:
            raise RemoteError(
                "FAILED_PRECONDITION", f"expected step {self.steps_done}, got step {msg.step}"
            )
        self._check_begin(msg)
        nbytes = encoded_nbytes((msg.num_rows, self.spec.side.hidden_size), self.spec.codec)
        self._pending = _Pending(msg, nbytes, self.spec.side.mixer != "none")

    def _check_begin(self, msg: StepBegin) -> None:
        side = self.spec.side
        b = msg.num_samples
        if b == 0 or msg.rows_per_sample.ndim != 1 or (msg.rows_per_sample < 1).any():
            raise _bad("rows_per_sample must be a non-empty 1-D tensor of positive counts")
        n = msg.num_rows
        if n > self.max_rows:
            raise RemoteError("RESOURCE_EXHAUSTED", f"{n} rows in one step; limit {self.max_rows}")
        if msg.pool_rows.shape != (b,) or (msg.pool_rows < 0).any() or (msg.pool_rows >= n).any():
            raise _bad(f"pool_rows must hold {b} row indices in [0, {n})")
        if side.task == "classification":
            if msg.labels is None or msg.labels.shape != (b,):
                raise _bad(f"classification step needs labels of shape ({b},)")
            if (msg.labels < 0).any() or (msg.labels >= side.num_labels).any():
                raise _bad(f"labels must be class ids in [0, {side.num_labels})")
        else:
            t = msg.targets
            if t is None or t.shape != (n,):
                raise _bad(f"causal-LM step needs targets of shape ({n},)")
            vocab = self.spec.head.vocab_rows
            ok = (t == IGNORE) | ((t >= 0) & (t < vocab))
            if not ok.all():
                raise _bad(f"targets must be token ids in [0, {vocab}) or {IGNORE}")
            if not (t != IGNORE).any():
                raise _bad("causal-LM step has no loss positions")

    def add_chunk(self, chunk: ActivationChunk) -> Ack | None:
        """Take one chunk; returns the step's Ack once its last layer has been trained on."""
        p = self._pending
        if p is None or chunk.step != p.begin.step:
            raise RemoteError(
                "FAILED_PRECONDITION", f"chunk for step {chunk.step} but no such step is open"
            )
        if chunk.tap != p.next_tap or chunk.seq != p.next_seq:
            raise _bad(
                f"expected tap {p.next_tap} chunk {p.next_seq}, "
                f"got tap {chunk.tap} chunk {chunk.seq} (frames must arrive in order)"
            )
        p.received += len(chunk.data)
        self.bytes_received += len(chunk.data)
        if p.received > p.frame_nbytes:
            raise RemoteError(
                "RESOURCE_EXHAUSTED",
                f"tap {chunk.tap} frame exceeds the {p.frame_nbytes} bytes that "
                f"{p.begin.num_rows} rows take with codec {self.spec.codec.scheme}",
            )
        p.parts.append(chunk.data)
        p.next_seq += 1
        if not chunk.last:
            return None
        frame = b"".join(p.parts)
        p.parts, p.next_seq, p.received = [], 0, 0
        h = self._decode(frame, p)
        p.state = self.net.step(p.state, chunk.tap, h, p.same)
        p.next_tap += 1
        if p.next_tap < len(self.spec.taps):
            return None
        p.last_hidden = h
        return self._finish(p)

    def _decode(self, frame: bytes, p: _Pending) -> torch.Tensor:
        want = (p.begin.num_rows, self.spec.side.hidden_size)
        try:
            header = read_header(frame, max_frame_bytes=p.frame_nbytes)
            if header.scheme != self.spec.codec.scheme:
                raise _bad(
                    f"frame uses codec {header.scheme}, session agreed on {self.spec.codec.scheme}"
                )
            h = decode(frame, max_frame_bytes=p.frame_nbytes)
        except CodecError as e:
            raise _bad(f"tap {p.next_tap} frame of step {p.begin.step}: {e}") from None
        if tuple(h.shape) != want:
            raise _bad(f"tap {p.next_tap} frame has shape {tuple(h.shape)}, step needs {want}")
        return h.to(self.device)

    def _finish(self, p: _Pending) -> Ack:
        b, side = p.begin, self.spec.side
        assert p.state is not None and p.last_hidden is not None
        feats = self.net.finish(p.state, p.last_hidden)
        metrics: dict[str, float] = {}
        if side.task == "classification":
            logits = self.net.logits(
                feats, b.pool_rows.to(self.device), p.row_sample.to(self.device), b.num_samples
            )
            labels = b.labels.to(self.device)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.spec.train.label_smoothing)
            metrics["accuracy"] = float((logits.argmax(-1) == labels).float().mean())
        else:
            keep = b.targets != IGNORE
            logits = self.net.logits(feats[keep.to(self.device)])
            loss = F.cross_entropy(logits, b.targets[keep].to(self.device))
            metrics["tokens"] = float(keep.sum())
        if not torch.isfinite(loss):
            self._pending = None
            raise RemoteError("INTERNAL", f"loss is {loss.item()} at step {b.step}; step skipped")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.spec.train.grad_clip:
            gn = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.spec.train.grad_clip)
            metrics["grad_norm"] = float(gn)
        metrics["lr"] = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.steps_done += 1
        self.samples_seen += b.num_samples
        self._pending = None
        metrics["samples"] = float(b.num_samples)
        metrics["server_ms"] = 1000 * (time.perf_counter() - p.started)
        return Ack(step=b.step, loss=float(loss.detach()), metrics=metrics)

    def abort_step(self) -> None:
        """Drop a half-received step (the device gave up on it); the next step reuses its id."""
        self._pending = None
