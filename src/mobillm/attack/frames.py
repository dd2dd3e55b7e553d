"""What the server decodes from a session, rebuilt by an attacker who holds the public backbone.

The attacker runs the backbone over text, gathers rows exactly as the device does
(``device.rows.plan_rows``), applies the device's frame noise (``device.noise``, with a seed of
its own: the device's stays secret) and passes them through the session's codec, encode then
decode. What comes out is, bit for bit in distribution, what a server reads from its frames.
Beside it the attacker keeps the ground truth it will score against: each row's input token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch

from mobillm.backbone import Backbone
from mobillm.codec import CodecConfig, decode, encode
from mobillm.data import TokenizedDataset, collate
from mobillm.device.noise import add_frame_noise
from mobillm.device.rows import plan_rows


@dataclasses.dataclass
class ServerView:
    """Decoded frames of one data set at the attacked layers, with the truth beside them.

    ``valid[layer]`` (rows, hidden): every real token (positions "valid"); ``loss[layer]``
    (samples, hidden): each sample's last token (positions "loss" for classification).
    ``token_ids`` (rows,) the input token at each valid row; ``sample`` (rows,) its sample;
    ``private`` (rows,) bool: the token belongs to the sample's text, not to the public
    template or the tokenizer's special tokens (only those are worth recovering).
    """

    valid: dict[int, torch.Tensor]
    loss: dict[int, torch.Tensor]
    token_ids: torch.Tensor
    sample: torch.Tensor
    private: torch.Tensor

    @property
    def num_samples(self) -> int:
        return next(iter(self.loss.values())).shape[0] if self.loss else 0

    def bags(self) -> list[set[int]]:
        """Per sample, the set of its private token ids (what a bag-of-words attack wants)."""
        out: list[set[int]] = [set() for _ in range(self.num_samples)]
        for s, t in zip(
            self.sample[self.private].tolist(), self.token_ids[self.private].tolist(), strict=True
        ):
            out[s].add(t)
        return out


def public_token_ids(tokenizer: object, template: str) -> set[int]:
    """Token ids an attacker knows without any frame: the template's and the special tokens."""
    ids = set(tokenizer(template.format(text=""), add_special_tokens=True)["input_ids"])
    return ids | {int(t) for t in getattr(tokenizer, "all_special_ids", [])}


def _through_codec(
    rows: torch.Tensor, codec: CodecConfig, noise: float, seed: int, step: int, tap: int
) -> torch.Tensor:
    """One frame as the server decodes it: the device's noise, then encode and decode."""
    if noise:
        rows = add_frame_noise(rows, noise, seed, step, tap)
    return decode(encode(rows, codec))


@dataclasses.dataclass
class CleanRows:
    """The rows a device would gather, before noise and codec, batch by batch.

    ``valid[layer][b]`` / ``loss[layer][b]``: batch ``b``'s rows in the two positions modes;
    the truth is in data order (``valid_order`` / ``loss_order`` put rows there).
    """

    valid: dict[int, list[torch.Tensor]]
    loss: dict[int, list[torch.Tensor]]
    token_ids: torch.Tensor
    sample: torch.Tensor
    private: torch.Tensor
    valid_order: torch.Tensor
    loss_order: torch.Tensor

    def view(self, codec: CodecConfig, noise: float = 0.0, seed: int = 0) -> ServerView:
        """What the server decodes under ``codec`` and frame noise ``noise`` (std relative to
        each row's RMS; the attacker's ``seed``, as it does not know the device's)."""

        def through(rows: dict[int, list[torch.Tensor]], mode: int) -> dict[int, torch.Tensor]:
            # distinct noise draws per mode: a session sends one of them, never both
            return {
                layer: torch.cat(
                    [
                        _through_codec(r, codec, noise, seed + mode, step, layer)
                        for step, r in enumerate(batches)
                    ]
                )
                for layer, batches in rows.items()
            }

        valid, loss = through(self.valid, 0), through(self.loss, 1)
        return ServerView(
            valid={k: v[self.valid_order] for k, v in valid.items()},
            loss={k: v[self.loss_order] for k, v in loss.items()},
            token_ids=self.token_ids,
            sample=self.sample,
            private=self.private,
        )


def record_rows(
    backbone: Backbone,
    data: TokenizedDataset,
    layers: Iterable[int],
    template_ids: set[int],
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> CleanRows:
    """Run ``backbone`` over ``data`` and keep the rows of ``layers`` in both positions modes.

    Batches are formed in length order (less padding; rows do not depend on the batch). The
    backbone's taps are set to ``layers`` (plus the last layer, which a backbone always taps).
    ``progress(done, total)`` is called after each batch.
    """
    layers = sorted(set(layers))
    taps = tuple(sorted({*layers, backbone.num_layers - 1}))
    backbone.set_taps(taps)
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    valid: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    loss: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    ids, samples = [], []
    for step, idx in enumerate(batches):
        batch = collate(data, idx)
        plans = (plan_rows(batch, "valid"), plan_rows(batch, "loss"))
        ids.append(batch.input_ids.reshape(-1)[plans[0].index])
        samples.append(torch.repeat_interleave(torch.tensor(idx), plans[0].rows_per_sample.long()))

        def on_layer(tap: int, hidden: torch.Tensor, plans=plans) -> None:
            if taps[tap] in valid:
                valid[taps[tap]].append(plans[0].gather(hidden))
                loss[taps[tap]].append(plans[1].gather(hidden))

        backbone.run(batch.input_ids, batch.attention_mask, on_layer)
        if progress is not None:
            progress(step + 1, len(batches))
    sample = torch.cat(samples)
    # rows back in data order, so sample i's rows are contiguous and loss row i is sample i
    valid_order = torch.argsort(sample, stable=True)
    token_ids = torch.cat(ids)[valid_order]
    template = torch.tensor(sorted(template_ids), dtype=torch.long)
    return CleanRows(
        valid=valid,
        loss=loss,
        token_ids=token_ids,
        sample=sample[valid_order],
        private=~torch.isin(token_ids, template),
        valid_order=valid_order,
        loss_order=torch.argsort(torch.tensor([i for idx in batches for i in idx])),
    )
