"""Argument groups and builders shared by the subcommands; the CLI itself stays thin."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mobillm.backbone import BackboneConfig
from mobillm.backbone.model import DTYPES
from mobillm.codec import CodecConfig
from mobillm.codec.schemes import MAX_GROUP_SIZE, MIN_GROUP_SIZE, scheme_names, valid_group_size
from mobillm.data import DataConfig, resolve_preset
from mobillm.data.config import FORMATS, PRESETS, QUOTINGS, TASKS
from mobillm.device.runtime import DeviceConfig
from mobillm.errors import ConfigError
from mobillm.side.config import HEAD_INITS, LEARNER_KINDS, MIXERS, POOLINGS
from mobillm.transport.link import LinkConfig
from mobillm.transport.messages import POSITIONS, SCHEDULES, TrainConfig

# Every option with a fixed set of values or a range is checked by argparse itself (choices= or
# one of these types), so a typo ends the command with exit code 2 before a model is loaded.


def _checked(
    convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str
) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the string, then refuse it unless ``ok``."""

    def parse(s: str) -> Any:
        try:
            value = convert(s)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return value

    return parse


_count = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive = _checked(int, lambda v: v >= 1, "an integer >= 1")
_non_negative = _checked(float, lambda v: v >= 0, "a number >= 0")
_fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_rate = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
_group_size = _checked(
    int, valid_group_size, f"a power of two in [{MIN_GROUP_SIZE}, {MAX_GROUP_SIZE}]"
)


def _taps(spec: str) -> str:
    """An argparse ``type`` for ``--taps``: its syntax; indices are checked against the model."""
    try:
        BackboneConfig(taps=spec)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


DEFAULT_MODEL = "smollm2-135m"


def add_model_args(p: argparse.ArgumentParser, side: bool = False) -> None:
    """The backbone options; ``side``: a command that loads a side network, whose recorded
    model and ``--device-quant`` are the defaults (``model_from_side``)."""
    g = p.add_argument_group("backbone")
    g.add_argument(
        "--model",
        default=None if side else DEFAULT_MODEL,
        help="model folder, .gguf file, alias (smollm2-135m) or hub id (default: "
        + ("the model the side network was trained on, else " if side else "")
        + f"{DEFAULT_MODEL})",
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="backbone weight dtype on the device (default: %(default)s)",
    )
    g.add_argument(
        "--threads", type=_count, default=0, help="torch CPU threads (default: all cores)"
    )
    g.add_argument(
        "--device-quant",
        default=None if side else "none",
        choices=["none", "int8"],
        help="run the device's frozen linear layers in int8 (the side network is trained on "
        "that backbone; evaluate with the same flag) (default: "
        + ("as the side network was trained, else " if side else "")
        + "none)",
    )
    g.add_argument(
        "--stream-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep only the running layer's weights resident (memory-mapped, released after "
        "each layer, the next one prefetched): far less device memory, same results "
        "(default: on)",
    )
    g.add_argument(
        "--cold-weights",
        action="store_true",
        help="with --stream-weights: also drop each layer's pages from the page cache, so every "
        "step reads the weights from storage again (a device under memory pressure; for "
        "measuring)",
    )


def model_from_side(args: argparse.Namespace, side: str | None) -> None:
    """Fill ``--model`` and ``--device-quant`` left unset from what ``side`` (a side network's
    folder) was trained on; side networks saved before it was recorded: the defaults."""
    from mobillm.side.io import read_meta

    recorded = read_meta(side).task if side else {}
    if args.model is None:
        args.model = str(recorded.get("model") or DEFAULT_MODEL)
    if args.device_quant is None:
        args.device_quant = str(recorded.get("device_quant") or "none")


def backbone_config(args: argparse.Namespace, taps: str = "all") -> Any:
    """The ``BackboneConfig`` that the backbone options ask for."""
    from mobillm.backbone import BackboneConfig

    return BackboneConfig(
        source=args.model,
        dtype=args.dtype,
        taps=taps,
        stream=args.stream_weights or args.cold_weights,
        cold=args.cold_weights,
        quant=args.device_quant,
    )


def add_data_args(p: argparse.ArgumentParser, train: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="",
        choices=list(PRESETS),
        help="a built-in data set (fills files, columns, labels, prompt template)",
    )
    g.add_argument("--task", default=None, choices=list(TASKS))
    if train:
        g.add_argument(
            "--train-file",
            default=None,
            help="TSV, CSV, JSONL, Parquet or Arrow training file (or hub:NAME[@SPLIT])",
        )
    g.add_argument("--eval-file", default=None, help="held-out file of the same format")
    g.add_argument("--format", default=None, choices=list(FORMATS))
    g.add_argument("--encoding", default=None, help="file encoding (default utf-8)")
    g.add_argument(
        "--quoting",
        default=None,
        choices=list(QUOTINGS),
        help='TSV/CSV quoting: "csv" = standard, a text in "..." may hold the delimiter, '
        'newlines and "" for a quote; "none" = quotes are plain text, one row per line '
        "(default: csv; none for --data sst2)",
    )
    g.add_argument("--text-column", default=None)
    g.add_argument("--label-column", default=None)
    g.add_argument("--prompt-column", default=None, help="causal LM: prompt column (JSONL)")
    g.add_argument("--response-column", default=None, help="causal LM: response column (JSONL)")
    g.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        help="hold out this fraction of the training file when there is no eval file",
    )
    g.add_argument(
        "--labels",
        default=None,
        help="comma-separated label values in class order (default: inferred)",
    )
    g.add_argument(
        "--verbalizers",
        default=None,
        help="comma-separated words, one per label, for a zero-shot-initialised head",
    )
    g.add_argument(
        "--template",
        default=None,
        help="classification prompt containing {text}, e.g. 'Review: {text}\\nSentiment:'",
    )
    g.add_argument("--max-length", type=int, default=None, help="truncate to this many tokens")
    g.add_argument("--batch-size", type=int, default=None)
    if train:
        g.add_argument("--max-train-samples", type=int, default=None)
    g.add_argument("--max-eval-samples", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)


