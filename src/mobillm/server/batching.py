"""Many sessions' steps trained as one: a stacked forward/backward and one AdamW update.

A side-network step with a few rows per sample is tiny, so a server that trains sessions one
after another is bound by per-operation overhead (kernel launches on a GPU, the optimizer's
per-tensor loop on a CPU). The ``Batcher`` collects the streamed training steps that are ready
across sessions, groups those whose learners have the same shape (same side config, same frozen
head, same label smoothing, same label mode), and trains each group at once:

* each session's trainable parameters and AdamW moments live in three flat vectors
  (``FlatState``; the module's parameters and the optimizer's state are views of them), so
  checkpoints, downloads, validation and the cache epochs work on them unchanged;
* a round stacks the sessions' flat weight vectors into one ``[R, N]`` buffer, takes each
  parameter's ``[R, *shape]`` view of it as a leaf, and runs ``torch.func.vmap`` over
  ``functional_call`` of the same learner code the per-session trainer runs, on rows padded
  to the round's longest step (padding carries no loss; the ladder is position-wise); the
  gradients are clipped as they are gathered into one ``[R, N]`` tensor, so the optimizer's
  host work per session is a few operations, not one per parameter;
* dropout masks are drawn when a step opens, from the session's own generator, all at once
  (``SideNetwork.draw_dropout``), alone or batched: a session's draws are the same whoever
  shares its round;
* each session's gradient clipping is applied to the stacked gradients, and sessions at the
  same learning rate and step take their AdamW step in one call of PyTorch's fused kernel,
  the one ``torch.optim.AdamW(fused=True)`` runs for the per-session trainer;
* a private-label step (its labels stay on the device) takes two rounds: one computes the
  features its device reads, without a graph; once the device's gradient for them is in, a
  later round runs the forward again and back-propagates that gradient, the clipping norm
  including the device's half. A round never holds a step for its device's answer.

A session trained in a batch ends with the same weights as trained alone, up to floating-point
reassociation. A round waits at most ``wait_ms`` for the sessions active lately, so a slow
device never holds back the rest, and takes no more steps than ``round_bytes`` allows.
Learners that cannot be stacked (the split learner, the attention mixer) are trained alone by
their own trainer, as before.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from mobillm.config import Config, check
from mobillm.side.learner import build_learner, seeded
from mobillm.side.model import SideNetwork, pool_matrix
from mobillm.side.objective import IGNORE, task_loss
from mobillm.side.optim import decays
from mobillm.transport.messages import RemoteError, SessionSpec


class Trainer(Protocol):
    """What the batcher reads of a session's trainer (``mobillm.server.trainer.Trainer``)."""

    spec: SessionSpec
    net: SideNetwork
    opt: torch.optim.Optimizer
    device: torch.device
    flat: FlatState | None
    optimizer_steps: int
    batch_key: Any
    private: bool


BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which the per-session trainer uses
EPS = 1e-8
ACTIVE_S = 10.0  # a session that submitted within this long is waited for (up to wait_ms)
IDLE_S = 5.0  # a batcher with no step for this long gives its round buffers back
_GROUPS = 8  # learner templates kept (one per distinct shape); a rebuilt one costs one init


@dataclasses.dataclass(frozen=True)
class BatchConfig(Config):
    """How the server batches sessions.

    ``max_batch``: session-steps trained together in one round (1 = every step alone, through
    the same code); ``wait_ms``: how long a round waits after its first step for more;
    ``round_bytes``: what one round's stacked weights, gradients and activations may take, as
    estimated from its steps (0 = no bound; a round always takes at least one step).
    """

    max_batch: int = 64
    wait_ms: float = 50.0
    round_bytes: int = 4 << 30

    def validate(self) -> None:
        check(1 <= self.max_batch <= 4096, "BatchConfig.max_batch must be in [1, 4096]")
        check(0.0 <= self.wait_ms <= 1000.0, "BatchConfig.wait_ms must be in [0, 1000]")
        check(self.round_bytes >= 0, "BatchConfig.round_bytes must be >= 0")


