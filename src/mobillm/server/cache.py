"""The server's activation cache: each streamed step kept once, still encoded, for later epochs.

A device streams its training set once; the server keeps every step's row layout, labels and
codec frames so that epochs after the first, and the scoring of a validation split after each
epoch, cost the device nothing. Frames stay encoded (int8 is 4x smaller than the decoded
floats). Every step is written to the session's folder as safetensors (never pickle), named by
its step number, so a restarted server finds the steps its last checkpoint had seen
(``reopen``); the first ``memory_bytes`` of steps are also kept in memory for fast replay.
``clear`` deletes them.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mobillm.config import Config, check
from mobillm.transport.messages import RemoteError, StepBegin


@dataclasses.dataclass(frozen=True)
class CacheConfig(Config):
    """Byte budgets of one session's cache: all steps on disk, and the part of them also kept
    in memory (both 0 disables the cache)."""

    memory_bytes: int = 256 << 20
    disk_bytes: int = 4 << 30

    def validate(self) -> None:
        check(self.memory_bytes >= 0, "CacheConfig.memory_bytes must be >= 0")
        check(self.disk_bytes >= 0, "CacheConfig.disk_bytes must be >= 0")
        check(
            self.disk_bytes > 0 or self.memory_bytes == 0,
            "CacheConfig: every cached step is also on disk (a restarted server resumes from "
            "it), so disk_bytes must be > 0 when memory_bytes is",
        )

    @property
    def enabled(self) -> bool:
        return self.memory_bytes + self.disk_bytes > 0


@dataclasses.dataclass
class CachedStep:
    """One step as streamed: its layout and labels, and one codec frame per tapped layer."""

    begin: StepBegin
    frames: list[bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.frames) + _layout_bytes(self.begin)


def _layout_bytes(b: StepBegin) -> int:
    ts = (b.rows_per_sample, b.pool_rows, b.labels, b.targets, b.loss_mask)
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class ActivationCache:
    """The steps of one session, train and validation, in the order they were streamed."""

    def __init__(self, cfg: CacheConfig, folder: Path) -> None:
        self.cfg = cfg
        self.folder = folder
        self._train: list[CachedStep | Path] = []
        self._validation: list[CachedStep | Path] = []
        self.memory_bytes = 0
        self.disk_bytes = 0

    @property
    def num_train(self) -> int:
        return len(self._train)

    @property
    def num_validation(self) -> int:
        return len(self._validation)

    def check(self, step: CachedStep) -> None:
        """RESOURCE_EXHAUSTED if ``step`` would not fit in the disk budget."""
        if self.disk_bytes + step.nbytes > self.cfg.disk_bytes:
            raise RemoteError(
                "RESOURCE_EXHAUSTED",
                f"activation cache full ({self.disk_bytes} B on disk); stream fewer samples, "
                "or train without cache epochs",
            )

    def add(self, step: CachedStep) -> None:
        """Keep ``step``; RESOURCE_EXHAUSTED once the disk budget is spent."""
        n = step.nbytes
        where = self._validation if step.begin.validation else self._train
        self.check(step)
        self.disk_bytes += n
        path = self._spill(step, step.begin.step)
        if self.memory_bytes + n <= self.cfg.memory_bytes:
            self.memory_bytes += n
            where.append(step)
        else:
            where.append(path)

    def reopen(self, steps_done: int) -> None:
        """Index the steps on disk before ``steps_done`` (a checkpoint's); delete the rest."""
        self._train, self._validation = [], []
        self.memory_bytes = self.disk_bytes = 0
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("step-*.safetensors")):
            if int(path.stem.removeprefix("step-")) >= steps_done:
                path.unlink()
                continue
            with safe_open(str(path), "pt") as f:
                validation = (f.metadata() or {}).get("validation") == "1"
            self.disk_bytes += path.stat().st_size
            (self._validation if validation else self._train).append(path)

    def _spill(self, step: CachedStep, index: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        b = step.begin
        tensors = {"rows_per_sample": b.rows_per_sample.contiguous(), "pool_rows": b.pool_rows}
        if b.labels is not None:
            tensors["labels"] = b.labels.contiguous()
        if b.targets is not None:
            tensors["targets"] = b.targets.contiguous()
        if b.loss_mask is not None:
            tensors["loss_mask"] = b.loss_mask.contiguous()
        for i, f in enumerate(step.frames):
            tensors[f"frame.{i}"] = torch.frombuffer(bytearray(f), dtype=torch.uint8)
        path = self.folder / f"step-{index:07d}.safetensors"
        save_file(tensors, str(path), metadata={"validation": str(int(b.validation))})
        return path

    def _load(self, item: CachedStep | Path) -> CachedStep:
        if isinstance(item, CachedStep):
            return item
        t = load_file(str(item))
        frames = []
        while f"frame.{len(frames)}" in t:
            frames.append(t[f"frame.{len(frames)}"].numpy().tobytes())
        begin = StepBegin(
            "",
            -1,
            t["rows_per_sample"],
            t["pool_rows"],
            t.get("labels"),
            t.get("targets"),
            validation=item in self._validation,
            loss_mask=t.get("loss_mask"),
        )
        return CachedStep(begin, frames)

    def train_step(self, i: int) -> CachedStep:
        return self._load(self._train[i])

    def validation_step(self, i: int) -> CachedStep:
        return self._load(self._validation[i])

    def validation_steps(self) -> list[CachedStep]:
        return [self._load(x) for x in self._validation]

    def clear(self) -> None:
        """Forget every step and delete the spilled files."""
        self._train, self._validation = [], []
        self.memory_bytes = self.disk_bytes = 0
        shutil.rmtree(self.folder, ignore_errors=True)
