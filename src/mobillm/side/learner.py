"""The one place that turns a ``SideConfig`` into its learner: ladder, split or side transformer.

Device and server both build learners here, so a session's learner is the same class on both
sides: the server trains it, the device runs the downloaded copy for inference alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.side.model import SideNetwork
from mobillm.side.split import SplitLearner
from mobillm.side.transformer import SideTransformer

Learner = SideNetwork | SplitLearner | SideTransformer

# Learners and heads draw their initial weights from torch's global RNG. A server builds them
# in many threads (sessions opening, the batcher's templates), and an in-process device in
# another: each build forks the RNG, seeds it and draws under this lock, or one thread's seed
# lands in the middle of another's draws (a session would start from other weights).
_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's global RNG seeded with ``seed``, no other build drawing meanwhile,
    and leave the RNG as it was."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_learner(
    cfg: SideConfig,
    head: FrozenHead,
    layers: dict[str, torch.Tensor] | None = None,
    cast: bool = True,
    with_classifier: bool = True,
) -> Learner:
    """A fresh learner for ``cfg`` on ``head``.

    ``layers``: for ``kind="split"``, the top layers' frozen tensors named ``layers.{i}.*``
    (the upload on the server, the backbone's own tensors on the device, shared, not copied
    when ``cast`` is off); for ``kind="transformer"``, the pruned blocks to start from (the
    upload; None builds fresh blocks, for weights about to be loaded). ``with_classifier``
    off: a private-label server's learner, whose classifier the device keeps
    (``side.private``).
    """
    if cfg.kind == "ladder":
        return SideNetwork(cfg, head, with_classifier)
    if cfg.kind == "transformer":
        return SideTransformer.build(cfg, head, layers, with_classifier)
    if not layers:
        raise ValueError("a split learner needs the top layers' weights")
    return SplitLearner.from_tensors(cfg, head, layers, cast, with_classifier)
