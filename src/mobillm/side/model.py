"""The side network: a gated ladder of parallel adapters beside a frozen backbone.

For tapped hidden states ``h_1..h_K`` (each ``(rows, hidden)``, one row per selected token
position) the ladder keeps a state ``s`` of width ``r = hidden // reduction``::

    s_1 = down_1(norm_1(h_1))
    s_i = g_i * down_i(norm_i(h_i)) + (1 - g_i) * s_{i-1}      g_i = sigmoid(alpha_i / T)
    s_i = s_i + adapter_i(s_i)
    out = h_K + up(s_K)                                       up starts at zero

and the head turns ``out`` into logits: the backbone's frozen final norm and LM head for
causal-LM tuning, or the frozen final norm and a trainable classifier for classification.
The network is position-wise (no mixing across tokens; the backbone already did that), so the
device may send only the positions the loss needs. Because ``up`` starts at zero, an untrained
side network reproduces the frozen backbone exactly.

The same code trains on the server and runs inference on the device, layer by layer
(``start`` / ``step`` / ``finish``) so the device never holds all tapped layers at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead


class SeededDropout(nn.Module):
    """Dropout that draws from the network's own generator once one is set.

    A server trains many sessions in one process; with ``nn.Dropout`` they would all draw from
    the process-wide generator, so one session's masks would depend on when the others step.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None
        # A mask drawn ahead for the next call (``SideNetwork.draw_dropout``): a server draws
        # a step's masks when it opens, so batched and alone training draw the same.
        self.next_mask: torch.Tensor | None = None

    def draw(self, out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Fill ``out`` with keep-masks from ``generator``: ``1 / (1 - p)`` with probability
        ``1 - p``, else 0, so that applying one is a single multiplication."""
        return out.bernoulli_(1.0 - self.p, generator=generator).div_(1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep, self.next_mask = self.next_mask, None
        if keep is None:
            keep = self.draw(torch.empty_like(x), self.generator)
        return x * keep


class Adapter(nn.Module):
    """Pre-norm bottleneck MLP with a residual: ``(rows, r) -> (rows, r)``."""

    def __init__(self, width: int, ratio: float, dropout: float) -> None:
        super().__init__()
        inner = max(1, round(width * ratio))
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, inner)
        self.fc2 = nn.Linear(inner, width)
        self.drop = SeededDropout(dropout)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s + self.drop(self.fc2(F.gelu(self.fc1(self.norm(s)))))


class RowMixer(nn.Module):
    """Pre-norm self-attention among the rows of each sample: ``(rows, r) -> (rows, r)``.

    ``same`` is a (rows, rows) bool mask, True where two rows belong to the same sample; the
    rows of a sample are its real tokens, so attention is bidirectional within a sample and
    never crosses samples.
    """

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.drop = SeededDropout(dropout)

    def forward(self, s: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        n, w = s.shape
        q, k, v = self.qkv(self.norm(s)).view(n, 3, self.heads, w // self.heads).unbind(1)
        a = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=same
        )
        return s + self.drop(self.out(a.transpose(0, 1).reshape(n, w)))


def same_sample_mask(rows_per_sample: torch.Tensor) -> torch.Tensor:
    """(rows, rows) bool: True where two rows belong to the same sample."""
    sample = torch.repeat_interleave(torch.arange(rows_per_sample.numel()), rows_per_sample.long())
    return sample.unsqueeze(0) == sample.unsqueeze(1)


def pool_matrix(
    rows_per_sample: torch.Tensor, pool_rows: torch.Tensor, pooling: str, rows: int
) -> torch.Tensor:
    """(..., B, rows) float weights that pool head features per sample: one-hot at each
    sample's ``pool_rows`` entry ("last") or its rows' average ("mean"); columns past the
    step's own rows (padding) get zero weight.

    ``rows_per_sample`` and ``pool_rows`` are (..., B) on the device the weights are wanted
    on: a batching server builds one round's weights at once from its steps' layouts stacked
    (R, B), a sample of 0 rows and pool row -1 standing for padding (zero weights).
    """
    cols = torch.arange(rows, device=rows_per_sample.device)
    if pooling == "last":
        return (cols == pool_rows.long().unsqueeze(-1)).float()
    # each sample's row range by comparison, not a scatter: the same weights, 1 / rows
    counts = rows_per_sample.long().unsqueeze(-1)
    ends = counts.cumsum(-2)
    inside = (cols >= ends - counts) & (cols < ends)
    return inside / counts.clamp(min=1)


def task_classifier(cfg: SideConfig, head: FrozenHead) -> nn.Linear | None:
    """A classification task's classifier over head features; None for causal-LM tuning.

    ``head_init="verbalizer"`` starts it from the frozen LM-head rows of the label words, so
    an untrained learner scores exactly like the prompted backbone.
    """
    if cfg.task != "classification":
        return None
    classifier = nn.Linear(head.spec.out_size, cfg.num_labels)
    if cfg.head_init == "verbalizer":
        with torch.no_grad():
            classifier.weight.copy_(head.lm_head_weight)
            bias = head.lm_head_bias if head.spec.has_lm_bias else 0.0
            classifier.bias.copy_(torch.zeros(cfg.num_labels) + bias)
    return classifier


class SideNetwork(nn.Module):
    """Trainable ladder + head over frozen hidden states; see the module docstring."""

    def __init__(self, cfg: SideConfig, head: FrozenHead, with_classifier: bool = True) -> None:
        super().__init__()
        if head.spec.hidden_size != cfg.hidden_size:
            raise ValueError(
                f"frozen head width {head.spec.hidden_size} != side hidden_size {cfg.hidden_size}"
            )
        rows = cfg.head_rows
        if with_classifier and rows is not None and head.spec.vocab_rows != len(rows):
            raise ValueError(
                f"frozen head has {head.spec.vocab_rows} LM rows, task needs {len(rows)}"
            )
        self.cfg = cfg
        r, d = cfg.width, cfg.hidden_size
        self.in_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg.num_taps))
        self.down = nn.ModuleList(nn.Linear(d, r) for _ in range(cfg.num_taps))
        self.gates = nn.Parameter(torch.zeros(cfg.num_taps))
        self.adapters = nn.ModuleList(
            Adapter(r, cfg.adapter_ratio, cfg.dropout) for _ in range(cfg.num_taps)
        )
        self.mixers = nn.ModuleList(
            RowMixer(r, cfg.mixer_heads, cfg.dropout)
            for _ in range(cfg.num_taps if cfg.mixer == "attention" else 0)
        )
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.frozen = head
        # made last, so that its random draws never shift the ones above
        self.classifier = task_classifier(cfg, head) if with_classifier else None

    def seed_dropout(self, seed: int) -> None:
        """Give every dropout layer one private generator (on the parameters' device); a
        second call re-seeds the same generator, so whoever holds it keeps drawing from it."""
        drops = [m for m in self.modules() if isinstance(m, SeededDropout)]
        old = drops[0].generator if drops else None
        dev = self.up.weight.device
        if old is not None and old.device == dev:
            old.manual_seed(seed)
            return
        g = torch.Generator(device=dev).manual_seed(seed)
        for m in drops:
            m.generator = g

    def dropout_calls(self) -> list[SeededDropout]:
        """The dropout layers of one forward pass, each called once on a ``(rows, width)``
        input; empty when dropout is off."""
        calls = self.__dict__.get("_dropout_calls")
        if calls is not None:
            return calls
        calls = []
        if self.cfg.dropout != 0.0:
            for tap in range(self.cfg.num_taps):
                if self.mixers:
                    calls.append(self.mixers[tap].drop)
                calls.append(self.adapters[tap].drop)
        # listed once (a server asks every step): kept in __dict__, outside the module
        # registry, as the same modules in call order
        self.__dict__["_dropout_calls"] = calls
        return calls

    def draw_dropout(self, rows: int, generator: torch.Generator | None) -> torch.Tensor | None:
        """One training step's keep-masks, ``(calls, rows, width)``, drawn at once from
        ``generator``; None when dropout is off. A server draws a step's masks up front, so
        that a session's draws are the same trained alone or in a batch with others."""
        calls = self.dropout_calls()
        if not calls:
            return None
        masks = torch.empty(len(calls), rows, self.cfg.width, device=self.up.weight.device)
        return calls[0].draw(masks, generator)

    def use_dropout(self, masks: torch.Tensor | None) -> None:
        """The next forward pass applies ``masks`` (from ``draw_dropout``), one per layer."""
        if masks is not None:
            for drop, mask in zip(self.dropout_calls(), masks.unbind(0), strict=True):
                drop.next_mask = mask

    # Layer-by-layer interface: the device's inference and the server's training both use it.
    def start(self) -> None:
        """Return the empty ladder state (``None``): the first ``step`` initialises it."""
        return None

    def step(
        self,
        state: torch.Tensor | None,
        tap: int,
        h: torch.Tensor,
        rows_per_sample: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fold tapped layer ``tap``'s hidden states ``(rows, hidden)`` into the ladder state.

        ``rows_per_sample`` (B,): the row layout, needed when the network mixes rows.
        """
        x = self._down(tap, h.to(self.up.weight.dtype))
        if state is not None:
            g = torch.sigmoid(self.gates[tap] / self.cfg.gate_temperature)
            x = torch.lerp(state, x, g)  # g * x + (1 - g) * state, in one kernel
        if self.mixers:
            if rows_per_sample is None:
                raise ValueError("this side network mixes rows: pass their rows_per_sample")
            x = self.mixers[tap](x, same_sample_mask(rows_per_sample).to(x.device))
        return self.adapters[tap](x)

    def _down(self, tap: int, h: torch.Tensor) -> torch.Tensor:
        """``down(norm(h))`` with the norm's affine folded into the projection's weights.

        The same function, but the (rows, hidden) tensors, by far the largest a step touches,
        need no backward pass: the trainable norm weights get their gradients through the
        small folded ``(width, hidden)`` matrix, so a step reads and writes the taps about
        half as often (what bounds a batched server's round on a GPU). Folding costs work in
        proportion to the weights, though, so a step of fewer rows than the side width (a few
        last-token rows) runs the norm and the projection as they are.
        """
        norm, down = self.in_norms[tap], self.down[tap]
        if h.shape[-2] < self.cfg.width:
            return down(norm(h))
        xhat = F.layer_norm(h, norm.normalized_shape, eps=norm.eps)
        weight = down.weight * norm.weight
        return F.linear(xhat, weight, down.bias + down.weight @ norm.bias)

    def finish(self, state: torch.Tensor, h_last: torch.Tensor) -> torch.Tensor:
        """Head features ``(rows, out_size)`` from the final state and the last layer's output."""
        return self.frozen.features(h_last.to(self.up.weight.dtype) + self.up(state))

    def features(
        self, hidden: list[torch.Tensor], rows_per_sample: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All taps at once, in tap order: ``K x (rows, hidden) -> (rows, out)``."""
        if len(hidden) != self.cfg.num_taps:
            raise ValueError(f"expected {self.cfg.num_taps} tapped layers, got {len(hidden)}")
        state = self.start()
        for tap, h in enumerate(hidden):
            state = self.step(state, tap, h, rows_per_sample)
        return self.finish(state, hidden[-1])

    def logits(
        self,
        feats: torch.Tensor,
        pool_rows: torch.Tensor | None = None,
        row_sample: torch.Tensor | None = None,
        num_samples: int = 0,
        pool_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Task logits from head features.

        Classification: pools rows per sample (``pool_rows`` (B,) for "last", or ``row_sample``
        (rows,) sample ids for "mean", or a ``pool_weights`` (B, rows) matrix for either)
        -> (B, num_labels). Causal LM: (rows, vocab).
        """
        if self.cfg.task != "classification":
            return self.frozen.logits_from_features(feats)
        if self.classifier is None:
            raise ValueError("this learner's classifier is kept by the device")
        return self.classifier(self.pooled(feats, pool_rows, row_sample, num_samples, pool_weights))

    def pooled(
        self,
        feats: torch.Tensor,
        pool_rows: torch.Tensor | None = None,
        row_sample: torch.Tensor | None = None,
        num_samples: int = 0,
        pool_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The features the classifier reads, one row per sample ``(B, out_size)``; see
        ``logits`` for the arguments."""
        if pool_weights is not None:  # the shape-static form a batched server needs
            return pool_weights.to(feats.dtype) @ feats
        if self.cfg.pooling == "last":
            if pool_rows is None:
                raise ValueError("pooling='last' needs pool_rows")
            return feats[pool_rows]
        if row_sample is None or num_samples <= 0:
            raise ValueError("pooling='mean' needs row_sample and num_samples")
        sums = feats.new_zeros(num_samples, feats.shape[-1]).index_add_(0, row_sample, feats)
        counts = torch.bincount(row_sample, minlength=num_samples).clamp_min(1)
        return sums / counts.unsqueeze(-1).to(feats.dtype)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable weights only (the frozen head is the backbone's, not ours to ship)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("frozen.")}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
