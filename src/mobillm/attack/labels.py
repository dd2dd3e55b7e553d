"""Label leakage in private-label mode: what the server learns from the device's gradients.

In private-label mode the server sends each step's side-network features ``f`` (one row per
sample for classification) and receives ``g = d loss / d f``. With a linear classifier
``W`` (labels, features) and cross-entropy, ``g_i = W^T (softmax(W f_i) - t_i) / B``: for two
classes every ``g_i`` is a multiple of ``w_1 - w_0``, positive or negative by the label (Li et
al. 2021, "Label Leakage and Protection in Two-party Split Learning"). Two attacks:

* ``cosine_attack``: per step, the gradients' leading direction splits the samples by the sign
  of their projection on it; directions are chained from step to step (the classifier moves
  slowly), which leaves one global sign open (see ``cosine_attack``).
* ``expected_gradient_attack``: the attacker guesses the classifier's start ``W0`` (the public
  LM head's verbalizer rows; the ``sst2`` preset's words are public) and picks, per sample, the
  label whose expected gradient ``W0^T (softmax(W0 f_i) - e_y)`` is closest in cosine to
  ``g_i``. No sign is left open.

``record_private_session`` runs a real private-label session in process and keeps what the
server saw (features and gradients) beside the true labels, which the harness holds aside.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from mobillm.server.inprocess import InProcessTransport
from mobillm.transport.messages import Features, Gradient


@dataclasses.dataclass
class StepSeen:
    """One trained step as the server saw it, with the truth the attacker is scored against.

    ``features`` and ``grad`` (B, out_size); ``labels`` (B,) the samples' true labels, held
    aside by the harness; ``sent`` (B,) the labels the device trained with (the true ones, or
    their randomized response); ``replay``: a cache epoch's replay of an earlier step (its
    samples were seen before).
    """

    step: int
    features: torch.Tensor
    grad: torch.Tensor
    labels: torch.Tensor
    sent: torch.Tensor
    replay: bool


class _Recorder(InProcessTransport):
    """An in-process transport that keeps the Features it returns and the Gradients it gets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.features: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.replays: set[int] = set()

    def _deliver(self, msg: Any) -> list[Any]:
        if isinstance(msg, Gradient) and msg.grad is not None:
            self.grads[msg.step] = msg.grad.detach().clone()
        if getattr(msg, "replay_of", None) is not None and not msg.validation:
            self.replays.add(msg.step)
        replies = super()._deliver(msg)
        for r in replies:
            if isinstance(r, Features):
                self.features[r.step] = r.data.detach().clone()
        return replies


def record_private_session(
    backbone: Any,
    side: Any,
    data: Any,
    validation: Any,
    batch_size: int,
    device_cfg: Any,
    codec: Any,
    train_cfg: Any,
    workdir: str,
    seed: int = 0,
) -> tuple[list[StepSeen], dict[str, Any]]:
    """Run a private-label session in process; return its trained steps as the server saw them
    and the device's summary. ``device_cfg.private_labels`` must be True."""
    from mobillm.device.runtime import DeviceTrainer
    from mobillm.server.sessions import ServerConfig, SessionManager

    if not device_cfg.private_labels:
        raise ValueError("record_private_session needs DeviceConfig(private_labels=True)")
    transport = _Recorder(SessionManager(ServerConfig(workdir=workdir)))
    trainer = DeviceTrainer(backbone, side, transport, codec, train_cfg, device_cfg)
    summary = trainer.train(data, batch_size, seed=seed, validation=validation)
    transport.close()
    steps = []
    for s, g in sorted(transport.grads.items()):
        item = trainer.plan[s]  # its data: the labels the device trained with
        sent = torch.tensor([item.data.labels[i] for i in item.idx])
        truth = torch.tensor([data.labels[i] for i in item.idx])
        steps.append(StepSeen(s, transport.features[s], g, truth, sent, s in transport.replays))
    return steps, summary


def cosine_attack(steps: list[StepSeen], prior_positive: float = 0.5) -> dict[str, float]:
    """Li et al.'s cosine attack for two classes; returns recovery rates over all samples.

    Per step the leading right-singular vector ``u`` of the gradients splits the samples by
    ``sign(g_i . u)``; ``u`` is turned to agree with the previous step's (chaining the steps).
    Which side is label 1 is one global bit, resolved two ways: ``recovery_majority`` gives
    the larger side the majority label by ``prior_positive`` (the share of label 1 the
    attacker expects: SST-2's is public); ``recovery_up_to_sign`` is the better of the two
    assignments (an attacker who learns one sample's label).
    """
    sides, labels, prev = [], [], None
    for s in steps:
        g = s.grad.float()
        u = torch.linalg.svd(g, full_matrices=False).Vh[0]
        if prev is not None and torch.dot(u, prev) < 0:
            u = -u
        prev = u
        sides.append((g @ u) > 0)
        labels.append(s.labels)
    side = torch.cat(sides)
    y = torch.cat(labels).bool()
    if not len(y):
        return {"recovery_majority": float("nan"), "recovery_up_to_sign": float("nan")}
    agree = float((side == y).float().mean())
    positive_side_larger = float(side.float().mean()) >= 0.5
    majority = agree if positive_side_larger == (prior_positive >= 0.5) else 1 - agree
    return {"recovery_majority": majority, "recovery_up_to_sign": max(agree, 1 - agree)}


def expected_gradient_attack(
    steps: list[StepSeen], w0: torch.Tensor, b0: torch.Tensor | None = None
) -> dict[str, float]:
    """Label = argmax over y of ``cos(g_i, W0^T (softmax(W0 f_i + b0) - e_y))``.

    ``w0`` (labels, out_size): the attacker's guess of the classifier (verbalizer rows).
    Returns the recovery rate over all samples and over the first and last halves of the steps
    (the device's classifier drifts away from ``w0`` as it trains).
    """
    hits = []
    for s in steps:
        f, g = s.features.float(), s.grad.float()
        logits = f @ w0.T + (0 if b0 is None else b0)
        p = logits.softmax(-1)  # (B, K)
        eye = torch.eye(w0.shape[0])
        expected = (p.unsqueeze(1) - eye.unsqueeze(0)) @ w0  # (B, K labels, out)
        cos = F.cosine_similarity(expected, g.unsqueeze(1), dim=-1)
        hits.append((cos.argmax(1) == s.labels).float())
    if not hits:
        return {"recovery": float("nan")}
    half = len(hits) // 2
    out = {"recovery": float(torch.cat(hits).mean())}
    if half:
        out["recovery_first_half"] = float(torch.cat(hits[:half]).mean())
        out["recovery_second_half"] = float(torch.cat(hits[half:]).mean())
    return out