def flat_order(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters in flat-vector order: decayed ones first, so that weight decay
    touches one leading block of the vector."""
    named = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    return [x for x in named if decays(*x)] + [x for x in named if not decays(*x)]


def stackable(net: nn.Module) -> bool:
    """Whether a learner can be trained in a stacked batch with others of its shape."""
    return isinstance(net, SideNetwork) and not net.mixers


class FlatState:
    """A learner's trainable parameters and AdamW moments as views of three flat vectors."""

    def __init__(self, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.params = [p for _, p in flat_order(net)]
        n = sum(p.numel() for p in self.params)
        dev = self.params[0].device
        self.p = torch.empty(n, device=dev)
        self.m = torch.zeros(n, device=dev)
        self.v = torch.zeros(n, device=dev)
        off = 0
        for p in self.params:
            view = self.p[off : off + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
            off += p.numel()
        self._blocks: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.bind(opt, 0)

    def blocks(self, split: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Weights and moments of the decayed block (``[:split]``) and of the rest, as views
        made once: a round would otherwise slice every session's vectors anew."""
        got = self._blocks.get(split)
        if got is None:
            parts = (slice(0, split), slice(split, None))
            got = self._blocks[split] = [(self.p[s], self.m[s], self.v[s]) for s in parts]
        return got

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, off = [], 0
        for p in self.params:
            out.append(flat[off : off + p.numel()].view_as(p))
            off += p.numel()
        return out

    def bind(self, opt: torch.optim.Optimizer, steps: int) -> None:
        """Make the optimizer's moments views of ``m`` and ``v`` (after it loaded a state)."""
        ms, vs = self._views(self.m), self._views(self.v)
        # what the batched AdamW steps: weights, first and second moments, per parameter
        self.views = ([p.data for p in self.params], ms, vs)
        for p, m, v in zip(self.params, ms, vs, strict=True):
            st = opt.state[p]
            m.copy_(st["exp_avg"]) if "exp_avg" in st else m.zero_()
            v.copy_(st["exp_avg_sq"]) if "exp_avg_sq" in st else v.zero_()
            st["exp_avg"], st["exp_avg_sq"] = m, v
            # on the parameter's device, as torch's fused AdamW keeps it
            st["step"] = torch.tensor(float(steps), device=p.device)

    def sync_steps(self, opt: torch.optim.Optimizer, steps: int) -> None:
        """Batched rounds count steps per session, not per tensor: bring torch's counters up."""
        for p in self.params:
            opt.state[p]["step"].fill_(float(steps))


class _Features(nn.Module):
    """A step's side-network features as one module call, so ``functional_call`` can swap its
    weights: a private-label step's are what the device's half reads (pooled per sample, or
    every row for causal LM)."""

    def __init__(self, net: SideNetwork) -> None:
        super().__init__()
        self.net = net
        self.calls = net.dropout_calls()

    def rows(self, hidden: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """Every row's features, with the step's own dropout masks."""
        for drop, mask in zip(self.calls, masks.unbind(0), strict=True):
            drop.next_mask = mask
        return self.net.features(hidden)

    def forward(
        self, hidden: list[torch.Tensor], masks: torch.Tensor, pool: torch.Tensor | None
    ) -> torch.Tensor:
        feats = self.rows(hidden, masks)
        return feats if pool is None else self.net.pooled(feats, pool_weights=pool)


class _Objective(_Features):
    """The learner's loss (a standard step: the labels are here)."""

    def __init__(self, net: SideNetwork, smoothing: float) -> None:
        super().__init__(net)
        self.smoothing = smoothing

    def forward(  # type: ignore[override]
        self,
        hidden: list[torch.Tensor],
        masks: torch.Tensor,
        pool: torch.Tensor | None,
        target: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net.logits(self.rows(hidden, masks), pool_weights=pool)
        return task_loss(logits, target, self.smoothing), logits


class _Group:
    """A template learner for one shape: parameter layout, decay mask, the batched loss."""

    def __init__(self, trainer: Trainer, smoothing: float) -> None:
        # a private-label session's classifier is on its device: not in its flat vector
        self.private = trainer.private
        with seeded(0):  # the template's weights are never used: every round supplies them
            net = build_learner(
                trainer.spec.side, trainer.net.frozen, with_classifier=not self.private
            ).to(trainer.device)
        assert isinstance(net, SideNetwork)
        net.train()
        self.objective = _Objective(net, smoothing)
        self.features = _Features(net)
        named = flat_order(net)
        self.layout = [(f"net.{k}", p.numel(), tuple(p.shape)) for k, p in named]
        # decayed parameters come first in the flat vector: this many of its elements
        self.split = sum(p.numel() for k, p in named if decays(k, p))
        self.offsets = list(itertools.accumulate((n for _, n, _ in self.layout), initial=0))
        self.numel = self.offsets.pop()
        for _, p in named:  # every round supplies the weights: the template keeps none
            p.data = p.data.new_empty(0)
        # LM-head logits: on the server for a standard causal-LM session only
        lm_head = net.classifier is None and not self.private
        self.vocab = net.frozen.spec.vocab_rows if lm_head else 0
        self.width = net.cfg.width
        # pool: (B, rows) weights per session for classification, None for causal LM
        self.batched = vmap(self._one, in_dims=(0, 0, 0, 0, 0))
        self.batched_lm = vmap(self._one, in_dims=(0, 0, 0, None, 0))
        self.private_batched = vmap(self._one_private, in_dims=(0, 0, 0, 0, 0))
        self.private_batched_lm = vmap(self._one_private, in_dims=(0, 0, 0, None, 0))
        self.features_batched = vmap(self._one_features, in_dims=(0, 0, 0, 0))
        self.features_batched_lm = vmap(self._one_features, in_dims=(0, 0, 0, None))

    def round_cost(self, item: Ready) -> int:
        """Bytes a step adds to a round, roughly: stacked weights, gradients as the backward
        pass makes them and gathered, its taps stacked and normalised (kept for the backward
        pass), dropout masks, LM-head logits."""
        rows, hidden = item.hidden[0].shape
        taps = len(item.hidden)
        return 4 * (3 * self.numel + rows * (3 * hidden * taps + 2 * self.vocab))

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's ``[R, *shape]`` view of ``R`` stacked flat vectors ``[R, N]``."""
        r = flat.shape[0]
        return [
            flat[:, o : o + n].view(r, *shape)
            for o, (_, n, shape) in zip(self.offsets, self.layout, strict=True)
        ]

    def leaves(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """The round's leaves: the parameters' views of the stacked weights. Per-parameter
        leaves take their gradients as the backward pass makes them: one flat leaf would have
        them reshaped and concatenated, two more passes over the largest tensors of a round."""
        return [w.detach().requires_grad_() for w in self.views(weights)]

    def _named(self, weights):
        return {n: w for (n, _, _), w in zip(self.layout, weights, strict=True)}

    def _one(self, weights, hidden, masks, pool, target):
        return functional_call(self.objective, self._named(weights), (hidden, masks, pool, target))

    def _one_features(self, weights, hidden, masks, pool):
        return functional_call(self.features, self._named(weights), (hidden, masks, pool))

    def _one_private(self, weights, hidden, masks, pool, grad):
        """The features dotted with the device's gradient for them: its gradient is the
        vector-Jacobian product the per-session trainer back-propagates (the loss stays on
        the device)."""
        return (self._one_features(weights, hidden, masks, pool) * grad).sum()


@dataclasses.dataclass
class Ready:
    """One session's step, every tap decoded, waiting for a round."""

    trainer: Trainer
    hidden: list[torch.Tensor]  # per tap, (rows, hidden) on the server's device
    # (B,) class ids or (rows,) token ids, IGNORE where no loss; None for a private-label step
    target: torch.Tensor | None
    # classification: the step's (B,) rows per sample and pool rows, from which the round
    # builds every step's pooling weights at once on the device; None for causal LM
    layout: tuple[torch.Tensor, torch.Tensor] | None
    masks: torch.Tensor | None = None  # (calls, rows, width) dropout keep-masks
    # a private-label step: the device's gradient for the features it read, (B, out) pooled
    # or (rows, out) with zeros where no loss; and its own half's squared gradient norm
    grad: torch.Tensor | None = None
    device_sq: float = 0.0
    # a private-label step before its device's gradient: only its features, no graph
    forward: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: tuple[float, dict[str, float]] | None = None
    features: torch.Tensor | None = None  # (B, out) pooled, or (rows, out) for causal LM
    error: RemoteError | None = None


class Batcher:
    """Trains the ready steps of many sessions in rounds, on one thread of its own."""

    def __init__(self, cfg: BatchConfig | None = None) -> None:
        self.cfg = cfg or BatchConfig()
        self._queue: queue.Queue[Ready | None] = queue.Queue()
        self._groups: collections.OrderedDict[Any, _Group] = collections.OrderedDict()
        self._buffers: dict[str, torch.Tensor] = {}  # a round's stacked weights and gradients
        self.rounds = 0
        self.session_steps = 0
        # trainer -> (when it attached or last submitted a step, its group): who rounds wait for
        self._seen: dict[int, tuple[float, Any]] = {}
        self._seen_lock = threading.Lock()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mobillm-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Steps waiting for a round."""
        return self._queue.qsize()

    def train(self, item: Ready) -> tuple[float, dict[str, float]]:
        """Train ``item`` in the next round; its loss and metrics, or its RemoteError."""
        self._submit(item)
        assert item.result is not None
        return item.result

    def features(self, item: Ready) -> torch.Tensor:
        """A private-label step's features, computed in the next round without a graph (its
        training round runs them again once the device's gradient is in)."""
        item.forward = True
        self._submit(item)
        assert item.features is not None
        return item.features

    def _submit(self, item: Ready) -> None:
        with self._lock:  # checked and queued together: close() cannot slip in between
            if self._closed:
                raise RemoteError("UNAVAILABLE", "the server is shutting down")
            self._queue.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error

    def close(self) -> None:
        """Stop after the round in progress; steps still queued fail with UNAVAILABLE."""
        with self._lock:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=60)

    # --- the round loop -----------------------------------------------------------------------
    def _run(self) -> None:
        held: list[Ready] = []
        try:
            while self._collect(held):
                # the group of the step that waited longest trains now, so no group starves;
                # steps of other groups stay held for the next round, which starts at once
                key = held[0].trainer.batch_key
                items = [i for i in held if i.trainer.batch_key == key][: self.cfg.max_batch]
                try:
                    items = self._fit(key, items)
                except Exception as e:  # building the group's template failed
                    self._fail(items, RemoteError("INTERNAL", f"batched step failed: {e}"))
                taken = {id(i) for i in items}
                held[:] = [i for i in held if id(i) not in taken]
                self._train(key, [i for i in items if not i.done.is_set()])
        finally:
            self._buffers.clear()
            shutdown = RemoteError("UNAVAILABLE", "the server is shutting down")
            self._fail(held, shutdown)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self._fail([item], shutdown)

    def _collect(self, held: list[Ready]) -> bool:
        """Add ready steps to ``held``: wait until every session of the first held step's group
        that stepped lately is in, or ``wait_ms`` passed (a slow or departed device waits for a
        later round; it does not hold this one back). False once the batcher is closing."""
        if not held:
            try:
                first = self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                self._buffers.clear()
                first = self._queue.get()
            if first is None:
                return False
            held.append(first)
        for item in held:
            self._touch(item.trainer)
        key = held[0].trainer.batch_key
        deadline = time.monotonic() + self.cfg.wait_ms / 1000
        # counted as they come, not recounted per step: a round of R steps costs O(R) key
        # comparisons (each compares whole configs), which matters at hundreds of sessions
        want = min(self.cfg.max_batch, self._active(key))
        have = sum(i.trainer.batch_key == key for i in held)
        while have < want:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return False
            held.append(item)
            if self._touch(item.trainer):  # a session not counted as active yet
                want = min(self.cfg.max_batch, self._active(key))
            have += item.trainer.batch_key == key
        return True

    def _train(self, key: Any, items: list[Ready]) -> None:
        """One round; if it fails as a whole, each step alone, so that one bad step (say, one
        that runs out of memory) fails only its own session."""
        if not items:
            return
        try:
            self._round(key, items)
            return
        except Exception as e:
            if len(items) == 1:
                self._fail(items, RemoteError("INTERNAL", f"batched step failed: {e}"))
                return
        for item in items:
            if not item.done.is_set():
                self._train(key, [item])

    def _fit(self, key: Any, items: list[Ready]) -> list[Ready]:
        """The longest prefix of ``items`` whose round fits ``round_bytes`` (at least one).
        Every step of a round is padded to its longest, so a round costs its count times the
        cost of its longest step."""
        if not self.cfg.round_bytes:
            return items
        g = self._group(key, items[0].trainer)
        worst = 0
        for n, item in enumerate(items):
            worst = max(worst, g.round_cost(item))
            if n and (n + 1) * worst > self.cfg.round_bytes:
                return items[:n]
        return items

    def attach(self, trainer: Trainer) -> None:
        """A new session that will submit steps: rounds wait for it, as for active ones."""
        self._touch(trainer)

    def detach(self, trainer: Trainer) -> None:
        """A session that will submit no more streamed steps (it finishes, closes, leaves
        memory): rounds stop waiting for it."""
        with self._seen_lock:
            self._seen.pop(id(trainer), None)

    def _touch(self, trainer: Trainer) -> bool:
        """Mark ``trainer`` active now; whether it was not active before."""
        with self._seen_lock:
            new = id(trainer) not in self._seen
            self._seen[id(trainer)] = (time.monotonic(), trainer.batch_key)
            return new

    def _active(self, key: Any) -> int:
        """Sessions of group ``key`` that attached or submitted a step in the last
        ``ACTIVE_S`` seconds."""
        now = time.monotonic()
        with self._seen_lock:
            for k in [k for k, (t, _) in self._seen.items() if now - t > ACTIVE_S]:
                del self._seen[k]
            return sum(k2 == key for _, k2 in self._seen.values())

    @staticmethod
    def _fail(items: list[Ready], err: RemoteError) -> None:
        for item in items:
            if not item.done.is_set():
                item.error = err
                item.done.set()

    def _group(self, key: Any, trainer: Trainer) -> _Group:
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(trainer, trainer.spec.train.label_smoothing)
            while len(self._groups) > _GROUPS:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return group

    def _buffer(self, name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        """A ``(rows, like.numel())`` buffer of ``like``'s dtype and device. On a CPU it is kept
        from round to round while steps keep coming: a fresh tensor of a Qwen-sized round's
        weights (hundreds of MB) is mapped and faulted in page by page each time (glibc hands
        blocks over 32 MB back to the kernel when freed), which took longer than the round's
        matmuls. A kept one only grows, to what the largest round since the batcher was last
        idle asked for, which ``round_bytes`` bounds; rounds of any group share it. CUDA's
        caching allocator reuses blocks itself."""
        cols, need = like.numel(), rows * like.numel()
        if like.device.type != "cpu":
            return like.new_empty(rows, cols)
        buf = self._buffers.pop(name, None)
        if buf is None or buf.dtype != like.dtype or buf.numel() < need:
            buf = None  # freed before the larger one is made
            buf = like.new_empty(need)
        self._buffers[name] = buf
        return buf[:need].view(rows, cols)

    def _round(self, key: Any, items: list[Ready]) -> None:
        """One round: the features of private-label steps still waiting for their devices'
        gradients (no graph), then the training steps."""
        g = self._group(key, items[0].trainer)
        ahead = [i for i in items if i.forward]
        train = [i for i in items if not i.forward]
        if ahead:
            self._features(g, ahead)
        if train:
            self._train_round(g, train)
        self.rounds += 1
        # every result first, then the wake-ups in one tight loop: a session woken early
        # competes for the GIL with this thread's remaining work (measured on an H200 at 128
        # sessions: the acks took 30 ms of a 125 ms round when interleaved)
        for item in items:
            item.done.set()

    def _stacked(self, g: _Group, items: list[Ready]) -> tuple[torch.Tensor, ...]:
        """A round's stacked weights, taps and dropout masks, and (classification) pooling
        weights, every step padded to the round's longest: rows, and samples."""
        dev = items[0].trainer.device
        rows = max(i.hidden[0].shape[0] for i in items)
        weights = self._buffer("weights", items[0].trainer.flat.p, len(items))  # type: ignore[union-attr]
        torch.stack([i.trainer.flat.p for i in items], out=weights)  # type: ignore[union-attr]
        hidden = [_pad([i.hidden[t] for i in items], rows) for t in range(len(items[0].hidden))]
        # each session's masks, drawn when its step opened, padded: (R, calls, rows, width)
        none = torch.zeros(0, rows, g.width, device=dev)
        masks = torch.stack(
            [
                none
                if i.masks is None
                else i.masks
                if i.masks.shape[1] == rows
                else F.pad(i.masks, (0, 0, 0, rows - i.masks.shape[1]))
                for i in items
            ]
        )
        pool = None
        if items[0].layout is not None:
            samples = max(i.layout[0].shape[0] for i in items)  # type: ignore[index]
            # padding samples have no rows and pool row -1: zero pooling weights, no loss
            counts = _pad([i.layout[0] for i in items], samples, 0).to(dev)  # type: ignore[index]
            last = _pad([i.layout[1] for i in items], samples, -1).to(dev)  # type: ignore[index]
            pool = pool_matrix(counts, last, items[0].trainer.spec.side.pooling, rows)
        return weights, hidden, masks, pool

    def _features(self, g: _Group, items: list[Ready]) -> None:
        weights, hidden, masks, pool = self._stacked(g, items)
        run = g.features_batched if pool is not None else g.features_batched_lm
        with torch.no_grad():
            out = run(g.views(weights), hidden, masks, pool)
        for j, item in enumerate(items):
            n = item.layout[0].shape[0] if item.layout is not None else item.hidden[0].shape[0]
            # its own tensor: a view would keep the whole round's output alive while the
            # session waits for its device, and share storage with other sessions' features
            item.features = out[j, :n].clone()

    def _train_round(self, g: _Group, items: list[Ready]) -> None:
        dev = items[0].trainer.device
        weights, hidden, masks, pool = self._stacked(g, items)
        leaves = g.leaves(weights)
        classify = pool is not None
        private = g.private
        # per session: (B, ...) per sample for classification, (rows, ...) for causal LM
        per = [i.grad if private else i.target for i in items]
        size = pool.shape[1] if classify else hidden[0].shape[1]
        if private:
            # the device's gradients, zero on padding: the product's gradient is each
            # session's vector-Jacobian product, its value no loss (the device has that)
            out_grad = _pad(per, size).to(dev)  # type: ignore[arg-type]
            run = g.private_batched if classify else g.private_batched_lm
            loss, logits, target = run(leaves, hidden, masks, pool, out_grad), None, None
        else:
            target = _pad(per, size, IGNORE).to(dev)  # type: ignore[arg-type]
            run = g.batched if classify else g.batched_lm
            loss, logits = run(leaves, hidden, masks, pool, target)
        # a parameter a round leaves unused (a one-tap ladder's gate) gets a zero gradient,
        # as its flat slice did: zero moments and gradient leave it where it was, as alone
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True, materialize_grads=True)
        norms = _session_norms(grads)
        if private:  # the clipping norm spans both halves of the model, as alone
            sq = torch.tensor([i.device_sq for i in items], device=dev, dtype=norms.dtype)
            norms = (norms.square() + sq).sqrt()
            ok = torch.isfinite(norms)
        else:
            ok = torch.isfinite(loss) & torch.isfinite(norms)
        # each session's gradient clipping (clip_grads_with_norm_'s coefficient), applied as
        # the gradients are gathered into one contiguous [R, N] tensor: clipping and AdamW then
        # touch a few tensors per session (and PyTorch's fused AdamW reads a strided gradient
        # wrongly on CPU)
        clip = torch.tensor([i.trainer.spec.train.grad_clip for i in items], device=dev)
        coef = torch.where(clip > 0, (clip / (norms + 1e-6)).clamp(max=1.0), 1.0)
        grad = self._buffer("grads", weights[0], len(items))
        for part, out in zip(grads, g.views(grad), strict=True):
            torch.mul(part, coef.view(-1, *[1] * (part.dim() - 1)), out=out)
        del grads
        losses, oks, norm_list = loss.detach().tolist(), ok.tolist(), norms.tolist()
        coefs = coef.tolist()
        if private:
            losses = [float("nan")] * len(items)  # the loss is the device's to know
        elif classify:
            assert logits is not None and target is not None
            hits = ((logits.argmax(-1) == target) & (target != IGNORE)).sum(-1).tolist()
        else:
            assert target is not None
            tokens = (target != IGNORE).sum(-1).tolist()
        # sessions at the same learning rate, step and decay (devices in lockstep) take their
        # AdamW step in one fused call
        same: dict[tuple[float, int, float], list[int]] = {}
        for j, item in enumerate(items):
            t = item.trainer
            if oks[j]:
                key_ = (
                    t.opt.param_groups[0]["lr"],
                    t.optimizer_steps + 1,
                    t.spec.train.weight_decay,
                )
                same.setdefault(key_, []).append(j)
        # each session's two gradient blocks as views, made in two calls for the whole round
        rows_dec, rows_rest = grad[:, : g.split].unbind(0), grad[:, g.split :].unbind(0)
        for (lr, step, wd), js in same.items():
            parts = [[rows_dec[j] for j in js], [rows_rest[j] for j in js]]
            _adamw([items[j].trainer for j in js], parts, lr, step, wd, g.split)
        for j, item in enumerate(items):
            t = item.trainer
            if not oks[j]:
                item.error = RemoteError(
                    "INVALID_ARGUMENT",
                    "this step's gradients overflow; step dropped, nothing trained"
                    if private
                    else f"this step's activations give a loss of {losses[j]} or overflowing "
                    "gradients (values too large?); step dropped, nothing trained",
                )
                continue
            metrics = {"lr": t.opt.param_groups[0]["lr"], "batch": float(len(items))}
            if t.spec.train.grad_clip:
                metrics["grad_norm"] = norm_list[j]
            if private:  # the device scales its own half's gradient by the same factor
                metrics["clip"] = coefs[j]
            elif classify:
                b = item.target.shape[0]
                metrics |= {"accuracy": hits[j] / b, "correct": float(hits[j])}
            else:
                metrics["tokens"] = float(tokens[j])
            item.result = (losses[j], metrics)
            self.session_steps += 1


def _adamw(
    trainers: list[Trainer],
    grads: list[list[torch.Tensor]],
    lr: float,
    step: int,
    weight_decay: float,
    split: int,
) -> None:
    """AdamW steps of sessions that share ``lr``, ``step`` and ``weight_decay``, in place on
    their flat weights and moments (``grads``: their clipped gradients' decayed block, the
    first ``split`` elements, and the rest): PyTorch's fused kernel, one pass over weights,
    moments and gradients, the same arithmetic as ``torch.optim.AdamW(fused=True)``."""
    blocks = [t.flat.blocks(split) for t in trainers]  # type: ignore[union-attr]
    st = torch.tensor(float(step), device=grads[0][0].device)
    b1, b2 = BETAS
    for part, wd in ((0, weight_decay), (1, 0.0)):
        if not grads[part][0].numel():
            continue
        torch._fused_adamw_(
            [b[part][0] for b in blocks],
            grads[part],
            [b[part][1] for b in blocks],
            [b[part][2] for b in blocks],
            [],
            [st] * len(blocks),
            lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=EPS,
            amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
        )  # fmt: skip


def _session_norms(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Each session's gradient norm from per-parameter ``[R, *shape]`` gradients, as
    ``get_total_norm`` takes it for a session alone: the norm of its parameters' norms."""
    per = []
    for x in grads:
        x = x.unsqueeze(1) if x.dim() == 1 else x  # a scalar parameter
        per.append(torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim()))))
    return torch.linalg.vector_norm(torch.stack(per), dim=0)


def _pad(parts: list[torch.Tensor], size: int, value: float = 0.0) -> torch.Tensor:
    """Stack along a new first dim, each padded along its first dim to ``size``."""
    if all(x.shape[0] == size for x in parts):
        return torch.stack(parts)
    out = parts[0].new_full((len(parts), size, *parts[0].shape[1:]), value)
    for j, x in enumerate(parts):
        out[j, : x.shape[0]] = x
    return out
