"""AttackConfig: what ``mobillm attack`` measures, on how much text, against which frames."""

from __future__ import annotations

import dataclasses
import math

from mobillm.codec.schemes import scheme_names
from mobillm.config import Config, check

INVERTER_KINDS = ("linear", "mlp")
# A spread over SmolLM2's 30 layers; 14 is the default split learner's boundary (all tokens).
DEFAULT_LAYERS = (0, 1, 2, 4, 8, 14, 22, 29)


@dataclasses.dataclass(frozen=True)
class AttackConfig(Config):
    """How the server-as-attacker is set up (see ``mobillm.attack``).

    ``layers``: decoder layers attacked (0-based). ``codecs`` x ``noises``: the frame settings
    measured, each a session's codec and ``DeviceConfig.frame_noise``. The attacker fits on
    ``public_samples`` sentences of the data set's train split and is scored on
    ``private_samples`` of its eval split, which it never fits on. ``inverter``: the learned
    token inverter's and the bag-of-words probe's map, "linear" or "mlp"; ``epochs`` and
    ``probe_epochs`` their training passes. ``threshold``: the bag-of-words probe claims a
    token when its probability is at least this. ``label_samples``: training samples of the
    private-label session attacked (0 = skip), trained for ``label_epochs``, once per
    ``label_epsilons`` entry (``DeviceConfig.label_epsilon``: randomized response; 0 = none).
    """

    layers: tuple[int, ...] = DEFAULT_LAYERS
    codecs: tuple[str, ...] = ("int8",)
    group_size: int = 64
    noises: tuple[float, ...] = (0.0,)
    public_samples: int = 1000
    private_samples: int = 200
    inverter: str = "linear"
    epochs: int = 8
    probe_epochs: int = 30
    threshold: float = 0.5
    label_samples: int = 512
    label_epochs: int = 2
    label_epsilons: tuple[float, ...] = (0.0,)
    batch_size: int = 16
    seed: int = 0

    def validate(self) -> None:
        check(bool(self.layers), "AttackConfig.layers is empty")
        check(all(i >= 0 for i in self.layers), "AttackConfig.layers must be >= 0")
        known = scheme_names()
        check(
            bool(self.codecs) and all(c in known for c in self.codecs),
            f"AttackConfig.codecs must be among {known}, got {self.codecs}",
        )
        check(
            bool(self.noises) and all(math.isfinite(n) and n >= 0 for n in self.noises),
            f"AttackConfig.noises must be finite numbers >= 0, got {self.noises}",
        )
        check(self.public_samples >= 2, "AttackConfig.public_samples must be >= 2")
        check(self.private_samples >= 1, "AttackConfig.private_samples must be >= 1")
        check(self.inverter in INVERTER_KINDS, f"AttackConfig.inverter: one of {INVERTER_KINDS}")
        check(self.epochs >= 1 and self.probe_epochs >= 1, "AttackConfig epochs must be >= 1")
        check(0 < self.threshold < 1, "AttackConfig.threshold must be in (0, 1)")
        check(self.label_samples >= 0, "AttackConfig.label_samples must be >= 0 (0 = skip)")
        check(self.label_epochs >= 1, "AttackConfig.label_epochs must be >= 1")
        check(
            bool(self.label_epsilons)
            and all(math.isfinite(e) and e >= 0 for e in self.label_epsilons),
            f"AttackConfig.label_epsilons must be finite numbers >= 0, got {self.label_epsilons}",
        )
        check(self.batch_size >= 1, "AttackConfig.batch_size must be >= 1")
