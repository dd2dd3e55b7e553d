"""Inference on the device alone: frozen backbone + a downloaded side network, no server.

The side network runs inside the backbone's layer callbacks, one tapped layer at a time, so
inference holds the ladder state ``(rows, width)`` and never all tapped layers at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mobillm.backbone import Backbone, pages
from mobillm.backbone.model import stream_hooks
from mobillm.data import IGNORE_INDEX, Batch, TokenizedDataset, collate
from mobillm.device.rows import RowPlan, plan_rows
from mobillm.errors import ConfigError
from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.side.io import SideFileError, SideMeta, load_side
from mobillm.side.learner import Learner, build_learner, seeded
from mobillm.side.split import SplitLearner


class LocalModel:
    """Backbone + side network, for accuracy, held-out loss and generation."""

    def __init__(self, backbone: Backbone, side: Learner, meta: SideMeta | None = None) -> None:
        if side.cfg.num_taps != len(backbone.taps):
            raise SideFileError(
                f"side network has {side.cfg.num_taps} taps, backbone taps {len(backbone.taps)}"
            )
        self.backbone = backbone
        self.side = side.eval()
        self.meta = meta
        self._top_regions: list[list[pages.Region]] | None = None

    @classmethod
    def load(cls, backbone: Backbone, folder: str | Path) -> LocalModel:
        """Load a saved side network for ``backbone`` (its fingerprint must match)."""
        from mobillm.side.io import check_fingerprint, read_meta

        meta = read_meta(folder)
        # another backbone's side network fails here, not on its taps or head below
        check_fingerprint(meta, backbone.fingerprint, str(folder))
        head, layers = _frozen_parts(backbone, meta.side, meta.taps)
        side, meta = load_side(folder, head, expect=backbone.fingerprint, layers=layers)
        return cls(backbone, side, meta)

    @classmethod
    def from_blob(cls, backbone: Backbone, meta_json: str, weights: bytes) -> LocalModel:
        """A side network straight from a download, without touching the disk."""
        import json

        from mobillm.side.io import SideMeta, side_from_bytes

        meta = SideMeta.from_dict(json.loads(meta_json))
        head, layers = _frozen_parts(backbone, meta.side, meta.taps)
        side = side_from_bytes(meta, weights, head, backbone.fingerprint, layers=layers)
        return cls(backbone, side, meta)

    @classmethod
    def untrained(cls, backbone: Backbone, side_cfg: SideConfig, seed: int = 0) -> LocalModel:
        """A fresh side network: with a verbalizer head this is zero-shot prompting exactly."""
        head, layers = _frozen_parts(backbone, side_cfg, backbone.taps)
        with seeded(seed):
            return cls(backbone, build_learner(side_cfg, head, layers, cast=False))

    def _positions(self) -> str:
        return self.side.cfg.positions

    # --- the one forward path ---------------------------------------------------------------
    def _features(self, batch: Batch, plan: RowPlan) -> torch.Tensor:
        state: dict[str, Any] = {"s": None, "h": None}

        def on_layer(tap: int, hidden: torch.Tensor) -> None:
            rows = plan.gather(hidden)
            state["s"] = self.side.step(state["s"], tap, rows, plan.rows_per_sample)
            state["h"] = rows

        handles = self._stream_top_layers()
        try:
            with torch.inference_mode():
                self.backbone.run(batch.input_ids, batch.attention_mask, on_layer)
                return self.side.finish(state["s"], state["h"])
        finally:
            for h in handles:
                h.remove()

    def _stream_top_layers(self) -> list[torch.utils.hooks.RemovableHandle]:
        """A split side network runs the backbone's own top layers on the device: with
        streamed weights, they too are handed back one layer at a time once they have run."""
        if not self.backbone.cfg.stream or not isinstance(self.side, SplitLearner):
            return []
        layers = self.side.stack.layers
        if self._top_regions is None:  # the frozen weights only: LoRA's are small and written
            self._top_regions = [
                pages.regions(p for n, p in layer.named_parameters() if "lora_" not in n)
                for layer in layers
            ]
        return stream_hooks(layers, self._top_regions, self.backbone.cfg.cold)

    def class_logits(self, batch: Batch) -> torch.Tensor:
        """Classification logits ``(B, num_labels)`` for a batch."""
        plan = plan_rows(batch, self._positions())
        feats = self._features(batch, plan)
        row_sample = torch.repeat_interleave(torch.arange(len(batch)), plan.rows_per_sample.long())
        with torch.inference_mode():
            return self.side.logits(feats, plan.pool_rows, row_sample, len(batch))

    def evaluate(
        self,
        data: TokenizedDataset,
        batch_size: int = 16,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Accuracy (classification) or mean token loss and perplexity (causal LM);
        ``progress(done, total)`` is called after each batch (samples evaluated so far)."""
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, len(data))

        if data.task == "classification":
            preds = [0] * len(data)
            correct = 0
            for idx, batch in _batches(data, batch_size):
                p = self.class_logits(batch).argmax(-1)
                for i, v in zip(idx, p.tolist(), strict=True):
                    preds[i] = v
                correct += int((p == batch.labels).sum())
                advance(len(idx))
            return {
                "accuracy": correct / max(1, len(data)),
                "samples": len(data),
                "predictions": preds,
            }
        total, tokens = 0.0, 0
        for idx, batch in _batches(data, batch_size):
            plan = plan_rows(batch, self._positions())
            feats = self._features(batch, plan)
            keep = plan.targets != IGNORE_INDEX
            with torch.inference_mode():
                logits = self.side.logits(feats[keep])
                total += float(F.cross_entropy(logits, plan.targets[keep], reduction="sum"))
            tokens += int(keep.sum())
            advance(len(idx))
        loss = total / max(1, tokens)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens}

    # --- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> str:
        """Continue ``prompt`` (formatted as in training: ``prompt + "\\n"``) token by token,
        at most ``max_new_tokens``, and no further than the positions the model takes."""
        tok = self.backbone.tokenizer
        ids = torch.tensor([tok(prompt + "\n", add_special_tokens=True)["input_ids"]])
        limit = self.backbone.max_positions
        if limit is not None:
            if ids.shape[1] >= limit:
                raise ConfigError(
                    f"the prompt takes {ids.shape[1]} tokens; this model takes {limit} in all"
                )
            max_new_tokens = min(max_new_tokens, limit - ids.shape[1])
        gen = torch.Generator().manual_seed(seed)
        eos = tok.eos_token_id
        out: list[int] = []
        if self.side.cfg.kind != "ladder":
            return self._generate_whole(ids, max_new_tokens, temperature, top_p, gen)
        cache = None
        cur, mask = ids, torch.ones_like(ids)
        for _ in range(max_new_tokens):
            state: dict[str, Any] = {"s": None, "h": None}

            def on_layer(tap: int, hidden: torch.Tensor, state: dict = state) -> None:
                last = hidden[:, -1, :].float()
                state["s"] = self.side.step(state["s"], tap, last)
                state["h"] = last

            with torch.inference_mode():
                cache = self.backbone.run(cur, mask, on_layer, cache=cache, use_cache=True)
                logits = self.side.logits(self.side.finish(state["s"], state["h"]))[0]
            nxt = _sample(logits, temperature, top_p, gen)
            if nxt == eos:
                break
            out.append(nxt)
            cur = torch.tensor([[nxt]])
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        return tok.decode(out, skip_special_tokens=True)

    def _generate_whole(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        gen: torch.Generator,
    ) -> str:
        # Split layers and side transformers attend over tokens and keep no KV cache: each new
        # token re-reads the whole sequence (fine for the short replies side-tuning targets).
        tok = self.backbone.tokenizer
        out: list[int] = []
        for _ in range(max_new_tokens):
            batch = Batch(
                ids, torch.ones_like(ids), loss_positions=torch.tensor([ids.shape[1] - 1])
            )
            plan = plan_rows(batch, "valid")
            with torch.inference_mode():
                logits = self.side.logits(self._features(batch, plan)[-1:])[0]
            nxt = _sample(logits, temperature, top_p, gen)
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        return tok.decode(out, skip_special_tokens=True)


def _frozen_parts(
    backbone: Backbone, side: SideConfig, taps: tuple[int, ...]
) -> tuple[FrozenHead, dict[str, torch.Tensor] | None]:
    """Tap what the side network was trained on; its frozen head and (split) top layers."""
    split = side.split_layers if side.kind == "split" else 0
    backbone.set_taps(taps, split_layers=split)
    head = FrozenHead(*backbone.export_head(side.head_rows))
    return head, backbone.top_layers(split)[1] if split else None


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        cut = torch.cumsum(sorted_p, 0) - sorted_p > top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def _batches(data: TokenizedDataset, batch_size: int) -> Iterator[tuple[list[int], Batch]]:
    # Sorting by length cuts padding (and time) a lot; callers map results back by index.
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, collate(data, idx)