def data_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> DataConfig:
    """DataConfig from ``base`` (e.g. a saved side network's), then a preset, then the flags."""
    d = dict(base or {})
    flags = {
        "preset": args.data or None,
        "task": args.task,
        "train_path": getattr(args, "train_file", None),
        "eval_path": args.eval_file,
        "format": args.format,
        "encoding": args.encoding,
        "quoting": args.quoting,
        "text_column": args.text_column,
        "label_column": args.label_column,
        "template": _unescape(args.template),
        "prompt_column": args.prompt_column,
        "response_column": args.response_column,
        "eval_fraction": args.eval_fraction,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "max_train_samples": getattr(args, "max_train_samples", None),
        "max_eval_samples": args.max_eval_samples,
        "seed": args.seed,
        "labels": _csv(args.labels),
        "verbalizers": _csv(args.verbalizers),
    }
    d.update({k: v for k, v in flags.items() if v is not None})
    return resolve_preset(DataConfig.from_dict(d))


def _csv(s: str | None) -> tuple[str, ...] | None:
    return None if s is None else tuple(x.strip() for x in s.split(",") if x.strip())


def _unescape(s: str | None) -> str | None:
    return None if s is None else s.replace("\\n", "\n").replace("\\t", "\t")


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("side network and training")
    g.add_argument(
        "--codec",
        default="int8",
        choices=list(scheme_names()),
        help="activation codec (default: %(default)s)",
    )
    g.add_argument("--group-size", type=_group_size, default=64, help="int4/nf4 group size")
    g.add_argument(
        "--taps", type=_taps, default="all", help="all | every:K | comma list of layer indices"
    )
    g.add_argument(
        "--positions",
        default=None,
        choices=list(POSITIONS),
        help="token positions sent to the server (default: the loss positions only, or "
        "every real token for --mixer attention / --pooling mean)",
    )
    g.add_argument(
        "--learner",
        default="auto",
        choices=list(LEARNER_KINDS),
        help="what the server trains: 'ladder' (a side network over tapped layers), 'split' "
        "(the device stops below the top --split-layers layers; the server runs them with "
        "LoRA) or 'transformer' (narrow decoder layers, pruned from the backbone's, over every "
        "token of the tapped layers; --taps all means every second layer of the top two "
        "thirds for it); 'auto': split for classification (5 to 14 points more accurate in "
        "every run measured; the server does more work and the device uploads the top layers' "
        "weights once), ladder for causal-LM tuning and where split does not apply (default: "
        "%(default)s)",
    )
    g.add_argument(
        "--split-layers",
        type=_count,
        default=0,
        help="split: top layers the server runs (default: half of the model's layers)",
    )
    g.add_argument("--lora-rank", type=_positive, default=8, help="split: LoRA rank")
    g.add_argument("--reduction", type=_positive, default=8, help="side width = hidden / reduction")
    g.add_argument("--pooling", default="last", choices=list(POOLINGS))
    g.add_argument(
        "--mixer",
        default="none",
        choices=list(MIXERS),
        help="side network token mixing: attention across each sample's tokens "
        "(classification; sends every real token)",
    )
    g.add_argument("--head-init", default=None, choices=list(HEAD_INITS))
    g.add_argument("--dropout", type=_fraction, default=0.1)
    g.add_argument("--lr", type=_rate, default=TrainConfig.lr)
    g.add_argument("--weight-decay", type=_non_negative, default=TrainConfig.weight_decay)
    g.add_argument("--warmup-ratio", type=_fraction, default=TrainConfig.warmup_ratio)
    g.add_argument("--schedule", default="cosine", choices=list(SCHEDULES))
    g.add_argument(
        "--epochs",
        type=_positive,
        default=DeviceConfig.epochs,
        help="training epochs; the device streams once and the server replays the rest from "
        "its activation cache (default: %(default)s)",
    )
    g.add_argument(
        "--no-replay",
        dest="replay",
        action="store_false",
        help="re-stream every epoch from the device instead of replaying the server's cache",
    )
    g.add_argument(
        "--validation-fraction",
        type=_fraction,
        default=DeviceConfig.validation_fraction,
        help="share of the training samples streamed once as a validation split; the server "
        "keeps the epoch that scores best on it, or the untrained model if none beats it "
        "(0 = off; default: %(default)s)",
    )
    labels = g.add_mutually_exclusive_group()
    labels.add_argument(
        "--private-labels",
        dest="private_labels",
        action="store_const",
        const=True,
        default=None,
        help="keep labels, targets and verbalizers on the device: the server returns the "
        "side network's features and receives only the gradient of the loss (the device "
        "drives cache epochs and keeps the best epoch itself). The default for "
        "classification; for causal LM it runs the LM head on the device",
    )
    labels.add_argument(
        "--standard-labels",
        dest="private_labels",
        action="store_const",
        const=False,
        help="send labels (or causal-LM targets) and verbalizer ids with the frames, as the "
        "default does for causal LM: the server computes the loss (batching servers stack "
        "only such sessions)",
    )
    g.add_argument(
        "--frame-noise",
        type=_non_negative,
        default=DeviceConfig.frame_noise,
        help="add Gaussian noise of this standard deviation, relative to each row's RMS, to "
        "every row before it is encoded: a defence against recovering the input text from "
        "the frames (see docs/privacy.md) (default: %(default)s = off)",
    )
    g.add_argument(
        "--frame-noise-seed",
        type=_count,
        default=None,
        help="seed of the frame noise (default: a secret random one per session; a server "
        "that knows it can subtract the noise, so set it only to reproduce a measurement)",
    )
    g.add_argument(
        "--label-epsilon",
        type=_non_negative,
        default=DeviceConfig.label_epsilon,
        help="classification: randomized response on the training labels at this epsilon "
        "before anything is computed from them, so each label is epsilon-differentially "
        "private against the server, which otherwise reads it back even in private-label mode "
        "(see docs/privacy.md) (default: %(default)s = off)",
    )
    g.add_argument(
        "--label-seed",
        type=_count,
        default=None,
        help="seed of the randomized labels (default: a secret this device keeps for all its "
        "runs, so a text gets the same noisy label in each; set it only to reproduce a "
        "measurement)",
    )
    g.add_argument("--max-steps", type=_count, default=0, help="stop after this many steps")
    g.add_argument("--window", type=_positive, default=2, help="steps in flight (default: 2)")
    g.add_argument(
        "--link-mbps", type=_non_negative, default=0.0, help="emulate an upload link (Mbit/s)"
    )
    g.add_argument(
        "--link-rtt-ms", type=_non_negative, default=0.0, help="emulate a round-trip time"
    )
    g.add_argument("--out", default="runs/train", help="output folder (default: %(default)s)")
    g.add_argument("--log-every", type=_positive, default=10)


