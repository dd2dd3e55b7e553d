"""The one training loss of a session step: the server's trainers, and the device when it keeps
the labels (private-label mode)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # target of a row (causal LM) or sample (padding) that carries no loss


def task_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the entries whose target is not ``IGNORE``.

    Classification: ``(B, num_labels)`` logits and class ids; causal LM: ``(rows, vocab)``
    logits and token ids. ``smoothing`` is label smoothing (training steps of classification).
    """
    return F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=smoothing)


def correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How many non-ignored entries the logits' argmax gets right."""
    return ((logits.argmax(-1) == target) & (target != IGNORE)).sum()
