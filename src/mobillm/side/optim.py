"""The one optimizer recipe of a session: AdamW groups, the LR schedule, clipping.

The server's trainers use it for the side network; in private-label mode the device uses it
for the classifier it keeps, so both halves of one model step alike and the run equals the
standard mode's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether AdamW's weight decay applies to parameter ``name`` (not biases, gates, norms)."""
    return p.ndim >= 2 and "norm" not in name


def lr_lambda(total: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
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


def adamw(
    named: Iterable[tuple[str, torch.nn.Parameter]],
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_ratio: float,
    schedule: str,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (decay on matrices only) and its schedule."""
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:  # a split learner's frozen layers are parameters too
            (decay if decays(name, p) else no_decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        # the fused kernel, as in batched rounds: one pass over weights, moments and
        # gradients instead of a dozen small operations per tensor
        fused=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup_ratio, schedule))
    return opt, sched


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor ``clip_grads_with_norm_`` scales gradients by (1 when off or under)."""
    if not max_norm:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))
