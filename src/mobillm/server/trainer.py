"""The server's training loop for one session: frames in, side-network steps out.

Frames of a step arrive tap by tap; each decoded layer is folded into the ladder at once, so
the server's side forward overlaps the arrival of later layers. When the last layer arrives
the trainer computes the loss, back-propagates through the side network only, and steps AdamW.

Streamed steps are kept in the session's activation cache (when the session asks for more
than one epoch, and always for validation steps). ``run_epochs`` then replays the cache for the
remaining epochs through the same decode-and-fold path, scores the validation split after each
epoch, and keeps the best epoch, or the untrained network if no epoch beat it.

A private-label session (``SessionSpec.private_labels``) trains without seeing a label: when a
step's frames are in, the trainer runs the side network up to the features the head reads and
answers with them (``Features``); the device's ``Gradient`` for them is back-propagated, the
clipping norm combining both halves of the model, and the step is acked. Steps that arrive
meanwhile wait, decoded, in a short queue (the device's window bounds it), so each one's forward
sees the weights its predecessor left, exactly as in the standard mode. The device drives cache
epochs itself (``StepBegin.replay_of``) and scores the validation split.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mobillm.codec import CodecError, decode, encoded_nbytes, read_header
from mobillm.server.batching import Batcher, FlatState, Ready, stackable
from mobillm.server.budget import check_step
from mobillm.server.cache import ActivationCache, CachedStep
from mobillm.side.head import FrozenHead
from mobillm.side.learner import Learner, build_learner, seeded
from mobillm.side.model import SideNetwork
from mobillm.side.objective import IGNORE, correct, task_loss
from mobillm.side.optim import adamw, clip_coefficient
from mobillm.transport.messages import (
    DEFAULT_CHUNK_BYTES,
    MAX_PRIVATE_WINDOW,
    Ack,
    ActivationChunk,
    EpochReport,
    Features,
    Gradient,
    RemoteError,
    SessionSpec,
    StepBegin,
    epoch_step_order,
)


def use_tf32(device: str, on: bool) -> None:
    """On CUDA, let float32 matmuls use TF32 tensor cores (process-wide, as PyTorch's switch
    is): side-network steps are matmul-bound there. Nothing changes on CPU."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = on


def _bad(msg: str) -> RemoteError:
    return RemoteError("INVALID_ARGUMENT", msg)


def _row_sample(b: StepBegin) -> torch.Tensor:
    """Which sample each of a step's rows belongs to."""
    return torch.repeat_interleave(torch.arange(b.num_samples), b.rows_per_sample.long())


class _Pending:
    """One step in progress: its labels, the ladder state so far, and the chunks of one layer."""

    def __init__(self, begin: StepBegin, frame_nbytes: int, keep: bool, batched: bool) -> None:
        self.begin = begin
        self.frames: list[bytes] | None = [] if keep else None
        # a batched step keeps its decoded taps for the round instead of folding them now
        self.hidden: list[torch.Tensor] | None = [] if batched else None
        self.masks: torch.Tensor | None = None
        self.frame_nbytes = frame_nbytes
        self.next_tap = 0
        self.next_seq = 0
        self.parts: list[bytes] = []
        self.received = 0
        self.state: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None
        self.started = time.perf_counter()
        self.rng: torch.Tensor | None = None  # the dropout generator's state at its begin
        # private labels: the features sent (with their graph, unless a batched round runs
        # them again once the gradient is in)
        self.out: torch.Tensor | None = None


