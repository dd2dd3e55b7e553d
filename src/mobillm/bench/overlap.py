"""Does the device's forward pass hide the upload and the server's training? Measure it.

For the same batches, this benchmark times (a) the device's forward pass alone and (b) the
whole training loop against a ``mobillm serve`` running as a separate process on loopback, for
each codec, emulated link and label mode. ``overlap ratio = end-to-end samples/s / forward-only
samples/s``: 1.0 means training costs the device nothing beyond its forward pass. Private labels
add a round trip per step (features to the device, the gradient back) inside the same window.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

from mobillm.backbone import Backbone
from mobillm.codec import CodecConfig
from mobillm.data import TokenizedDataset, collate, epoch_batches
from mobillm.device.runtime import DeviceConfig, DeviceTrainer
from mobillm.side.config import SideConfig
from mobillm.transport.link import LinkConfig
from mobillm.transport.messages import TrainConfig


@dataclasses.dataclass
class OverlapRow:
    codec: str
    link_mbps: float
    positions: str
    labels: str
    forward_samples_per_s: float
    train_samples_per_s: float
    ratio: float
    bytes_per_sample: float
    mb_sent: float
    link_mb_per_s: float
    final_loss: float


def forward_only(backbone: Backbone, data: TokenizedDataset, batch_size: int, seed: int) -> float:
    """Samples/s of the bare forward pass over the training batches, in training order."""
    groups = epoch_batches(data.lengths, batch_size, seed, 0, DeviceConfig().length_group)
    batches = [collate(data, idx) for idx in groups]
    backbone.run(batches[0].input_ids, batches[0].attention_mask, lambda t, h: None)  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        backbone.run(b.input_ids, b.attention_mask, lambda t, h: None)
    return len(data) / (time.perf_counter() - t0)


def train_once(
    backbone: Backbone,
    side: SideConfig,
    data: TokenizedDataset,
    batch_size: int,
    seed: int,
    make_transport: Callable[[LinkConfig], Any],
    codec: CodecConfig,
    link: LinkConfig,
    positions: str,
    window: int,
    private: bool = False,
) -> dict[str, Any]:
    transport = make_transport(link)
    trainer = DeviceTrainer(
        backbone,
        side,
        transport,
        codec=codec,
        train=TrainConfig(seed=seed),
        device=DeviceConfig(positions=positions, window=window, epochs=1, private_labels=private),
    )
    try:
        summary = trainer.train(data, batch_size, seed=seed)
    finally:
        transport.close()
    return summary


def run_overlap(
    backbone: Backbone,
    side: SideConfig,
    data: TokenizedDataset,
    batch_size: int,
    codecs: list[str],
    links: list[float],
    make_transport: Callable[[LinkConfig], Any],
    positions: str = "loss",
    window: int = 2,
    seed: int = 0,
    report: Callable[[OverlapRow], None] | None = None,
    labels: tuple[str, ...] = ("standard",),
) -> list[OverlapRow]:
    """Forward-only passes right before and after each training run, averaged, so both
    figures see the same machine."""
    rows = []
    for codec_name, mbps, mode in itertools.product(codecs, links, labels):
        codec = CodecConfig(scheme=codec_name)
        before = forward_only(backbone, data, batch_size, seed)
        s = train_once(
            backbone,
            side,
            data,
            batch_size,
            seed,
            make_transport,
            codec,
            LinkConfig(mbps=mbps),
            positions,
            window,
            mode == "private",
        )
        # bracket the training run: the machine's speed drifts by several percent
        fwd = (before + forward_only(backbone, data, batch_size, seed)) / 2
        row = OverlapRow(
            codec=codec_name,
            link_mbps=mbps,
            positions=positions,
            labels=mode,
            forward_samples_per_s=round(fwd, 3),
            train_samples_per_s=s["samples_per_second"],
            ratio=round(s["samples_per_second"] / fwd, 4),
            bytes_per_sample=s["bytes_per_sample"],
            mb_sent=round(s["bytes_sent"] / 1e6, 3),
            link_mb_per_s=round(s["bytes_sent"] / 1e6 / s["wall_seconds"], 3),
            final_loss=round(s["mean_loss_last_10pct"], 4),
        )
        rows.append(row)
        if report:
            report(row)
    return rows


def _link(mbps: float) -> str:
    return f"{mbps:g} Mbit/s" if mbps else "unthrottled"


def markdown(rows: list[OverlapRow]) -> str:
    head = (
        "| codec | positions | labels | link | forward-only samples/s | training samples/s "
        "| ratio | bytes/sample | MB sent | link MB/s |\n" + "|---" * 10 + "|\n"
    )
    body = "".join(
        f"| {r.codec} | {r.positions} | {r.labels} | {_link(r.link_mbps)} "
        f"| {r.forward_samples_per_s:.2f} | {r.train_samples_per_s:.2f} | **{r.ratio:.3f}** "
        f"| {r.bytes_per_sample:,.0f} | {r.mb_sent:.2f} | {r.link_mb_per_s:.3f} |\n"
        for r in rows
    )
    return head + body
