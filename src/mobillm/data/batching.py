"""Dynamic-padding batches (`Batch`) over a pre-tokenised split, in a seeded order per epoch."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from mobillm.data.config import DataConfig
from mobillm.data.examples import Example
from mobillm.data.tokenization import TokenizedDataset, tokenize_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the ignore_index of torch.nn.functional.cross_entropy


@dataclasses.dataclass(frozen=True)
class Batch:
    """One right-padded batch of B sequences padded to the longest, T tokens.

    - ``input_ids`` (B, T) long; pad positions hold the pad id.
    - ``attention_mask`` (B, T) long; 1 on real tokens, 0 on padding.
    - classification: ``labels`` (B,) long class ids and ``loss_positions`` (B,) long, the
      index of each row's last real token (whose hidden state is classified).
    - causal LM: ``targets`` (B, T) long; ``targets[b, t] = input_ids[b, t + 1]`` when token
      t+1 is a response token, else -100 (prompt, last token, padding). The hidden state at t
      predicts token t+1, so the loss positions are where ``targets != -100``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    loss_positions: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in the batch."""
        return int(self.attention_mask.sum().item())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: None
            if (v := getattr(self, f.name)) is None
            else v.to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
        }
        return Batch(**moved)


def collate(data: TokenizedDataset, indices: Sequence[int]) -> Batch:
    """Right-pad the examples ``indices`` of ``data`` into one ``Batch``."""
    rows = [data.input_ids[i] for i in indices]
    bsz, width = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((bsz, width), data.pad_id, dtype=torch.long)
    mask = torch.zeros((bsz, width), dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[b, : len(ids)] = 1
    if data.task == "classification":
        if data.labels is None:
            raise ValueError("classification TokenizedDataset has no labels")
        return Batch(
            input_ids=input_ids,
            attention_mask=mask,
            labels=torch.tensor([data.labels[i] for i in indices], dtype=torch.long),
            loss_positions=torch.tensor([len(r) - 1 for r in rows], dtype=torch.long),
        )
    if data.response_starts is None:
        raise ValueError("causal_lm TokenizedDataset has no response_starts")
    targets = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
    for b, i in enumerate(indices):
        first = max(data.response_starts[i], 1)  # token 0 has no predecessor to predict it
        end = len(rows[b])
        targets[b, first - 1 : end - 1] = input_ids[b, first:end]
    return Batch(input_ids=input_ids, attention_mask=mask, targets=targets)


def num_batches(n_examples: int, batch_size: int) -> int:
    """Batches per epoch (the last one may be short)."""
    return -(-n_examples // batch_size)


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int = 0) -> list[int]:
    """Example order for one epoch: a permutation fixed by (seed, epoch), or 0..n-1."""
    order = list(range(n))
    if shuffle:
        # String seeds hash deterministically (unlike hash()), across processes and platforms.
        random.Random(f"batches:{seed}:{epoch}").shuffle(order)
    return order


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0, group: int = 32
) -> list[list[int]]:
    """Index lists of one epoch's batches, shuffled, with similar lengths grouped together.

    The seeded order is cut into windows of ``group`` batches; each window is sorted by length
    before it is split into batches, and the batches are shuffled again. Padding (and so the
    device's forward time) drops a lot on data of mixed lengths, while every batch still mixes
    random examples. ``group <= 1`` gives plain shuffled batches.
    """
    order = epoch_order(len(lengths), True, seed, epoch)
    if group > 1:
        window = batch_size * group
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda j: lengths[j])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group > 1:
        random.Random(f"groups:{seed}:{epoch}").shuffle(batches)
    return batches


def iter_batches(
    examples: Sequence[Example] | TokenizedDataset,
    tokenizer: PreTrainedTokenizerBase | None,
    cfg: DataConfig,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
) -> Iterator[Batch]:
    """Yield ``cfg.batch_size`` batches over one epoch; same (seed, epoch) -> same order.

    Pass a ``TokenizedDataset`` (from ``tokenize_examples``) to avoid re-tokenising each epoch;
    ``tokenizer`` is then unused and may be None.
    """
    if isinstance(examples, TokenizedDataset):
        data = examples
    else:
        if tokenizer is None:
            raise ValueError("iter_batches needs a tokenizer unless given a TokenizedDataset")
        data = tokenize_examples(examples, tokenizer, cfg)
    order = epoch_order(len(data), shuffle, seed, epoch)
    for start in range(0, len(order), cfg.batch_size):
        yield collate(data, order[start : start + cfg.batch_size])
