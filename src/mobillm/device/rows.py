"""Which token positions of a batch leave the device, and how the server finds its labels.

``positions``: "loss" sends only the rows a loss reads (a classifier's last token, or the
response tokens of causal-LM tuning), "valid" every real token, "all" every position
including padding. The side network is position-wise, so "loss" is exact and cheapest; the
others exist for pooled classifiers and for measuring what extra rows cost.
"""

from __future__ import annotations

import dataclasses

import torch

from mobillm.data import IGNORE_INDEX, Batch


@dataclasses.dataclass
class RowPlan:
    """Rows to gather from ``hidden.reshape(B*T, d)``, grouped by sample in order.

    ``index`` (rows,) flat positions; ``rows_per_sample`` (B,); ``pool_rows`` (B,) the row of
    each sample's last real token; ``targets`` (rows,) next-token ids or -100 (causal LM only).
    """

    index: torch.Tensor
    rows_per_sample: torch.Tensor
    pool_rows: torch.Tensor
    targets: torch.Tensor | None

    @property
    def num_rows(self) -> int:
        return int(self.index.numel())

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` hidden states -> ``(rows, d)`` float32 rows for the codec."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return flat.index_select(0, self.index).float()


def plan_rows(batch: Batch, positions: str) -> RowPlan:
    """Choose the rows of ``batch`` to send under ``positions`` ("loss" | "valid" | "all")."""
    bsz, seq = batch.input_ids.shape
    if batch.targets is not None:
        last = batch.attention_mask.sum(1) - 1
    else:
        assert batch.loss_positions is not None
        last = batch.loss_positions
    if positions == "all":
        keep = torch.ones(bsz, seq, dtype=torch.bool)
    elif positions == "valid":
        keep = batch.attention_mask.bool()
    elif positions == "loss":
        if batch.targets is not None:
            keep = batch.targets != IGNORE_INDEX
        else:
            keep = torch.zeros(bsz, seq, dtype=torch.bool)
            keep[torch.arange(bsz), last] = True
    else:
        raise ValueError(f"positions must be 'loss', 'valid' or 'all', got {positions!r}")
    if batch.targets is not None and positions == "loss":
        # A sample whose response was truncated away has no loss rows; keep its last token so
        # every sample owns at least one row (its target is -100, so it adds no loss).
        empty = ~keep.any(1)
        keep[empty, last[empty]] = True
    index = keep.reshape(-1).nonzero().squeeze(1)
    rows_per_sample = keep.sum(1)
    starts = torch.cumsum(rows_per_sample, 0) - rows_per_sample
    # pool row = position of each sample's last real token among its kept rows
    before_last = (keep & (torch.arange(seq).unsqueeze(0) < last.unsqueeze(1))).sum(1)
    # min(): in causal-LM "loss" mode the last token itself is not kept (it has no target)
    pool_rows = starts + torch.minimum(before_last, rows_per_sample - 1)
    targets = (
        batch.targets.reshape(-1).index_select(0, index) if batch.targets is not None else None
    )
    return RowPlan(index, rows_per_sample.to(torch.int32), pool_rows.long(), targets)