class Trainer:
    """Trains one session's side network on the frames its device streams."""

    def __init__(
        self,
        spec: SessionSpec,
        head: FrozenHead,
        device: str = "cpu",
        max_rows: int = 1 << 16,
        cache: ActivationCache | None = None,
        layers: dict[str, torch.Tensor] | None = None,
        max_step_bytes: int = 0,
        batcher: Batcher | None = None,
        max_features_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.max_step_bytes = max_step_bytes  # 0 = unpriced (a trusted, in-process caller)
        # private labels: Features and Gradient travel whole, as one message each
        self.max_features_bytes = max_features_bytes
        self.cache = cache
        # Seed the initial weights, and give dropout its own generator, without touching other
        # sessions' random streams: a session's run is the same whoever else is training.
        self.private = spec.private_labels
        if self.private and cache is None and spec.train.epochs > 1 and spec.train.replay:
            raise RemoteError(
                "FAILED_PRECONDITION",
                "this server keeps no activation cache, which a private-label session's cache "
                "epochs replay; train with --no-replay",
            )
        with seeded(spec.train.seed):
            self.net: Learner = build_learner(
                spec.side, head, layers, with_classifier=not self.private
            ).to(self.device)
        self.net.seed_dropout(spec.train.seed + 1)
        self._rng = self._generator()  # found once: begin() reads it every step
        self.net.train()
        tc = spec.train
        self.opt, self.sched = adamw(
            self.net.named_parameters(),
            tc.lr,
            tc.weight_decay,
            tc.total_steps,
            tc.warmup_ratio,
            tc.schedule,
        )
        self.steps_done = 0  # streamed steps acknowledged, train and validation
        self.replays = 0  # private labels: cached steps the device had run again
        self.optimizer_steps = 0
        self.samples_seen = 0
        self.bytes_received = 0
        self.epochs_done = 0
        self.finished = False
        self.reports: list[EpochReport] | None = None  # Finish's reports, once it completed
        self.last_ack: Ack | None = None  # private labels: resent to a device that lost it
        self._pending: _Pending | None = None
        self._awaiting: _Pending | None = None  # private labels: features sent, no gradient yet
        self._ready: deque[_Pending] = deque()  # private labels: frames in, forward not yet run
        self._epoch_losses: list[float] = []
        # the untrained network, the baseline every epoch must beat on the validation split
        self._initial = _copy_state(self.net)
        # Training steps of a stackable learner train in the batcher's rounds together with
        # other sessions'; validation steps here. A private-label step takes two rounds: its
        # features, without a graph, then its training once its device's gradient is in (no
        # round holds a step while the device answers).
        stacks = stackable(self.net)
        self.batcher = batcher if batcher is not None and stacks else None
        self.flat = FlatState(self.net, self.opt) if self.batcher is not None else None
        self.batch_key = (
            spec.head_sha256,
            spec.head,
            spec.side,
            0.0 if self.private else spec.train.label_smoothing,  # the device's, then
            self.private,
            str(self.device),
        )
        if self.batcher is not None:
            self.batcher.attach(self)

    # --- message handling -------------------------------------------------------------------
    def begin(self, msg: StepBegin) -> Features | None:
        """Open a step; reject it unless it is the next one and its labels are well formed.

        A private-label replay (``replay_of``) is complete at once: its Features, if the
        trainer is free to run it now."""
        if self._pending is not None:
            raise RemoteError(
                "FAILED_PRECONDITION",
                f"step {msg.step} began before step {self._pending.begin.step} ended",
            )
        if self.finished:
            raise RemoteError("FAILED_PRECONDITION", "the session has finished training")
        ahead = len(self._ready) + (self._awaiting is not None)
        if msg.step != self.steps_done + ahead:
            raise RemoteError(
                "FAILED_PRECONDITION",
                f"expected step {self.steps_done + ahead}, got step {msg.step}",
            )
        if ahead >= MAX_PRIVATE_WINDOW:
            raise RemoteError(
                "RESOURCE_EXHAUSTED",
                f"{ahead} steps wait for the gradient of step {self.steps_done}; send it first",
            )
        if msg.replay_of is not None:
            return self._begin_replay(msg)
        self._check_begin(msg)
        if msg.validation and self.cache is None:
            raise RemoteError("FAILED_PRECONDITION", "this server keeps no validation steps")
        keep = self.cache is not None and (msg.validation or self._replays)
        # a step that is dropped halfway must not have used up dropout draws: the device
        # resends it, and it must train exactly as if the first attempt never happened (taken
        # before _open, which draws the step's masks)
        rng = self._rng.get_state() if self._rng is not None else None
        collect = self.private or (self.batcher is not None and not msg.validation)
        self._pending = self._open(msg, keep, collect)
        self._pending.rng = rng
        return None

    def _begin_replay(self, msg: StepBegin) -> Features | None:
        """Private labels: run cached step ``msg.replay_of`` again as step ``msg.step``."""
        if not self.private:
            raise _bad("replay_of is for private-label sessions; the server replays the others")
        if self.cache is None:
            raise RemoteError("FAILED_PRECONDITION", "this server keeps no activation cache")
        i = msg.replay_of
        n = self.cache.num_validation if msg.validation else self.cache.num_train
        if i is None or not 0 <= i < n:
            kind = "validation" if msg.validation else "train"
            raise _bad(f"replay_of {i}: the cache holds {n} {kind} steps")
        self.replays += 1
        if self.replays > self._max_replays():
            raise RemoteError(
                "RESOURCE_EXHAUSTED",
                f"{self.replays} replays: more than the session's epochs and validation take",
            )
        cached = self.cache.validation_step(i) if msg.validation else self.cache.train_step(i)
        c = cached.begin
        if not torch.equal(c.rows_per_sample.long(), msg.rows_per_sample.long()):
            raise _bad(f"replay_of {i}: the row layout differs from the cached step's")
        begin = StepBegin(
            msg.session_id,
            msg.step,
            c.rows_per_sample,
            c.pool_rows,
            validation=msg.validation,
            loss_mask=c.loss_mask,
        )
        rng = self._rng.get_state() if self._rng is not None else None
        # registered while it decodes: a refusal must find its dropout draws to undo
        self._pending = p = self._open(begin, keep=False, batched=True)
        p.rng = rng
        for frame in cached.frames:
            self._fold(p, frame)
        self._pending = None
        return self._queue(p)

    def _max_replays(self) -> int:
        """Replays a private-label session may ask for: its cache epochs and a validation pass
        per epoch and one before (a client cannot buy unbounded work for a few bytes)."""
        assert self.cache is not None
        tc = self.spec.train
        return tc.total_steps + (tc.epochs + 1) * self.cache.num_validation

    def _open(self, msg: StepBegin, keep: bool, batched: bool = False) -> _Pending:
        nbytes = encoded_nbytes((msg.num_rows, self.spec.side.hidden_size), self.spec.codec)
        p = _Pending(msg, nbytes, keep, batched)
        if not msg.validation and isinstance(self.net, SideNetwork):
            # the step's dropout, drawn now: the same draws whether it trains here or batched
            p.masks = self.net.draw_dropout(msg.num_rows, self._rng)
            if not batched:
                self.net.use_dropout(p.masks)
        return p

    @contextlib.contextmanager
    def _mode(self, p: _Pending) -> Iterator[None]:
        """Validation steps run without dropout and without autograd; training steps with.
        The learner's mode is set only when it changes: setting it walks every module (over
        200 for a 30-tap ladder), and a step folded tap by tap enters here once per tap (it
        took half of a SmolLM2-shaped step's server time)."""
        train = not p.begin.validation
        if self.net.training != train:
            self.net.train(train)
        try:
            with torch.set_grad_enabled(train):
                yield
        finally:
            if not self.net.training:
                self.net.train()

    @property
    def _replays(self) -> bool:
        """Whether later epochs come from the cache, so streamed train steps must be kept."""
        return self.spec.train.epochs > 1 and self.spec.train.replay

    def _check_begin(self, msg: StepBegin) -> None:
        side = self.spec.side
        b = msg.num_samples
        # per-sample fields are a few numbers: checked as Python lists, one conversion each,
        # since every tensor call costs a batching server host time (and a GIL hand-off)
        if b == 0 or msg.rows_per_sample.ndim != 1 or min(msg.rows_per_sample.tolist()) < 1:
            raise _bad("rows_per_sample must be a non-empty 1-D tensor of positive counts")
        n = msg.num_rows
        if n > self.max_rows:
            raise RemoteError("RESOURCE_EXHAUSTED", f"{n} rows in one step; limit {self.max_rows}")
        if self.max_step_bytes:
            check_step(self.spec, msg.rows_per_sample, self.max_step_bytes)
        pool = msg.pool_rows.tolist() if msg.pool_rows.shape == (b,) else [-1]
        if min(pool) < 0 or max(pool) >= n:
            raise _bad(f"pool_rows must hold {b} row indices in [0, {n})")
        if self.private:
            self._check_private(msg)
        elif side.task == "classification":
            if msg.labels is None or msg.labels.shape != (b,):
                raise _bad(f"classification step needs labels of shape ({b},)")
            labels = msg.labels.tolist()
            if min(labels) < 0 or max(labels) >= side.num_labels:
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

    def _check_private(self, msg: StepBegin) -> None:
        if msg.labels is not None or msg.targets is not None:
            raise _bad("a private-label session's steps carry no labels or targets")
        rows = msg.num_samples
        if self.spec.side.task != "classification":
            m = msg.loss_mask
            if m is None or m.shape != (msg.num_rows,) or m.dtype != torch.bool:
                raise _bad(f"a private causal-LM step needs a loss_mask of shape ({msg.num_rows},)")
            rows = int(m.sum())
            if not rows:
                raise _bad("causal-LM step has no loss positions")
        nbytes = 4 * rows * self.spec.head.out_size
        if nbytes > self.max_features_bytes:
            raise RemoteError(
                "RESOURCE_EXHAUSTED",
                f"this step's features take {nbytes} bytes ({rows} rows), over the "
                f"{self.max_features_bytes} a message may carry; send smaller batches",
            )

    def add_chunk(self, chunk: ActivationChunk) -> Ack | Features | None:
        """Take one chunk; returns the step's Ack once its last layer has been trained on (in
        private-label mode: its Features, when the trainer is free to run it, else None)."""
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
        self._fold(p, frame)
        return self._maybe_finish(p)

    def add_hidden(self, h: torch.Tensor | Sequence[torch.Tensor]) -> Ack | Features | None:
        """Take the open step's next tapped layers already decoded, each ``(rows, hidden)`` on
        the trainer's device (one tensor, or several in tap order): what ``add_chunk`` does
        after decoding (a trusted, in-process caller such as a benchmark feeding the trainer
        without the codec; nothing is cached). Several at once spare a batching server's
        host the per-call work, which bounds how many session-steps a GPU can take."""
        p = self._pending
        if p is None:
            raise RemoteError("FAILED_PRECONDITION", "no step is open")
        taps = [h] if isinstance(h, torch.Tensor) else list(h)
        want = (p.begin.num_rows, self.spec.side.hidden_size)
        if p.next_tap + len(taps) > len(self.spec.taps):
            raise _bad(f"{len(taps)} taps given, the step needs {len(self.spec.taps) - p.next_tap}")
        for x in taps:
            if x.shape != want:
                raise _bad(f"tap {p.next_tap} has shape {tuple(x.shape)}, step needs {want}")
            self._fold_hidden(p, x)
        p.frames = None
        return self._maybe_finish(p)

    def _maybe_finish(self, p: _Pending) -> Ack | Features | None:
        if p.next_tap < len(self.spec.taps):
            return None
        if self.private:
            self._pending = None
            return self._queue(p)
        ack = self._finish(p)
        if p.frames is not None:
            assert self.cache is not None
            self.cache.add(CachedStep(p.begin, p.frames))
        return ack

    def _fold(self, p: _Pending, frame: bytes) -> None:
        """Decode one tapped layer's frame and fold it into the step's side-network state."""
        h = self._decode(frame, p)
        if p.frames is not None:
            p.frames.append(frame)
        self._fold_hidden(p, h)

    def _fold_hidden(self, p: _Pending, h: torch.Tensor) -> None:
        if p.hidden is not None:
            p.hidden.append(h)
            p.next_tap += 1
            return
        with self._mode(p):
            p.state = self.net.step(p.state, p.next_tap, h, p.begin.rows_per_sample)
        p.next_tap += 1
        p.last_hidden = h

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

    def _loss(self, p: _Pending) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's loss and metrics (accuracy and count of correct samples, or tokens)."""
        b, side = p.begin, self.spec.side
        assert p.state is not None and p.last_hidden is not None
        with self._mode(p):
            feats = self.net.finish(p.state, p.last_hidden)
            metrics: dict[str, float] = {}
            if side.task == "classification":
                dev = self.device
                logits = self.net.logits(
                    feats, b.pool_rows.to(dev), _row_sample(b).to(dev), b.num_samples
                )
                labels = b.labels.to(self.device)
                smoothing = 0.0 if b.validation else self.spec.train.label_smoothing
                loss = task_loss(logits, labels, smoothing)
                hits = float(correct(logits, labels))
                metrics["accuracy"] = hits / b.num_samples
                metrics["correct"] = hits
            else:
                keep = b.targets != IGNORE  # the LM head only on the rows that carry loss
                logits = self.net.logits(feats[keep.to(self.device)])
                loss = task_loss(logits, b.targets[keep].to(self.device))
                metrics["tokens"] = float(keep.sum())
        if not torch.isfinite(loss):
            self.abort_step()
            raise _bad(
                f"step {b.step}'s activations give a loss of {loss.item()} (values too large?); "
                "step dropped, nothing trained"
            )
        return loss, metrics

    def _finish(self, p: _Pending) -> Ack:
        b = p.begin
        if p.hidden is not None:
            loss, metrics = self._train_batched(p)
            self._epoch_losses.append(loss)
        else:
            t_loss, metrics = self._loss(p)
            loss = float(t_loss.detach())
            if not b.validation:
                self._train_on(t_loss, metrics)
                self._epoch_losses.append(loss)
        self.steps_done += 1
        self.samples_seen += b.num_samples
        self._pending = None
        metrics["samples"] = float(b.num_samples)
        metrics["server_ms"] = 1000 * (time.perf_counter() - p.started)
        if b.validation:
            metrics["validation"] = 1.0
        return Ack(step=b.step, loss=loss, metrics=metrics)

    # --- private labels -----------------------------------------------------------------------
    def _queue(self, p: _Pending) -> Features | None:
        self._ready.append(p)
        return self._advance()

    def _advance(self) -> Features | None:
        """Run the next waiting step up to its features, unless one still awaits its gradient."""
        if self._awaiting is not None or not self._ready:
            return None
        p = self._ready[0]  # stays queued until its forward ran: a failure must find it
        b, dev = p.begin, self.device
        assert p.hidden is not None
        classify = self.spec.side.task == "classification"
        # a batched step's features come from a round, without a graph: its training round
        # runs them again on the device's gradient, from the taps it keeps until then
        batched = self.batcher is not None and not b.validation
        if batched:
            assert self.batcher is not None
            feats = self.batcher.features(Ready(self, p.hidden, None, self._layout(b), p.masks))
            out = feats if classify else feats[b.loss_mask.to(dev)]  # type: ignore[union-attr]
        else:
            if isinstance(self.net, SideNetwork) and not b.validation:
                self.net.use_dropout(p.masks)  # drawn at its begin, as in the standard mode
            with self._mode(p):
                state = None
                for tap, h in enumerate(p.hidden):
                    state = self.net.step(state, tap, h, b.rows_per_sample)
                feats = self.net.finish(state, p.hidden[-1])
                if classify:
                    out = self.net.pooled(
                        feats, b.pool_rows.to(dev), _row_sample(b).to(dev), b.num_samples
                    )
                else:
                    assert b.loss_mask is not None
                    out = feats[b.loss_mask.to(dev)]
        self._ready.popleft()
        p.out = out
        if not batched:
            p.hidden = None
        self._awaiting = p
        return Features(b.step, out.detach().to("cpu", torch.float32))

    def add_gradient(self, g: Gradient) -> list[Ack | Features]:
        """Private labels: train the waiting step on the device's gradient; its Ack, then the
        next step's Features if one is ready."""
        p = self._awaiting
        if p is None or g.step != p.begin.step:
            raise RemoteError(
                "FAILED_PRECONDITION", f"gradient for step {g.step}, which awaits none"
            )
        b = p.begin
        assert p.out is not None
        metrics: dict[str, float] = {}
        if b.validation:
            if g.grad is not None:
                raise _bad("a validation step takes no gradient")
        else:
            if g.grad is None or g.grad.numel() != p.out.numel():
                want = tuple(p.out.shape)
                raise _bad(f"step {b.step}'s gradient must have the shape of its features {want}")
            if not (math.isfinite(g.device_sq_norm) and g.device_sq_norm >= 0):
                raise _bad("Gradient.device_sq_norm must be a finite number >= 0")
            if p.frames is not None:  # refuse before training: a full cache must train nothing
                assert self.cache is not None
                self.cache.check(CachedStep(b, p.frames))
            grad = g.grad.reshape(p.out.shape).to(self.device, p.out.dtype)
            if p.hidden is not None:
                _, metrics = self._train_batched(p, grad, g.device_sq_norm)
            else:
                self._train_private(p.out, grad, g.device_sq_norm, metrics)
        self._awaiting = None
        # the loss is the device's to know; its ack tells the device's records its own
        replies: list[Ack | Features] = [self._complete(p, math.nan, metrics)]
        if (f := self._advance()) is not None:
            replies.append(f)
        return replies

    def _train_private(
        self, out: torch.Tensor, grad: torch.Tensor, device_sq: float, metrics: dict[str, float]
    ) -> None:
        self.opt.zero_grad(set_to_none=True)
        out.backward(grad)
        params = [p for p in self.net.parameters() if p.grad is not None]
        gn = math.sqrt(
            float(torch.nn.utils.get_total_norm([p.grad for p in params])) ** 2 + device_sq
        )
        if not math.isfinite(gn):
            self.opt.zero_grad(set_to_none=True)
            self.abort_step()
            raise _bad("this step's gradients overflow; step dropped, nothing trained")
        clip = clip_coefficient(gn, self.spec.train.grad_clip)
        if self.spec.train.grad_clip:
            for p in params:
                p.grad.mul_(clip)
            metrics["grad_norm"] = gn
        metrics["clip"] = clip
        metrics["lr"] = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.optimizer_steps += 1

    def _complete(self, p: _Pending, loss: float, metrics: dict[str, float]) -> Ack:
        """Count a trained (or scored) private-label step, keep it in the cache, ack it."""
        b = p.begin
        self.steps_done += 1
        self.samples_seen += b.num_samples
        metrics["samples"] = float(b.num_samples)
        metrics["server_ms"] = 1000 * (time.perf_counter() - p.started)
        if b.validation:
            metrics["validation"] = 1.0
        if p.frames is not None:
            assert self.cache is not None
            self.cache.add(CachedStep(b, p.frames))
        self.last_ack = Ack(step=b.step, loss=loss, metrics=metrics)
        return Ack(step=b.step, loss=loss, metrics=dict(metrics))

    def _layout(self, b: StepBegin) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What a round pools a classification step's rows by (``Ready.layout``)."""
        classify = self.spec.side.task == "classification"
        return (b.rows_per_sample, b.pool_rows) if classify else None

    def _train_batched(
        self, p: _Pending, grad: torch.Tensor | None = None, device_sq: float = 0.0
    ) -> tuple[float, dict[str, float]]:
        """Train this step in the batcher's next round, with other sessions' steps (private
        labels: on ``grad``, the device's gradient for the features it read)."""
        assert self.batcher is not None and p.hidden is not None
        b = p.begin
        classify = self.spec.side.task == "classification"
        layout = self._layout(b)
        if grad is not None:
            if not classify:  # every row's, zero where the step carries no loss
                assert b.loss_mask is not None
                full = grad.new_zeros(b.num_rows, grad.shape[-1])
                full[b.loss_mask.to(self.device)] = grad
                grad = full
            item = Ready(self, p.hidden, None, layout, p.masks, grad, device_sq)
        else:
            target = b.labels if classify else b.targets
            item = Ready(self, p.hidden, target.long(), layout, p.masks)
        loss, metrics = self.batcher.train(item)  # a RemoteError drops the step (abort_step)
        self.opt._opt_called = True  # type: ignore[attr-defined] # the batcher stepped it
        self.sched.step()
        self.optimizer_steps += 1
        return loss, metrics

    def _train_on(self, loss: torch.Tensor, metrics: dict[str, float]) -> None:
        if self.flat is not None:  # batched rounds left torch's per-tensor counters behind
            self.flat.sync_steps(self.opt, self.optimizer_steps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.net.parameters() if p.grad is not None]
        gn = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(gn):
            # a finite loss can still overflow its gradients; stepping would poison the weights
            self.opt.zero_grad(set_to_none=True)
            self.abort_step()
            raise _bad("this step's gradients overflow; step dropped, nothing trained")
        if self.spec.train.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.spec.train.grad_clip, gn)
            metrics["grad_norm"] = float(gn)
        metrics["lr"] = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.optimizer_steps += 1

    # --- epochs from the cache ----------------------------------------------------------------
    def _replay(self, step: CachedStep) -> tuple[float, dict[str, float]]:
        """Run one cached step through the same path as a streamed one: decode and fold, or,
        on a batching server, a round of the batcher (so that replayed and re-streamed epochs
        train alike)."""
        batched = self.batcher is not None and not step.begin.validation
        p = self._open(step.begin, keep=False, batched=batched)
        for frame in step.frames:
            self._fold(p, frame)
        if batched:
            return self._train_batched(p)
        loss, metrics = self._loss(p)
        if not step.begin.validation:
            self._train_on(loss, metrics)
        return float(loss.detach()), metrics

    def _score(self) -> dict[str, float] | None:
        """Validation loss and accuracy (classification) of the network as it stands (the
        device scores a private-label session's)."""
        if self.cache is None or not self.cache.num_validation or self.private:
            return None
        total = correct = weight = 0.0
        for step in self.cache.validation_steps():
            loss, m = self._replay(step)
            n = m.get("tokens", float(step.begin.num_samples))
            total += loss * n
            weight += n
            correct += m.get("correct", 0.0)
        out = {"val_loss": total / weight}
        if self.spec.side.task == "classification":
            out["val_accuracy"] = correct / weight
        return out

    def _better(self, new: dict[str, float], old: dict[str, float]) -> bool:
        if "val_accuracy" in new and new["val_accuracy"] != old["val_accuracy"]:
            return new["val_accuracy"] > old["val_accuracy"]
        return new["val_loss"] < old["val_loss"]

    def run_epochs(self) -> Iterator[EpochReport]:
        """Finish training: report the streamed epoch, replay the rest, keep the best epoch.

        Epoch 1 is what the device streamed. Epochs 2..N replay the cached train steps in
        ``epoch_step_order`` until the session's ``total_steps`` optimizer steps are done. With
        a validation split each epoch is scored and the best one (the untrained network
        counts as epoch 0) is what the session keeps; without one, the last epoch is kept.
        """
        if self.finished:
            raise RemoteError("FAILED_PRECONDITION", "the session has finished training")
        if self._pending is not None or self._awaiting is not None or self._ready:
            raise RemoteError("FAILED_PRECONDITION", "a step is still open; end it first")
        self.finished = True
        self.release()  # no more streamed steps: rounds need not wait for this session
        tc = self.spec.train
        t0 = time.perf_counter()
        baseline = self._score_state(self._initial)
        best = (0, baseline, self._initial)
        # a private-label device replayed its epochs itself, through the Train stream
        replays = self.cache is not None and self._replays and not self.private
        n = self.cache.num_train if replays and self.cache is not None else 0
        epoch = self.epochs_done = 1 if n else tc.epochs  # without replay the device streamed all
        remaining = max(0, tc.total_steps - self.optimizer_steps) if n else 0
        reports: list[EpochReport] = []
        while True:
            losses, self._epoch_losses = self._epoch_losses, []
            metrics = {"train_loss": sum(losses) / max(1, len(losses)), "steps": len(losses)}
            scores = self._score()
            if scores is not None:
                metrics |= scores
                if best[1] is None or self._better(scores, best[1]):
                    best = (epoch, scores, _copy_state(self.net))
            metrics["seconds"] = time.perf_counter() - t0
            done = remaining == 0
            if done:
                self._keep(best[2] if scores is not None else None)
                metrics["best_epoch"] = float(best[0] if scores is not None else epoch)
                metrics |= {f"untrained_{k}": v for k, v in (baseline or {}).items()}
            reports.append(EpochReport(epoch, metrics, last=done))
            if done:
                self.reports = reports
            yield reports[-1]
            if done:
                return
            epoch = self.epochs_done = epoch + 1
            t0 = time.perf_counter()
            for i in epoch_step_order(n, tc.seed, epoch - 1)[:remaining]:
                assert self.cache is not None
                loss, _ = self._replay(self.cache.train_step(i))
                self._epoch_losses.append(loss)
            remaining = max(0, tc.total_steps - self.optimizer_steps)

    def _score_state(self, state: dict[str, torch.Tensor]) -> dict[str, float] | None:
        if self.cache is None or not self.cache.num_validation or self.private:
            return None
        current = _copy_state(self.net)
        self.net.load_state_dict(state, strict=False)
        try:
            return self._score()
        finally:
            self.net.load_state_dict(current, strict=False)

    def _keep(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None:
            self.net.load_state_dict(state, strict=False)
        self._initial = {}

    def release(self) -> None:
        """This trainer streams no more steps (it leaves memory): batched rounds stop waiting
        for it."""
        if self.batcher is not None:
            self.batcher.detach(self)

    def abort_step(self) -> None:
        """Drop a half-received step (the device gave up on it), and in private-label mode the
        steps waiting for a gradient; the device resends them under the same ids."""
        if (rng := self._rng_before_open()) is not None:
            assert self._rng is not None
            self._rng.set_state(rng)
        self._pending = self._awaiting = None
        self._ready.clear()

    def _rng_before_open(self) -> torch.Tensor | None:
        """The dropout generator's state before the earliest step not yet acked drew."""
        open_ = [x for x in (self._awaiting, *self._ready, self._pending) if x is not None]
        return open_[0].rng if open_ else None

    # --- checkpoints --------------------------------------------------------------------------
    _COUNTERS = ("steps_done", "optimizer_steps", "samples_seen", "bytes_received", "replays")

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything the next step's result depends on: tensors, and JSON-able rest.

        Taken between steps (a half-received step is not part of it: the device resends it).
        """
        if self.flat is not None and self.optimizer_steps:
            self.flat.sync_steps(self.opt, self.optimizer_steps)
        opt = self.opt.state_dict()
        tensors = {f"net.{k}": v for k, v in self.net.trainable_state().items()}
        tensors |= {f"initial.{k}": v for k, v in self._initial.items()}
        for i, st in opt["state"].items():
            tensors |= {f"opt.{i}.{k}": v for k, v in st.items()}
        if self._rng is not None:
            # steps begun but not acked are resent after a restart and draw again
            rng = self._rng_before_open()
            tensors["rng"] = rng if rng is not None else self._rng.get_state()
        meta: dict[str, Any] = {k: getattr(self, k) for k in self._COUNTERS}
        meta |= {
            "epochs_done": self.epochs_done,
            "finished": self.finished,
            "epoch_losses": self._epoch_losses,
            "param_groups": opt["param_groups"],
            "scheduler": self.sched.state_dict(),
            "last_ack": None
            if self.last_ack is None
            else {"step": self.last_ack.step, "metrics": self.last_ack.metrics},
            "reports": None
            if self.reports is None
            else [{"epoch": r.epoch, "metrics": r.metrics, "last": r.last} for r in self.reports],
        }
        # copies: the live tensors (views of the flat vectors, too) go on training
        return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Become the trainer that ``state`` was taken from."""
        net = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        missing = set(self.net.trainable_state()) - set(net)
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)[:3]}")
        self.net.load_state_dict(net, strict=False)
        self._initial = {k[8:]: v for k, v in tensors.items() if k.startswith("initial.")}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.sched.load_state_dict(meta["scheduler"])
        if self.flat is not None:  # loading replaced the moments: make them views again
            self.flat.bind(self.opt, int(meta["optimizer_steps"]))
        if self._rng is not None and "rng" in tensors:
            self._rng.set_state(tensors["rng"])
        for k in self._COUNTERS:
            setattr(self, k, int(meta.get(k, 0)))
        self.epochs_done = int(meta["epochs_done"])
        self.finished = bool(meta["finished"])
        self._epoch_losses = [float(x) for x in meta["epoch_losses"]]
        reports = meta.get("reports")
        self.reports = None if reports is None else [EpochReport(**r) for r in reports]
        last = meta.get("last_ack")
        self.last_ack = None if last is None else Ack(last["step"], math.nan, last["metrics"])
        self._pending = self._awaiting = None
        self._ready.clear()
        if self.cache is not None:
            self.cache.reopen(self.steps_done)

    def _generator(self) -> torch.Generator | None:
        """The learner's private dropout generator, if it has one."""
        for m in self.net.modules():
            g = getattr(m, "generator", None)
            if isinstance(g, torch.Generator):
                return g
        return None


def _copy_state(net: Learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.trainable_state().items()}
