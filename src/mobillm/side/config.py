"""Side-network config: the ladder's width, the adapters, and the task head."""

from __future__ import annotations

import dataclasses

from mobillm.config import Config, check

TASKS = ("classification", "causal_lm")
POOLINGS = ("last", "mean")
HEAD_INITS = ("verbalizer", "random")
MIXERS = ("none", "attention")
KINDS = ("ladder", "split", "transformer")
LEARNER_KINDS = ("auto", *KINDS)  # what a user may ask for: "auto" picks one of KINDS


@dataclasses.dataclass(frozen=True)
class SideConfig(Config):
    """Shape and task of a side network.

    ``hidden_size`` and ``num_taps`` come from the backbone; the ladder runs at width
    ``hidden_size // reduction``. ``adapter_ratio`` sets each adapter's bottleneck relative to
    that width. ``head_init="verbalizer"`` starts a classifier from the frozen LM-head rows of
    ``verbalizer_ids`` (so the untrained model is exactly zero-shot prompting); "random" starts
    it from scratch. ``mixer="attention"`` adds, at every tap, a small self-attention across
    the rows of each sample: the side network then mixes tokens, so the device must send every
    real token (positions "valid").

    ``kind="split"`` is the other learner: the device stops after layer ``L - split_layers``
    and the server runs frozen copies of the top ``split_layers`` layers (built from
    ``layers_config``, the backbone's config cut to those layers) with LoRA of rank
    ``lora_rank`` on their query and value projections (``mobillm.side.split``).

    ``kind="transformer"`` is a side transformer: one decoder layer of the backbone's family,
    ``reduction`` times narrower, per tapped layer, over every real token, started from the
    backbone's own layers pruned to that width (``mobillm.side.transformer``; ``layers_config``
    is the narrow layers' config).
    """

    hidden_size: int = 0
    num_taps: int = 0
    reduction: int = 8
    adapter_ratio: float = 2.0
    dropout: float = 0.1
    gate_temperature: float = 0.1
    task: str = "classification"
    num_labels: int = 2
    pooling: str = "last"
    head_init: str = "verbalizer"
    verbalizer_ids: tuple[int, ...] = ()
    mixer: str = "none"
    mixer_heads: int = 4
    kind: str = "ladder"
    split_layers: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    layers_config: str = ""

    def validate(self) -> None:
        check(self.hidden_size > 0, f"SideConfig.hidden_size must be > 0, got {self.hidden_size}")
        check(self.num_taps > 0, f"SideConfig.num_taps must be > 0, got {self.num_taps}")
        check(
            1 <= self.reduction <= self.hidden_size,
            f"SideConfig.reduction must be in [1, hidden_size], got {self.reduction}",
        )
        check(self.adapter_ratio > 0, "SideConfig.adapter_ratio must be > 0")
        check(0.0 <= self.dropout < 1.0, "SideConfig.dropout must be in [0, 1)")
        check(self.gate_temperature > 0, "SideConfig.gate_temperature must be > 0")
        check(self.task in TASKS, f"SideConfig.task must be one of {TASKS}, got {self.task!r}")
        check(self.pooling in POOLINGS, f"SideConfig.pooling must be one of {POOLINGS}")
        check(self.head_init in HEAD_INITS, f"SideConfig.head_init must be one of {HEAD_INITS}")
        check(self.mixer in MIXERS, f"SideConfig.mixer must be one of {MIXERS}, got {self.mixer!r}")
        check(self.kind in KINDS, f"SideConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "split":
            check(self.split_layers >= 1, "SideConfig.split_layers must be >= 1 for kind='split'")
            check(self.num_taps == 1, "a split learner reads exactly one tapped layer")
            check(1 <= self.lora_rank <= 256, "SideConfig.lora_rank must be in [1, 256]")
            check(self.lora_alpha > 0, "SideConfig.lora_alpha must be > 0")
            check(bool(self.layers_config), "SideConfig.layers_config is empty for kind='split'")
            check(
                self.mixer == "none" and self.pooling == "last",
                "a split learner runs attention itself: use mixer='none' and pooling='last'",
            )
        if self.kind == "transformer":
            check(
                bool(self.layers_config), "SideConfig.layers_config is empty for kind='transformer'"
            )
            check(
                self.mixer == "none" and self.pooling == "last",
                "a side transformer runs attention itself: use mixer='none' and pooling='last'",
            )
        if self.mixer == "attention":
            check(
                self.task == "classification",
                "SideConfig.mixer='attention' is for classification (generation would need a "
                "side KV cache)",
            )
            check(
                self.mixer_heads >= 1 and self.width % self.mixer_heads == 0,
                f"SideConfig.mixer_heads must divide the side width {self.width}",
            )
        if self.task == "classification":
            check(self.num_labels >= 2, "SideConfig.num_labels must be >= 2 for classification")
            if self.head_init == "verbalizer":
                check(
                    len(self.verbalizer_ids) == self.num_labels,
                    f"SideConfig: head_init='verbalizer' needs one verbalizer id per label "
                    f"({self.num_labels}), got {len(self.verbalizer_ids)}",
                )

    @property
    def positions(self) -> str:
        """The token rows this side network reads: every real token ("valid") when it mixes
        tokens (split layers, a side transformer, the attention mixer, mean pooling), else
        only the loss rows."""
        mixes = self.kind != "ladder" or self.mixer != "none" or self.pooling == "mean"
        return "valid" if mixes else "loss"

    @property
    def width(self) -> int:
        return max(1, self.hidden_size // self.reduction)

    @property
    def head_rows(self) -> list[int] | None:
        """LM-head rows the frozen head must carry: all (LM), verbalizers, or none."""
        if self.task == "causal_lm":
            return None
        return list(self.verbalizer_ids) if self.head_init == "verbalizer" else []
