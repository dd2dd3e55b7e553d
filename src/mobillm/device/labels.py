"""The device's half of a private-label session: the head it keeps, the loss, the gradient.

In private-label mode no label, target or verbalizer id leaves the device. The server runs the
side network up to the features the head reads and sends them (``Features``); this module
applies the head the device kept (the classifier, trained here; or the frozen LM head), computes
the session's loss and its gradient with respect to those features, and answers with a
``Gradient``. The server back-propagates it through the side network. Clipping covers the whole
model, as in the standard mode: the device reports its parameters' squared gradient norm, the
server the clipping factor (``Ack.metrics["clip"]``), and the device steps its classifier with
the session's optimizer recipe once that ack arrives, so the run equals the standard mode's up
to floating-point reassociation.

A dropped link loses at most the last ack (a step's features follow its predecessor's ack on
the same stream): the server resends it on resume. A server that restarts from a checkpoint
holds fewer steps than the device applied: the device goes back to its state before the first
step the server lost, from snapshots of the last ``MAX_SNAPSHOTS`` steps. With a ``folder``
the snapshots (and the step answered but not yet acked) are also written to disk, a few KB
per step, so that a device that restarts picks up where it stopped (``LabelHead.restore``).
"""

from __future__ import annotations

import copy
import json
import math
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mobillm.files import save_tensors
from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.side.learner import seeded
from mobillm.side.model import task_classifier
from mobillm.side.objective import correct, task_loss
from mobillm.side.optim import adamw
from mobillm.transport.messages import Ack, Features, Gradient, RemoteError, TrainConfig

# Steps the device can go back (a server's checkpoint interval is far below this).
MAX_SNAPSHOTS = 256
PENDING = "pending.safetensors"  # the step answered and not yet acked


