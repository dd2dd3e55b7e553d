"""The device's training loop: batches -> frozen backbone -> codec -> transport, overlapped.

Per step the device sends the labels and row layout (``StepBegin``), then runs the backbone
forward; every tapped layer is gathered at the selected rows, encoded and queued the moment it
finishes. Sending happens on the transport's thread, so the next batch's forward starts while
the server is still training on this one; at most ``window`` steps are unacknowledged.

A validation split, when given, is streamed once before training. The training set is streamed
once; the server replays later epochs from its activation cache (``replay``), scores the
validation split after each epoch and keeps the best, so extra epochs cost the device nothing.

The steps are planned up front (seeded), so any step can be computed again. When the link
drops or the server restarts, the device reconnects with backoff for up to
``reconnect_seconds``, learns how many steps the server holds, and resends only the steps
after them; a device that itself crashed does the same from a fresh process (``attach``).
The result is the same side network, bit for bit on CPU, as an uninterrupted run.

With ``private_labels`` no label, target or verbalizer id leaves the device: the device keeps
the head (``device.labels.LabelHead``), answers each step's features with the gradient of the
loss, drives the cache epochs itself (``StepBegin.replay_of``), scores the validation split
after each epoch and keeps the best epoch by downloading it. A device that restarts cannot
resume such a session unless it was given a ``state_dir``, where the head's state after every
ack, the best epoch kept so far and the scores are written (a few KB per step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save, save_file

from mobillm.backbone import Backbone, pages
from mobillm.codec import CodecConfig, encode
from mobillm.config import Config, ConfigError, check
from mobillm.data import TokenizedDataset, collate, epoch_batches
from mobillm.device.labels import LabelHead
from mobillm.device.noise import (
    add_frame_noise,
    device_label_secret,
    draw_noise_seed,
    randomized_labels,
)
from mobillm.device.rows import plan_rows
from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead, tensors_sha256
from mobillm.side.io import (
    FORMAT,
    META,
    WEIGHTS,
    SideMeta,
    safetensors_stream,
    weights_from_bytes,
)
from mobillm.transport.base import Transport
from mobillm.transport.messages import (
    MAX_EPOCHS,
    MAX_PRIVATE_WINDOW,
    POSITIONS,
    Ack,
    EpochReport,
    RemoteError,
    SessionInfo,
    SessionSpec,
    SideBlob,
    StepBegin,
    TrainConfig,
    chunk_frame,
    epoch_step_order,
)


@dataclasses.dataclass(frozen=True)
class DeviceConfig(Config):
    """How the device streams: which rows, how many steps in flight, how long to train.

    ``positions`` "auto" sends the rows the side network reads (``SideConfig.positions``).
    ``epochs`` are training epochs; with ``replay`` the device streams the data once and the
    server replays the rest from its activation cache. ``validation_fraction`` of the training
    samples is held out by the caller and streamed once as the validation split that guards
    every run (the server keeps the best epoch, or the untrained network).
    ``reconnect_seconds``: how long the device keeps trying to reach a server it lost (0 = the
    first failure ends the run). ``private_labels``: labels, targets and verbalizer ids stay on
    the device (see the module docstring); None (the default) keeps them there for
    classification, where it costs the device about 1% of its time, and sends causal-LM targets,
    whose private mode would run the vocabulary-wide LM head on the device for every response
    token. ``frame_noise``: Gaussian noise of this standard
    deviation, relative to each row's RMS, is added to every row before it is encoded
    (``device.noise``), seeded by ``frame_noise_seed`` (-1: a secret one drawn per session).
    ``label_epsilon`` (classification; 0 = off): the training labels go through randomized
    response at this epsilon before anything is computed from them, so each is
    epsilon-label-differentially private against the server (``device.noise``), keyed by
    ``label_seed`` (-1: a secret this device keeps for all its runs, so a text gets the same
    noisy label in every session). With private labels the validation labels are not sent and
    stay as they are; with standard labels they are randomized too.
    """

    positions: str = "auto"
    window: int = 2
    epochs: int = 3
    replay: bool = True
    validation_fraction: float = 0.1
    max_steps: int = 0
    log_every: int = 10
    length_group: int = 32
    reconnect_seconds: float = 300.0
    private_labels: bool | None = None
    frame_noise: float = 0.0
    frame_noise_seed: int = -1
    label_epsilon: float = 0.0
    label_seed: int = -1

    def labels_private(self, task: str) -> bool:
        """Whether a run of ``task`` keeps its labels on the device."""
        if self.private_labels is None:
            return task == "classification"
        return self.private_labels

    def validate(self) -> None:
        check(
            self.positions in ("auto", *POSITIONS),
            f"DeviceConfig.positions must be 'auto' or one of {POSITIONS}, got {self.positions!r}",
        )
        check(self.window >= 1, f"DeviceConfig.window must be >= 1, got {self.window}")
        check(1 <= self.epochs <= MAX_EPOCHS, f"DeviceConfig.epochs must be in [1, {MAX_EPOCHS}]")
        check(
            0.0 <= self.validation_fraction < 1.0,
            "DeviceConfig.validation_fraction must be in [0, 1)",
        )
        check(self.max_steps >= 0, "DeviceConfig.max_steps must be >= 0 (0 = all)")
        check(self.log_every >= 1, "DeviceConfig.log_every must be >= 1")
        check(self.length_group >= 0, "DeviceConfig.length_group must be >= 0 (0 = off)")
        check(self.reconnect_seconds >= 0, "DeviceConfig.reconnect_seconds must be >= 0")
        check(
            math.isfinite(self.frame_noise) and self.frame_noise >= 0,
            f"DeviceConfig.frame_noise must be a finite number >= 0, got {self.frame_noise}",
        )
        check(
            -1 <= self.frame_noise_seed < 2**63,
            "DeviceConfig.frame_noise_seed must be in [0, 2**63), or -1 for a secret random one",
        )
        check(
            math.isfinite(self.label_epsilon) and self.label_epsilon >= 0,
            f"DeviceConfig.label_epsilon must be a finite number >= 0 (0 = off), got "
            f"{self.label_epsilon}",
        )
        check(
            -1 <= self.label_seed < 2**63,
            "DeviceConfig.label_seed must be in [0, 2**63), or -1 for the device's own secret",
        )


@dataclasses.dataclass
class StepRecord:
    step: int
    loss: float
    samples: int
    seconds: float
    bytes_encoded: int
    bytes_sent: int
    metrics: dict[str, float]


ProgressFn = Callable[[dict[str, Any]], None]
log = logging.getLogger("mobillm.device")
# Failures of the link or the server, not of what the device sent: reconnect and go on.
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED")
# While reconnecting, also wait out a server that is full (its sessions are loading back).
RETRY_RESUME = (*RETRYABLE, "RESOURCE_EXHAUSTED")


def build_side_config(
    backbone: Backbone, task: str, num_labels: int, verbalizers: tuple[str, ...], **options: Any
) -> SideConfig:
    """A SideConfig sized to ``backbone``; verbalizer words become LM-head rows to start from.

    ``kind="split", split_layers=K`` also puts the backbone in split mode (it taps the layer
    below the top K and stops there) and records the top layers' config for the server.
    ``kind="transformer"`` records the side blocks' config, and where the backbone taps every
    layer (the default) taps ``transformer.default_taps`` instead: a side transformer reads
    every token of each tapped layer, so tapping them all would send ~3x the bytes.
    """
    head_init = options.pop("head_init", "verbalizer" if verbalizers else "random")
    ids = tuple(backbone.word_token_ids(verbalizers)) if head_init == "verbalizer" else ()
    if options.get("kind") == "split":
        backbone.set_split(options["split_layers"])
        options["layers_config"] = backbone.top_layers(options["split_layers"])[0]
    if options.get("kind") == "transformer":
        from mobillm.side import transformer
        from mobillm.side.split import SPLIT_FAMILIES

        if backbone.cfg.quant != "none":
            raise ConfigError(
                "the side transformer starts from the backbone's float weights, pruned: "
                "use --learner ladder or split with --device-quant int8"
            )
        arch = backbone.model.config.model_type
        if arch not in SPLIT_FAMILIES:
            raise ConfigError(f"the side transformer supports {list(SPLIT_FAMILIES)}, not {arch!r}")
        if len(backbone.taps) == backbone.num_layers:
            backbone.set_taps(transformer.default_taps(backbone.num_layers))
        reduction = options.get("reduction", SideConfig.reduction)
        options["layers_config"] = transformer.side_layers_config(
            backbone.model.config, backbone.taps, reduction
        )
    return SideConfig(
        hidden_size=backbone.hidden_size,
        num_taps=len(backbone.taps),
        task=task,
        num_labels=num_labels if task == "classification" else 2,
        head_init=head_init,
        verbalizer_ids=ids,
        **options,
    )


def build_session(
    backbone: Backbone,
    side: SideConfig,
    codec: CodecConfig,
    train: TrainConfig,
    positions: str = "loss",
    private_labels: bool = False,
) -> tuple[SessionSpec, dict[str, torch.Tensor]]:
    """The session proposal for ``backbone`` and the frozen tensors it promises the server.

    The tensors are the head's, and for a split learner also the top layers' (``layers.*``);
    ``head_sha256`` covers all of them. Hashing reads every one of them, hundreds of MB for a
    split learner: each piece's pages are handed back once hashed. A private-label session
    sends no LM-head rows and no verbalizer ids: the device keeps the classifier they start.
    """
    head_spec, head = backbone.export_head([] if private_labels else side.head_rows)
    if private_labels:
        side = side.replace(head_init="random", verbalizer_ids=())
    if side.kind == "split":
        head = {**head, **backbone.top_layers(side.split_layers)[1]}
    if side.kind == "transformer":
        from mobillm.side.transformer import prune_layers

        tapped = [backbone.layers[t].state_dict() for t in backbone.taps]
        head = {**head, **prune_layers(backbone.model.config, tapped, side.reduction)}
        if backbone.cfg.stream:  # the pruned copies are what is kept
            pages.release(t for w in tapped for t in w.values())
    spec = SessionSpec(
        fingerprint=backbone.fingerprint,
        taps=backbone.taps,
        side=side,
        head=head_spec,
        head_sha256=tensors_sha256(head, done=pages.releaser()),
        codec=codec,
        train=train,
        positions=positions,
        client="mobillm-device",
        private_labels=private_labels,
    )
    return spec, head


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """One step of a run: a batch streamed, or (private labels) a cached step replayed.

    ``replay_of``: the cache index the server replays instead of new frames. ``score``: after
    this step the validation split of epoch ``score`` (0 = untrained) has been scored.
    """

    data: TokenizedDataset
    idx: list[int]
    validation: bool
    replay_of: int | None = None
    score: int | None = None
    epoch: int = 0  # 0: the validation split streamed before training


class DeviceTrainer:
    """Runs one training session against any ``Transport``."""

    def __init__(
        self,
        backbone: Backbone,
        side: SideConfig,
        transport: Transport,
        codec: CodecConfig | None = None,
        train: TrainConfig | None = None,
        device: DeviceConfig | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        self.backbone = backbone
        # private labels: where the head the device keeps is saved as it trains
        self.state_dir = Path(state_dir) / "labels" if state_dir is not None else None
        self.side = side
        self.transport = transport
        self.codec = codec or CodecConfig()
        self.train_cfg = train or TrainConfig()
        self.cfg = device or DeviceConfig()
        self.positions = side.positions if self.cfg.positions == "auto" else self.cfg.positions
        self.private = self.cfg.labels_private(side.task)
        check(
            not self.private or self.cfg.window <= MAX_PRIVATE_WINDOW,
            f"DeviceConfig.window must be <= {MAX_PRIVATE_WINDOW} with private labels (the "
            "steps a server queues behind one that waits for its gradient; --standard-labels "
            "lifts this)",
        )
        check(
            not self.cfg.label_epsilon or side.task == "classification",
            "DeviceConfig.label_epsilon randomizes class labels: it applies to classification "
            "only (causal-LM targets are the text itself)",
        )
        self.records: list[StepRecord] = []
        self.epochs: list[EpochReport] = []
        self.bytes_encoded = 0
        self.forward_seconds = 0.0
        self.forward_samples = 0
        self.reconnects = 0
        self.stopped = False
        self.info: SessionInfo | None = None
        self.labels: LabelHead | None = None  # private labels: the head the device keeps
        self._best: tuple[int, dict[str, float], Any, dict[str, torch.Tensor]] | None = None
        self._scores: dict[int, dict[str, float]] = {}  # validation scores by epoch
        self._planned: list[PlannedStep] = []
        self._markers: list[tuple[int, int]] = []  # (plan index, epoch) of validation passes
        self._validation_samples = 0
        # the frame noise's seed never leaves the device (the server could subtract the noise)
        seed = self.cfg.frame_noise_seed
        self.noise_seed = seed if seed >= 0 else draw_noise_seed()
        self.label_seed = self.cfg.label_seed
        if self.cfg.label_epsilon and self.label_seed < 0:
            self.label_seed = device_label_secret()
        self._labels_randomized = False  # train() randomizes them; step() refuses otherwise

    def _train_config(self, total_steps: int) -> TrainConfig:
        return self.train_cfg.replace(
            total_steps=total_steps, epochs=self.cfg.epochs, replay=self.cfg.replay
        )

    def _session_spec(self, total_steps: int) -> tuple[SessionSpec, dict[str, torch.Tensor]]:
        train = self._train_config(total_steps)
        return build_session(
            self.backbone, self.side, self.codec, train, self.positions, self.private
        )

    def _upload_head(self, head: dict[str, torch.Tensor]) -> None:
        # Streamed: the device holds about one piece of the tensors and a chunk or two of
        # bytes at a time, not the whole safetensors payload (715 MB for half of Qwen2.5-0.5B).
        self.transport.upload_head(safetensors_stream(head, release=pages.releaser()))

    def open(self, total_steps: int, session: SessionInfo | None = None) -> SessionInfo:
        """Propose the session and upload the frozen head if the server lacks it; or, given
        ``session`` (a crashed run's), attach to it and resume where the server stands."""
        self._total_steps = total_steps
        if session is not None:
            if self.private:
                self._restore_labels(total_steps, session.session_id)
            self.info = self.transport.attach(session)
            return self.info
        spec, head = self._session_spec(total_steps)
        self.info = self.transport.open(spec)
        if spec.private_labels:
            sid = self.info.session_id
            folder = self.state_dir
            self.labels = LabelHead(self.side, self._device_head(), spec.train, sid, folder)
            self.transport.set_responder(self.labels)
        if self.info.need_head:
            self._upload_head(head)
        return self.info

    def _restore_labels(self, total_steps: int, sid: str) -> None:
        """A restarted private-label device: its head, best epoch and scores from disk."""
        folder = self.state_dir
        train = self._train_config(total_steps)
        labels = None
        if folder is not None and folder.is_dir():
            labels = LabelHead.restore(self.side, self._device_head(), train, sid, folder)
        if labels is None:
            raise RemoteError(
                "FAILED_PRECONDITION",
                "this private-label session cannot be resumed: the device kept no state of "
                "its classifier (run with an output folder); start the run again",
            )
        self.labels = labels
        self.transport.set_responder(labels)
        assert folder is not None
        if (folder / "scores.json").is_file():
            self._scores = {
                int(k): v for k, v in json.loads((folder / "scores.json").read_text()).items()
            }
        if (folder / "best.json").is_file():
            best = json.loads((folder / "best.json").read_text())
            blob = SideBlob(best["meta_json"], (folder / "best.safetensors").read_bytes())
            kept = load((folder / "best-head.safetensors").read_bytes())
            self._best = (best["epoch"], best["scores"], blob, kept)

    def _save_scores(self, new_best: bool) -> None:
        """Private labels with a state folder: the scores, and the best epoch when it changed."""
        folder = self.state_dir
        if folder is None:
            return
        (folder / "scores.json").write_text(json.dumps(self._scores))
        if new_best and self._best is not None:
            epoch, scores, blob, kept = self._best
            (folder / "best.safetensors").write_bytes(blob.weights)
            save_file(kept, str(folder / "best-head.safetensors"))
            best = {"epoch": epoch, "scores": scores, "meta_json": blob.meta_json}
            (folder / "best.json").write_text(json.dumps(best))

    def _device_head(self) -> FrozenHead:
        """The head a private-label device keeps: verbalizer rows, or the whole LM head."""
        spec, tensors = self.backbone.export_head(self.side.head_rows)
        return FrozenHead(spec, tensors)

    def _send_step(
        self, step: int, batch: Any, validation: bool = False, replay_of: int | None = None
    ) -> int:
        """Send one step: its StepBegin, then (unless it replays a cached step) its frames."""
        assert self.info is not None
        plan = plan_rows(batch, self.positions)
        sid, chunk = self.info.session_id, self.info.max_chunk_bytes
        begin = StepBegin(
            sid, step, plan.rows_per_sample, plan.pool_rows, batch.labels, plan.targets, validation
        )
        if self.labels is not None:
            if plan.targets is not None:
                mask = plan.targets != -100
                self.labels.expect(step, plan.targets[mask], validation)
                begin.loss_mask = mask
            else:
                self.labels.expect(step, batch.labels, validation)
            begin.labels = begin.targets = None
            begin.replay_of = replay_of
        self.transport.send(begin)
        if replay_of is not None:
            return len(batch)

        def on_layer(tap: int, hidden: torch.Tensor) -> None:
            rows = plan.gather(hidden)
            if self.cfg.frame_noise:
                rows = add_frame_noise(rows, self.cfg.frame_noise, self.noise_seed, step, tap)
            frame = encode(rows, self.codec)
            self.bytes_encoded += len(frame)
            for part in chunk_frame(sid, step, tap, frame, chunk):
                self.transport.send(part)

        t0 = time.perf_counter()
        self.backbone.run(batch.input_ids, batch.attention_mask, on_layer)
        self.forward_seconds += time.perf_counter() - t0
        self.forward_samples += len(batch)
        return len(batch)

    def begin(
        self,
        total_steps: int,
        progress: ProgressFn | None = None,
        session: SessionInfo | None = None,
    ) -> None:
        """Open the session for ``total_steps`` steps (the server's LR schedule needs it)."""
        self.open(total_steps, session)
        self._resuming = session is not None
        self._total, self._progress = total_steps, progress
        self._t_start = time.perf_counter()
        self._in_flight: dict[int, tuple[int, float]] = {}
        self._next_step = 0
        self._steps_per_epoch = total_steps

    def step(self, batch: Any, validation: bool = False, replay_of: int | None = None) -> None:
        """Stream one batch; returns once fewer than ``window`` steps are unacknowledged.

        A ``validation`` batch is scored by the server, never trained on. ``replay_of``
        (private labels): the server runs that cached step again; no forward pass here.
        """
        check(
            not self.cfg.label_epsilon or self._labels_randomized,
            "DeviceConfig.label_epsilon: the labels are randomized by train(); drive the run "
            "with train(), not step()",
        )
        sent_at = time.perf_counter()
        step = self._next_step
        samples = self._send_step(step, batch, validation, replay_of)
        self._in_flight[step] = (samples, sent_at)
        self._next_step += 1
        while len(self._in_flight) >= self.cfg.window:
            self._collect()

    def drain(self) -> None:
        """Wait until the server has acknowledged every step sent so far."""
        while self._in_flight:
            self._collect()

    def _collect(self) -> None:
        ack = self.transport.next_ack()
        samples, sent_at = self._in_flight.pop(ack.step)
        seconds = time.perf_counter() - sent_at
        self._record(ack, samples, seconds, self._t_start, self._total, self._progress)

    def finish(self, progress: ProgressFn | None = None) -> list[EpochReport]:
        """After the last step: the server's remaining epochs, reported as they finish (a
        private-label device trained and scored them itself: its own reports)."""
        self.drain()
        reports = list(self.transport.finish()) if self.labels is None else []
        if self.labels is not None:
            list(self.transport.finish())  # the server only closes training
            reports = self._private_reports()
        for report in reports:
            self.epochs.append(report)
            if progress is not None:
                progress({"epoch": report.epoch, **report.metrics})
        return self.epochs

    def _catch_up(self, plan: list[PlannedStep]) -> None:
        """Private labels: score every epoch whose validation pass has been sent and not
        scored yet, also one a reconnect skipped past (resending starts after it)."""
        for j, e in self._markers:
            if j >= self._next_step:
                return
            if e not in self._scores:
                self._score(e)

    def _score(self, epoch: int) -> None:
        """Epoch ``epoch``'s validation split is scored; download the network if it is best."""
        assert self.labels is not None
        self.drain()
        scores = self.labels.peek_scores()
        best = scores is not None and (self._best is None or _better(scores, self._best[1]))
        if best:
            assert scores is not None
            self._best = (epoch, scores, self.transport.download(), self.labels.state())
        self.labels.take_scores()  # only now: a failed download is retried with these scores
        self._scores[epoch] = scores or {}
        self._save_scores(best)

    def _private_reports(self) -> list[EpochReport]:
        """One report per epoch, from the device's own losses and validation scores."""
        plan = self._planned
        train = [r for r in self.records if not r.metrics.get("validation")]
        epochs = sorted({plan[r.step].epoch for r in train})
        reports = []
        for e in epochs:
            losses = [r.loss for r in train if plan[r.step].epoch == e]
            metrics = {"train_loss": sum(losses) / len(losses), "steps": float(len(losses))}
            reports.append(EpochReport(e, metrics | self._scores.get(e, {})))
        if reports:
            last = reports[-1]
            last.last = True
            if self._best is not None:
                last.metrics["best_epoch"] = float(self._best[0])
            untrained = self._scores.get(0, {})
            last.metrics |= {f"untrained_{k}": v for k, v in untrained.items()}
        return reports

    def start(
        self,
        data: TokenizedDataset,
        batch_size: int,
        seed: int = 0,
        progress: ProgressFn | None = None,
        session: SessionInfo | None = None,
    ) -> SessionInfo:
        """Plan the epochs over ``data`` and open the session (handshake, head upload).

        ``train`` calls it when the session is not open yet; a caller that has slow work to do
        first (evaluating the untrained model) calls it before, so an unreachable server or a
        refused session fails in seconds, not after that work. ``session``: attach to this
        session of a run that crashed instead (``mobillm train --resume``); ``train`` then
        resumes it where the server stands.
        """
        batches = epoch_batches(data.lengths, batch_size, seed, 0, self.cfg.length_group)
        total = len(batches) * self.cfg.epochs
        if self.cfg.max_steps:
            total = min(total, self.cfg.max_steps)
        if total == 0:
            raise ValueError("no training batches: the training set is empty")
        self.begin(total, progress, session)
        self._batches = batches
        self._steps_per_epoch = min(len(batches), total)
        streamed = 1 if self.cfg.replay and not self.private else self.cfg.epochs
        self._total = min(total, len(batches) * streamed)  # what progress counts: device steps
        assert self.info is not None
        return self.info

    def train(
        self,
        data: TokenizedDataset,
        batch_size: int,
        seed: int = 0,
        progress: ProgressFn | None = None,
        validation: TokenizedDataset | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Stream ``validation`` once, then ``data``; the server trains the configured epochs.

        With ``replay`` the device streams ``data`` once and the server replays the rest;
        without it the device re-streams the first epoch's batches in ``epoch_step_order``.
        ``stop`` is asked before every step: once it says True the device waits for the
        steps in flight and ends there, with no further epochs (``summary()["stopped"]``).
        Returns a summary dict.
        """
        if self.cfg.label_epsilon:
            data = self._randomized(data)
            if validation is not None and not self.private:  # it would reach the server
                validation = self._randomized(validation)
            self._labels_randomized = True
        if self.info is None:
            self.start(data, batch_size, seed, progress)
        plan = self._planned = self._plan(data, batch_size, seed, validation)
        self._markers = [(j, p.score) for j, p in enumerate(plan) if p.score is not None]
        self._t_start = time.perf_counter()  # the clock starts with the first step
        if self._resuming:
            self._recover(RemoteError("UNAVAILABLE", "this device restarted"))
        while True:
            try:
                while not self.stopped:
                    if self.labels is not None:
                        self._catch_up(plan)
                    if self._next_step >= len(plan):
                        break
                    if stop is not None and stop():
                        self.stopped = True
                        break
                    item = plan[self._next_step]
                    self.step(collate(item.data, item.idx), item.validation, item.replay_of)
                if self.stopped:
                    self.drain()
                else:
                    self.finish(progress)
                break
            except RemoteError as e:
                if e.code not in RETRYABLE or not self.cfg.reconnect_seconds:
                    raise
                self._recover(e)
        return self.summary()

    @property
    def plan(self) -> list[PlannedStep]:
        """Every step of the run, in order, as ``train`` planned it (empty before)."""
        return self._planned

    def _randomized(self, data: TokenizedDataset) -> TokenizedDataset:
        eps, classes = self.cfg.label_epsilon, self.side.num_labels
        return randomized_labels(data, eps, classes, self.label_seed)

    def _plan(
        self,
        data: TokenizedDataset,
        batch_size: int,
        seed: int,
        validation: TokenizedDataset | None,
    ) -> list[PlannedStep]:
        """Every step the device sends, in order: the validation split once, then the
        training batches (one epoch with replay; all epochs in ``epoch_step_order`` without).

        Private labels: the device also sends the cache epochs (replays of the streamed
        steps) and, after each epoch, the validation split again as replays, scored here.
        """
        val: list[list[int]] = []
        if validation is not None and len(validation):
            val = epoch_batches(validation.lengths, batch_size, seed, 0, 0)
        self._validation_samples = sum(len(idx) for idx in val)  # streamed once
        private = self.private
        plan = [PlannedStep(validation, idx, True) for idx in val]  # type: ignore[arg-type]
        if private and plan:
            plan[-1] = dataclasses.replace(plan[-1], score=0)
        # a private-label device sends every step itself, replays of the cache included
        cap = self._total_steps if private else self._total
        trained = 0
        for epoch in range(self.cfg.epochs):
            for i in epoch_step_order(len(self._batches), self.train_cfg.seed, epoch):
                if trained >= cap:
                    break
                replay_of = i if private and self.cfg.replay and epoch else None
                plan.append(PlannedStep(data, self._batches[i], False, replay_of, None, epoch + 1))
                trained += 1
            if private and val:
                for j, idx in enumerate(val):
                    step = PlannedStep(validation, idx, True, j, None, epoch + 1)  # type: ignore[arg-type]
                    plan.append(step)
                plan[-1] = dataclasses.replace(plan[-1], score=epoch + 1)
            if trained >= cap:
                break
        return plan

    def _recover(self, err: RemoteError) -> None:
        """Reach the server again (backing off), then go on from the steps it holds."""
        deadline = time.monotonic() + self.cfg.reconnect_seconds
        delay, last = 0.5, err
        while True:
            try:
                state = self.transport.resume()
                break
            except RemoteError as e:
                last = e
                if e.code not in RETRY_RESUME:  # no retry can mend it: said as it is
                    raise RemoteError(
                        e.code, f"{e.message} (when reconnecting after: {err.message})"
                    ) from None
                if time.monotonic() + delay > deadline:
                    raise RemoteError(
                        e.code,
                        f"{e.message} (gave up reconnecting after {self.cfg.reconnect_seconds:.0f}"
                        f" s; first failure: {err.message})",
                    ) from None
                time.sleep(delay)
                delay = min(2 * delay, 10.0)
        if state.need_head:  # the upload itself broke off
            self._upload_head(self._session_spec(self._total_steps)[1])
        if self.labels is not None:
            self.labels.reset(state.steps_done, state.last_ack)
        self.reconnects += 1
        log.warning(
            "reconnected after %s (%s); the server holds %d steps, resending from there",
            err.code,
            last.message if last is not err else err.message,
            state.steps_done,
        )
        # acks of the steps after the server's checkpoint are void: those steps are redone
        self.records = [r for r in self.records if r.step < state.steps_done]
        self._in_flight.clear()
        self._next_step = state.steps_done
        self.epochs = []

    def summary(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._t_start
        # samples the device computed (a private-label device's replays of the server's cache
        # are steps too, but cost it no forward pass)
        plan = self._planned
        replayed = [
            r for r in self.records if r.step < len(plan) and plan[r.step].replay_of is not None
        ]
        samples = sum(r.samples for r in self.records) - sum(r.samples for r in replayed)
        train = [r for r in self.records if not r.metrics.get("validation")]
        distinct = sum(r.samples for r in train[: self._first_epoch_steps()])
        distinct += self._validation_samples  # streamed once (private labels replay them)
        out: dict[str, Any] = {
            "steps": len(self.records),
            "validation_steps": len(self.records) - len(train),
            "replayed_steps": len(replayed),
            "samples": samples,
            "wall_seconds": round(wall, 3),
            "forward_seconds": round(self.forward_seconds, 3),
            "samples_per_second": round(samples / wall, 3),
            "bytes_encoded": self.bytes_encoded,
            "bytes_sent": self.transport.bytes_sent,
            "bytes_per_sample": round(self.bytes_encoded / max(1, samples), 1),
            "final_loss": train[-1].loss if train else float("nan"),
            "mean_loss_last_10pct": _tail_mean([r.loss for r in train]),
            # what the device computed per distinct sample, and what the server did with it
            "device_forward_passes_per_sample": round(self.forward_samples / max(1, distinct), 3),
            "server_epochs": self.epochs[-1].epoch if self.epochs else 0,
            "reconnects": self.reconnects,
            "stopped": self.stopped,
        }
        if self.epochs:
            out["epochs"] = [{"epoch": e.epoch, **e.metrics} for e in self.epochs]
            if "best_epoch" in self.epochs[-1].metrics:
                out["kept_epoch"] = int(self.epochs[-1].metrics["best_epoch"])
        return out

    def _first_epoch_steps(self) -> int:
        return self._steps_per_epoch

    def _record(
        self,
        ack: Ack,
        samples: int,
        seconds: float,
        t_start: float,
        total: int,
        progress: ProgressFn | None,
    ) -> None:
        rec = StepRecord(
            ack.step,
            ack.loss,
            samples,
            seconds,
            self.bytes_encoded,
            self.transport.bytes_sent,
            ack.metrics,
        )
        self.records.append(rec)
        if progress is None or ack.metrics.get("validation"):
            return
        wall = time.perf_counter() - t_start
        done = sum(r.samples for r in self.records)
        progress(
            {
                "step": sum(not r.metrics.get("validation") for r in self.records),
                "total": total,
                "loss": ack.loss,
                "samples_per_s": done / max(wall, 1e-9),
                "mb_encoded": self.bytes_encoded / 1e6,
                "mb_sent": self.transport.bytes_sent / 1e6,
                "link_mb_s": self.transport.bytes_sent / 1e6 / max(wall, 1e-9),
                **ack.metrics,
            }
        )

    def download(self, out_dir: str | Path, task_meta: dict[str, Any]) -> Path:
        """Fetch the trained side network and save it with the device's task metadata.

        Private labels: the best epoch's download, with the classifier the device kept (a
        stopped run's network as it stands, as in the standard mode).
        """
        if self._best is not None and not self.stopped:
            _, _, blob, kept = self._best
        else:
            blob = self.transport.download()
            kept = self.labels.state() if self.labels is not None else {}
        meta = SideMeta.from_dict(json.loads(blob.meta_json))
        if self.labels is not None:  # the server never saw the verbalizers
            meta = dataclasses.replace(meta, side=self.side)
        meta.task.update(task_meta)
        weights = weights_from_bytes(blob.weights)  # refuse a malformed download before writing
        data = blob.weights
        if kept:
            data = save({**weights, **kept}, metadata={"format": FORMAT})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / WEIGHTS).write_bytes(data)
        (out / META).write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n")
        return out

    def write_log(self, path: str | Path) -> None:
        with Path(path).open("w") as f:
            for r in self.records:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")


def _better(new: dict[str, float], old: dict[str, float]) -> bool:
    """The server's rule for the best epoch: accuracy, then loss."""
    if "val_accuracy" in new and new["val_accuracy"] != old["val_accuracy"]:
        return new["val_accuracy"] > old["val_accuracy"]
    return new["val_loss"] < old["val_loss"]


def _tail_mean(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    k = max(1, len(xs) // 10)
    return round(sum(xs[-k:]) / k, 5)
