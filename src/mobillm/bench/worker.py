"""One benchmark method in its own process: ``python -m mobillm.bench.worker JOB_JSON OUT_JSON``.

A job is ``{"mode": "cost" | "race", "method": "mobillm" | "lora" | "full" | "side_local", ...}``.
*cost* trains a few steps on batches of exactly ``batch x seq`` tokens and reports the process's
peak RSS and device seconds per sample. *race* trains on SST-2 for a sample budget and
evaluates on the dev set at checkpoints (the clock stops while it evaluates), so accuracy can
be plotted against training wall time. The process's peak RSS is what a phone's OS would
count, so each method runs alone in a fresh process.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mobillm.backbone import Backbone, BackboneConfig
from mobillm.codec import CodecConfig
from mobillm.data import (
    Batch,
    DataConfig,
    TokenizedDataset,
    collate,
    epoch_batches,
    epoch_order,
    hold_out,
    load_examples,
    resolve_preset,
    tokenize_examples,
)
from mobillm.device.local import LocalModel
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.transport.link import LinkConfig
from mobillm.transport.messages import TrainConfig


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fixed_batches(backbone: Backbone, n: int, batch: int, seq: int, seed: int) -> list[Batch]:
    """``n`` batches of ``batch`` x ``seq`` real SST-2 tokens (sentences packed end to end)."""
    cfg = resolve_preset(DataConfig(preset="sst2", max_train_samples=4 * n * batch * seq // 8))
    texts = [ex.text for ex in load_examples(cfg, "train")]
    stream: list[int] = []
    for t in texts:
        stream += backbone.tokenizer(t + " .", add_special_tokens=False)["input_ids"]
    need = n * batch * seq
    while len(stream) < need:
        stream += stream
    ids = torch.tensor(stream[:need]).reshape(n, batch, seq)
    g = torch.Generator().manual_seed(seed)
    return [
        Batch(
            ids[i],
            torch.ones_like(ids[i]),
            labels=torch.randint(0, 2, (batch,), generator=g),
            loss_positions=torch.full((batch,), seq - 1),
        )
        for i in range(n)
    ]


def _mobillm(
    backbone: Backbone, job: dict[str, Any], total: int, verbalizers: tuple[str, ...]
) -> DeviceTrainer:
    from mobillm.transport.grpc_client import GrpcTransport

    mixer = job.get("mixer", "none")
    options: dict[str, Any] = {"mixer": mixer}
    if job.get("split_layers"):
        options |= {"kind": "split", "split_layers": job["split_layers"]}
    if job.get("learner"):
        options["kind"] = job["learner"]
    side = build_side_config(backbone, "classification", len(verbalizers), verbalizers, **options)
    transport = GrpcTransport(job["server"], link=LinkConfig(mbps=job.get("link_mbps", 0.0)))
    trainer = DeviceTrainer(
        backbone,
        side,
        transport,
        CodecConfig(job.get("codec", "int8")),
        TrainConfig(lr=job["lr"]),
        DeviceConfig(
            window=job.get("window", 2),
            positions=side.positions,
            epochs=job.get("epochs", 1),
            # this worker steps the trainer itself and lets the server run the cache epochs:
            # the standard protocol (private labels train the same model, up to reassociation,
            # tests/device/test_private_labels.py, and cost the device 1%: docs/results.md)
            private_labels=False,
        ),
    )
    trainer.begin(total)
    return trainer


SST2_VERBALIZERS = ("negative", "positive")


def _method(
    backbone: Backbone, job: dict[str, Any], total: int, verbalizers: tuple[str, ...]
) -> Any:
    from mobillm.bench.baselines import METHODS

    side = build_side_config(backbone, "classification", len(verbalizers), verbalizers)
    return METHODS[job["method"]](backbone, side, job["lr"], total)


def run_cost(backbone: Backbone, job: dict[str, Any]) -> dict[str, Any]:
    steps, b = job.get("steps", 2), job["batch"]
    batches = fixed_batches(backbone, steps + 1, b, job["seq"], job.get("seed", 0))
    times: list[float] = []
    if job["method"] == "mobillm":
        trainer = _mobillm(backbone, job, steps + 1, SST2_VERBALIZERS)
        for batch in batches:
            before = trainer.forward_seconds
            trainer.step(batch)
            times.append(trainer.forward_seconds - before)  # forward + gather + encode
        trainer.drain()
        extra = {"bytes_per_sample": trainer.bytes_encoded / (b * len(batches))}
        trainer.transport.close()
    else:
        method = _method(backbone, job, steps + 1, SST2_VERBALIZERS)
        for batch in batches:
            t0 = time.perf_counter()
            method.train_step(batch)
            times.append(time.perf_counter() - t0)
        extra = {"trainable": method.num_trainable}
    measured = sorted(times[1:])  # the first step warms up allocators and kernels
    return {"seconds_per_sample": measured[len(measured) // 2] / b, "step_seconds": times, **extra}


def _evaluate(predict: Any, data: TokenizedDataset, batch: int) -> float:
    correct = 0
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))  # less padding
    for start in range(0, len(data), batch):
        idx = order[start : start + batch]
        b = collate(data, idx)
        correct += int((predict(b) == b.labels).sum())
    return correct / len(data)


def _subset(data: TokenizedDataset, k: int) -> TokenizedDataset:
    idx = sorted(epoch_order(len(data), True, seed=1234)[:k])
    return dataclasses.replace(
        data,
        input_ids=[data.input_ids[i] for i in idx],
        labels=[data.labels[i] for i in idx] if data.labels is not None else None,
    )


def run_race(backbone: Backbone, job: dict[str, Any]) -> dict[str, Any]:
    """Train on a preset's data for a sample budget; dev accuracy at checkpoints and at the end.

    MobiLLM may hold out ``validation_fraction`` of the budget as the validation split it
    streams once, and train ``epochs`` epochs, all after the first replayed from the server's
    cache; the replayed epochs and the server's choice of epoch count as training time.
    """
    cfg = resolve_preset(
        DataConfig(
            preset=job.get("data", "sst2"), max_train_samples=job["budget"], seed=job.get("seed", 0)
        )
    )
    verbalizers = cfg.verbalizers
    mobillm = job["method"] == "mobillm"
    train_ex = load_examples(cfg, "train")
    val = None
    if mobillm and job.get("validation_fraction", 0.0):
        train_ex, val_ex = hold_out(train_ex, job["validation_fraction"], cfg.seed)
        val = tokenize_examples(val_ex, backbone.tokenizer, cfg)
    train = tokenize_examples(train_ex, backbone.tokenizer, cfg)
    dev = tokenize_examples(load_examples(cfg, "eval"), backbone.tokenizer, cfg)
    # checkpoints read a fixed subset of dev (evaluation is costly on a phone-class CPU);
    # the final model also gets the whole dev set
    k = job.get("eval_subset", 0)
    probe = _subset(dev, k) if 0 < k < len(dev) else dev
    b = job["batch"]
    batches = epoch_batches(train.lengths, b, job.get("seed", 0), 0, 32)
    every = max(1, len(batches) // job.get("checkpoints", 5))
    epochs = job.get("epochs", 1) if mobillm else 1
    if mobillm:
        trainer = _mobillm(backbone, job, len(batches) * epochs, verbalizers)
    else:
        method = _method(backbone, job, len(batches), verbalizers)
    curve, clock, samples = [], 0.0, 0
    if val is not None:
        t0 = time.perf_counter()
        for idx in epoch_batches(val.lengths, b, 0, 0, 0):
            trainer.step(collate(val, idx), validation=True)
        clock += time.perf_counter() - t0
    for i, idx in enumerate(batches, 1):
        t0 = time.perf_counter()
        if mobillm:
            trainer.step(collate(train, idx))
        else:
            method.train_step(collate(train, idx))
        samples += len(idx)
        last = i == len(batches)
        if i % every == 0 or last:
            if mobillm:
                trainer.drain()  # the steps in flight are part of training, not of evaluation
                if last:
                    trainer.finish()  # cache epochs and the choice of epoch are training too
            clock += time.perf_counter() - t0
            if mobillm:
                blob = trainer.transport.download()
                model = LocalModel.from_blob(backbone, blob.meta_json, blob.weights)
                predict = lambda batch, m=model: m.class_logits(batch).argmax(-1)  # noqa: E731
            else:
                predict = method.predict
            acc = _evaluate(predict, probe, 32)
            curve.append({"samples": samples, "train_seconds": round(clock, 2), "accuracy": acc})
            print(
                f"[{job['method']}] {samples} samples, {clock:.0f}s: dev accuracy {acc:.4f}",
                file=sys.stderr,
                flush=True,
            )
        else:
            clock += time.perf_counter() - t0
    extra: dict[str, Any] = {
        "full_dev_accuracy": _evaluate(predict, dev, 32),
        "dev": len(dev),
        "probe": len(probe),
        "train_samples": len(train),
    }
    if mobillm:
        s = trainer.summary()
        extra.update(
            bytes_per_sample=s["bytes_per_sample"],
            bytes_sent=s["bytes_sent"],
            validation_samples=len(val) if val is not None else 0,
            device_forward_passes_per_sample=s["device_forward_passes_per_sample"],
            server_epochs=s["server_epochs"],
            kept_epoch=s.get("kept_epoch"),
            epochs_report=s.get("epochs", []),
            forward_seconds=s["forward_seconds"],
            streamed_samples=s["samples"],
        )
        closed = trainer.transport.close()
        extra["server_optimizer_steps"] = closed.get("optimizer_steps", 0)
    return {
        "curve": curve,
        "final_accuracy": curve[-1]["accuracy"],
        "samples": samples,
        "train_seconds": clock,
        **extra,
    }


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    torch.manual_seed(job.get("seed", 0))
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    backbone = Backbone.load(
        BackboneConfig(
            source=job["model"],
            dtype=job.get("dtype", "float32"),
            stream=job.get("stream", False),
            quant=job.get("device_quant", "none"),
        )
    )
    loaded_mb = peak_rss_mb()
    run = run_cost if job["mode"] == "cost" else run_race
    result = {
        **job,
        **run(backbone, job),
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_load_mb": loaded_mb,  # small: weights are mapped, resident once read
        "weights_mb": sum(p.numel() * p.element_size() for p in backbone.model.parameters())
        / 2**20,
    }
    Path(argv[1]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