def codec_config(args: argparse.Namespace) -> CodecConfig:
    return CodecConfig(scheme=args.codec, group_size=args.group_size)


def train_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        schedule=args.schedule,
        seed=seed,
    )


def link_config(args: argparse.Namespace) -> LinkConfig:
    return LinkConfig(mbps=args.link_mbps, rtt_ms=args.link_rtt_ms)


def setup(args: argparse.Namespace) -> None:
    """Quiet third-party logs, set threads; progress goes to stderr, results to stdout/JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)


class Progress:
    """One status line per ``every`` steps on stderr: step, loss, samples/s, MB sent, link MB/s."""

    def __init__(self, every: int = 10, prefix: str = "train") -> None:
        self.every = every
        self.prefix = prefix
        self.t0 = time.perf_counter()
        self.loss_ema: float | None = None

    def __call__(self, m: dict[str, Any]) -> None:
        if "epoch" in m:
            self._epoch(m)
            return
        loss = m["loss"]
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        if m["step"] % self.every and m["step"] != m["total"]:
            return
        extra = f" acc {m['accuracy']:.3f}" if "accuracy" in m else ""
        msg = (
            f"[{self.prefix}] step {m['step']}/{m['total']} loss {self.loss_ema:.4f}{extra} "
            f"| {m['samples_per_s']:.1f} samples/s | encoded {m['mb_encoded']:.2f} MB "
            f"| sent {m['mb_sent']:.2f} MB at {m['link_mb_s']:.3f} MB/s "
            f"| lr {m.get('lr', 0):.2e} | {time.perf_counter() - self.t0:.0f}s"
        )
        print(msg, file=sys.stderr, flush=True)

    def _epoch(self, m: dict[str, Any]) -> None:
        val = ""
        if "val_accuracy" in m:
            val = f" | validation accuracy {m['val_accuracy']:.4f}"
        elif "val_loss" in m:
            val = f" | validation loss {m['val_loss']:.4f}"
        kept = f" | kept epoch {int(m['best_epoch'])}" if "best_epoch" in m else ""
        # a private-label device reports its own epochs: no server time in them
        server = f" | {m['seconds']:.1f}s on the server" if "seconds" in m else ""
        print(
            f"[{self.prefix}] epoch {m['epoch']} done: train loss {m['train_loss']:.4f}{val}"
            f"{kept}{server} | {time.perf_counter() - self.t0:.0f}s",
            file=sys.stderr,
            flush=True,
        )


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