class LabelHead:
    """Answers a private-label session's ``Features`` with ``Gradient``s (see module doc).

    ``expect(step, target, validation)`` registers what a step is scored against before its
    frames are sent; ``features`` and ``acked`` are called in stream order by the transport.
    Validation steps are scored (``take_scores``) and train nothing.
    """

    def __init__(
        self,
        side: SideConfig,
        head: FrozenHead,
        train: TrainConfig,
        session_id: str = "",
        folder: Path | None = None,
    ) -> None:
        self.side = side
        self.head = head
        # With head_init="random" the standard mode's server draws the classifier after the
        # side network; this one draws it alone, so only a verbalizer start is the same run.
        self.train = train
        self.session_id = session_id
        with seeded(train.seed):  # a "random" classifier is the same in every run
            self.classifier = task_classifier(side, head)
        self.opt = self.sched = None
        if self.classifier is not None:
            self.opt, self.sched = adamw(
                self.classifier.named_parameters(),
                train.lr,
                train.weight_decay,
                train.total_steps,
                train.warmup_ratio,
                train.schedule,
            )
        self.acked = 0  # steps acknowledged (train and validation): what the server holds
        self._expected: dict[int, tuple[torch.Tensor, bool]] = {}
        self._open: dict[int, dict[str, float]] = {}  # steps answered, not yet acked
        self._stepping: int | None = None  # the train step whose gradients wait for the clip
        self._scores = [0.0, 0.0, 0.0]  # loss * weight, correct, weight
        self._snapshots: dict[int, dict[str, Any]] = {}  # state before each acked step
        self._lock = threading.Lock()
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def restore(
        cls, side: SideConfig, head: FrozenHead, train: TrainConfig, session_id: str, folder: Path
    ) -> LabelHead | None:
        """The head a device that stopped wrote to ``folder``, as it was after its last ack
        (None if it wrote nothing)."""
        files = sorted(folder.glob("state-*.safetensors"))
        if not files:
            return None
        out = cls(side, head, train, session_id, folder)
        snaps = {int(f.stem.removeprefix("state-")): _read_snapshot(f) for f in files}
        last = max(snaps)
        out._restore(snaps.pop(last))
        out._snapshots = snaps
        if (folder / PENDING).is_file():
            out._reload_pending(folder / PENDING)
        return out

    # --- what the device registers --------------------------------------------------------
    def expect(self, step: int, target: torch.Tensor, validation: bool) -> None:
        """Step ``step`` is scored against ``target``: class ids (B,) (classification), or the
        next-token ids of the step's loss rows only, in row order (causal LM)."""
        with self._lock:
            self._expected[step] = (target.long(), validation)

    def reset(self, held: int, last_ack: Ack | None = None) -> None:
        """After a reconnect: the server holds ``held`` steps and drops the rest; so do we.

        One step behind: ``last_ack`` (the server's, resent) is applied. Ahead (the server went
        back to a checkpoint): back to the snapshot before step ``held``. FAILED_PRECONDITION
        if neither can make the two halves agree."""
        if held == self.acked + 1 and last_ack is not None and last_ack.step == self.acked:
            self.acked_step(last_ack)
        with self._lock:
            if held < self.acked and held in self._snapshots:
                self._restore(self._snapshots[held])
                self._snapshots = {k: v for k, v in self._snapshots.items() if k < held}
            if held != self.acked:
                raise RemoteError(
                    "FAILED_PRECONDITION",
                    f"the server holds {held} steps of this private-label session, the device "
                    f"applied {self.acked}: the classifier cannot catch up exactly; start again",
                )
            self._expected.clear()
            self._open.clear()
            self._stepping = None
            if self.classifier is not None:
                self.classifier.zero_grad(set_to_none=True)

    # --- what the transport calls, in stream order ---------------------------------------
    def features(self, msg: Features) -> Gradient:
        """The loss and its gradient for ``msg``'s step."""
        with self._lock:
            if msg.step not in self._expected:
                raise RemoteError("FAILED_PRECONDITION", f"features for unknown step {msg.step}")
            target, validation = self._expected.pop(msg.step)
            f = msg.data.float().requires_grad_(not validation)
            with torch.set_grad_enabled(not validation):
                logits = self._logits(f, target)
                # as on the server: label smoothing on classification training steps only
                smoothing = 0.0 if validation or self._lm else self.train.label_smoothing
                loss = task_loss(logits, target, smoothing)
            metrics = self._metrics(logits, target)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RemoteError(
                    "INVALID_ARGUMENT",
                    f"step {msg.step}'s features give a loss of {value} (values too large?)",
                )
            self._open[msg.step] = {"loss": value, "validation": float(validation), **metrics}
            if validation:
                self._write_pending(msg.step)
                return Gradient(self.session_id, msg.step, None)
            if self.classifier is not None:
                self.classifier.zero_grad(set_to_none=True)
            loss.backward()
            sq = 0.0
            if self.classifier is not None:
                sq = sum(float(p.grad.pow(2).sum()) for p in self.classifier.parameters())
                self._stepping = msg.step
            assert f.grad is not None
            self._write_pending(msg.step)
            return Gradient(self.session_id, msg.step, f.grad, sq)

    def acked_step(self, ack: Ack) -> None:
        """The server trained ``ack.step``: step the classifier with its clipping factor, and
        give the ack the loss and metrics only the device knows."""
        with self._lock:
            done = self._open.pop(ack.step, None)
            if done is None:
                return
            self._snapshots[ack.step] = self._snapshot()
            self._snapshots.pop(ack.step - MAX_SNAPSHOTS, None)
            self.acked += 1
            self._apply(ack, done)
            self._write_state()

    def _apply(self, ack: Ack, done: dict[str, float]) -> None:
        ack.loss = done["loss"]
        ack.metrics |= {k: v for k, v in done.items() if k not in ("loss", "validation")}
        if done["validation"]:
            n = done.get("tokens", done.get("samples", 1.0))
            self._scores[0] += done["loss"] * n
            self._scores[1] += done.get("correct", 0.0)
            self._scores[2] += n
            return
        if self._stepping != ack.step or self.opt is None or self.classifier is None:
            return
        clip = float(ack.metrics.get("clip", 1.0))
        if not (math.isfinite(clip) and 0.0 < clip <= 1.0):
            raise RemoteError("INVALID_ARGUMENT", f"the server's clipping factor is {clip}")
        if clip != 1.0:
            for p in self.classifier.parameters():
                p.grad.mul_(clip)
        self.opt.step()
        self.sched.step()
        self._stepping = None

    # --- scoring and results ----------------------------------------------------------------
    def take_scores(self) -> dict[str, float] | None:
        """The validation steps acknowledged since the last call: val_loss (and val_accuracy)."""
        out = self.peek_scores()
        with self._lock:
            self._scores = [0.0, 0.0, 0.0]
        return out

    def peek_scores(self) -> dict[str, float] | None:
        """What ``take_scores`` would return, without starting afresh."""
        with self._lock:
            total, hits, weight = self._scores
        if not weight:
            return None
        out = {"val_loss": total / weight}
        if not self._lm:
            out["val_accuracy"] = hits / weight
        return out

    def _snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {"acked": self.acked, "scores": list(self._scores)}
        if self.classifier is not None and self.opt is not None and self.sched is not None:
            snap["net"] = copy.deepcopy(self.classifier.state_dict())
            snap["opt"] = copy.deepcopy(self.opt.state_dict())
            snap["sched"] = self.sched.state_dict()
        return snap

    # --- on disk: a device that restarts picks up here ---------------------------------------
    def _write_state(self) -> None:
        """The state after ``acked`` steps, as ``state-{acked}``; the oldest beyond
        ``MAX_SNAPSHOTS`` goes."""
        if self.folder is None:
            return
        tensors, meta = _snapshot_tensors(self._snapshot())
        path = self.folder / f"state-{self.acked:07d}.safetensors"
        # a crash mid-write leaves the previous one
        save_tensors(tensors, path, metadata={"state": json.dumps(meta)})
        (self.folder / f"state-{self.acked - MAX_SNAPSHOTS:07d}.safetensors").unlink(
            missing_ok=True
        )

    def _write_pending(self, step: int) -> None:
        """The step just answered: its loss and metrics, and the classifier's gradients that
        wait for its ack's clipping factor."""
        if self.folder is None:
            return
        tensors = {}
        if self.classifier is not None and self._stepping == step:
            tensors = {f"grad.{k}": p.grad for k, p in self.classifier.named_parameters()}
        meta = {"step": step, "entry": self._open[step]}
        save_tensors(tensors, self.folder / PENDING, metadata={"pending": json.dumps(meta)})

    def _reload_pending(self, path: Path) -> None:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["pending"])
            grads = {k.removeprefix("grad."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if meta["step"] != self.acked:
            return  # acked before the device stopped: its state file has it
        self._open[self.acked] = meta["entry"]
        if grads and self.classifier is not None:
            for name, p in self.classifier.named_parameters():
                p.grad = grads[name]
            self._stepping = self.acked

    def _restore(self, snap: dict[str, Any]) -> None:
        self.acked, self._scores = snap["acked"], list(snap["scores"])
        if "net" in snap and self.classifier is not None:
            assert self.opt is not None and self.sched is not None
            self.classifier.load_state_dict(snap["net"])
            self.opt.load_state_dict(snap["opt"])
            self.sched.load_state_dict(snap["sched"])

    def state(self) -> dict[str, torch.Tensor]:
        """The classifier's weights as the learner names them (empty for causal LM)."""
        if self.classifier is None:
            return {}
        state = self.classifier.state_dict()
        return {f"classifier.{k}": v.detach().clone() for k, v in state.items()}

    # --- internals --------------------------------------------------------------------------
    @property
    def _lm(self) -> bool:
        return self.side.task != "classification"

    def _logits(self, f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if f.shape[0] != target.shape[0] or f.shape[1] != self.head.spec.out_size:
            raise RemoteError(
                "INVALID_ARGUMENT",
                f"features of shape {tuple(f.shape)}, the step needs "
                f"({target.shape[0]}, {self.head.spec.out_size})",
            )
        if self._lm:
            return self.head.logits_from_features(f)
        assert self.classifier is not None
        return self.classifier(f)

    def _metrics(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        if self._lm:
            return {"tokens": float(target.shape[0])}
        hits = float(correct(logits.detach(), target))
        n = target.shape[0]
        return {"accuracy": hits / n, "correct": hits, "samples": float(n)}


def _snapshot_tensors(snap: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A snapshot as safetensors tensors and JSON (no pickle on disk)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"acked": snap["acked"], "scores": snap["scores"]}
    if "net" in snap:
        tensors |= {f"net.{k}": v.contiguous() for k, v in snap["net"].items()}
        opt = snap["opt"]
        for i, st in opt["state"].items():
            tensors |= {f"opt.{i}.{k}": v.contiguous() for k, v in st.items()}
        meta |= {"param_groups": opt["param_groups"], "sched": snap["sched"]}
    return tensors, meta


def _read_snapshot(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {})["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    snap: dict[str, Any] = {"acked": meta["acked"], "scores": meta["scores"]}
    if "param_groups" in meta:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        snap["net"] = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        snap["opt"] = {"state": state, "param_groups": meta["param_groups"]}
        snap["sched"] = meta["sched"]
    return snap
