"""The server's training loop for one session: frames in, side-network steps out.

Frames of a step arrive tap by tap; each decoded layer is folded into the ladder at once, so
the server's side forward overlaps the arrival of later layers. When the last layer arrives
the trainer computes the loss, back-propagates through the side network only, and steps AdamW.

Streamed steps are kept in the session's activation cache (when the session asks for more
than one epoch, and always for validation steps). ``run_epochs`` then replays the cache for the
remaining epochs through the same decode-and-fold path, scores the validation split after each
epoch, and keeps the best epoch, or the untrained network if no epoch beat it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mobillm.codec import CodecError, decode, encoded_nbytes, read_header
from mobillm.server.batching import INIT_LOCK, Batcher, FlatState, Ready, decays, stackable
from mobillm.server.budget import check_step
from mobillm.server.cache import ActivationCache, CachedStep
from mobillm.server.objective import IGNORE, correct, task_loss
from mobillm.side.head import FrozenHead
from mobillm.side.learner import Learner, build_learner
from mobillm.side.model import SideNetwork
from mobillm.transport.messages import (
    Ack,
    ActivationChunk,
    EpochReport,
    RemoteError,
    SessionSpec,
    StepBegin,
    epoch_step_order,
)


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
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.max_step_bytes = max_step_bytes  # 0 = unpriced (a trusted, in-process caller)
        self.cache = cache
        # Seed the initial weights, and give dropout its own generator, without touching other
        # sessions' random streams: a session's run is the same whoever else is training.
        with INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.train.seed)
            self.net: Learner = build_learner(spec.side, head, layers).to(self.device)
        self.net.seed_dropout(spec.train.seed + 1)
        self._rng = self._generator()  # found once: begin() reads it every step
        self.net.train()
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            if p.requires_grad:  # a split learner's frozen layers are parameters too
                (decay if decays(name, p) else no_decay).append(p)
        tc = spec.train
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": tc.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=tc.lr,
            # the fused kernel, as in batched rounds: one pass over weights, moments and
            # gradients instead of a dozen small operations per tensor
            fused=True,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(tc.total_steps, tc.warmup_ratio, tc.schedule)
        )
        self.steps_done = 0  # streamed steps acknowledged, train and validation
        self.optimizer_steps = 0
        self.samples_seen = 0
        self.bytes_received = 0
        self.epochs_done = 0
        self.finished = False
        self.reports: list[EpochReport] | None = None  # Finish's reports, once it completed
        self._pending: _Pending | None = None
        self._rng_at_begin: torch.Tensor | None = None
        self._epoch_losses: list[float] = []
        # the untrained network, the baseline every epoch must beat on the validation split
        self._initial = _copy_state(self.net)
        # Streamed training steps of a stackable learner train in the batcher's rounds
        # together with other sessions'; everything else (validation, cache epochs) here.
        self.batcher = batcher if batcher is not None and stackable(self.net) else None
        self.flat = FlatState(self.net, self.opt) if self.batcher is not None else None
        self.batch_key = (
            spec.head_sha256,
            spec.head,
            spec.side,
            spec.train.label_smoothing,
            str(self.device),
        )
        if self.batcher is not None:
            self.batcher.attach(self)

    # --- message handling -------------------------------------------------------------------
    def begin(self, msg: StepBegin) -> None:
        """Open a step; reject it unless it is the next one and its labels are well formed."""
        if self._pending is not None:
            raise RemoteError(
                "FAILED_PRECONDITION",
                f"step {msg.step} began before step {self._pending.begin.step} ended",
            )
        if self.finished:
            raise RemoteError("FAILED_PRECONDITION", "the session has finished training")
        if msg.step != self.steps_done:
            raise RemoteError(
                "FAILED_PRECONDITION", f"expected step {self.steps_done}, got step {msg.step}"
            )
        self._check_begin(msg)
        if msg.validation and self.cache is None:
            raise RemoteError("FAILED_PRECONDITION", "this server keeps no validation steps")
        keep = self.cache is not None and (msg.validation or self._replays)
        # a step that is dropped halfway must not have used up dropout draws: the device
        # resends it, and it must train exactly as if the first attempt never happened (taken
        # before _open, which draws the step's masks)
        self._rng_at_begin = self._rng.get_state() if self._rng is not None else None
        self._pending = self._open(msg, keep, self.batcher is not None and not msg.validation)

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
        """Validation steps run without dropout and without autograd; training steps with."""
        self.net.train(not p.begin.validation)
        try:
            with torch.set_grad_enabled(not p.begin.validation):
                yield
        finally:
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
        if side.task == "classification":
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
        self._fold(p, frame)
        return self._maybe_finish(p)

    def add_hidden(self, h: torch.Tensor | Sequence[torch.Tensor]) -> Ack | None:
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

    def _maybe_finish(self, p: _Pending) -> Ack | None:
        if p.next_tap < len(self.spec.taps):
            return None
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

    def _train_batched(self, p: _Pending) -> tuple[float, dict[str, float]]:
        """Train this step in the batcher's next round, with other sessions' steps."""
        assert self.batcher is not None and p.hidden is not None
        b = p.begin
        if self.spec.side.task == "classification":
            layout = (b.rows_per_sample, b.pool_rows)
            item = Ready(self, p.hidden, b.labels.long(), layout, p.masks)
        else:
            item = Ready(self, p.hidden, b.targets.long(), None, p.masks)
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
        """Validation loss and accuracy (classification) of the network as it stands."""
        if self.cache is None or not self.cache.num_validation:
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
        if self._pending is not None:
            raise RemoteError("FAILED_PRECONDITION", "a step is still open; end it first")
        self.finished = True
        self.release()  # no more streamed steps: rounds need not wait for this session
        tc = self.spec.train
        t0 = time.perf_counter()
        baseline = self._score_state(self._initial)
        best = (0, baseline, self._initial)
        n = self.cache.num_train if self.cache is not None and self._replays else 0
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
        if self.cache is None or not self.cache.num_validation:
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
        """Drop a half-received step (the device gave up on it); the next step reuses its id."""
        if self._pending is not None and self._rng_at_begin is not None:
            assert self._rng is not None
            self._rng.set_state(self._rng_at_begin)
        self._pending = None

    # --- checkpoints --------------------------------------------------------------------------
    _COUNTERS = ("steps_done", "optimizer_steps", "samples_seen", "bytes_received")

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
            tensors["rng"] = self._rng.get_state()
        meta: dict[str, Any] = {k: getattr(self, k) for k in self._COUNTERS}
        meta |= {
            "epochs_done": self.epochs_done,
            "finished": self.finished,
            "epoch_losses": self._epoch_losses,
            "param_groups": opt["param_groups"],
            "scheduler": self.sched.state_dict(),
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
            setattr(self, k, int(meta[k]))
        self.epochs_done = int(meta["epochs_done"])
        self.finished = bool(meta["finished"])
        self._epoch_losses = [float(x) for x in meta["epoch_losses"]]
        reports = meta.get("reports")
        self.reports = None if reports is None else [EpochReport(**r) for r in reports]
        self._pending = None
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
