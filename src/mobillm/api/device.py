"""``mobillm.Device``: a frozen backbone, run forward only, and the side network it trains.

The device side of MobiLLM in one object::

    device = mobillm.Device("smollm2-135m")
    data = mobillm.DataConfig(preset="sst2", max_train_samples=400)
    device.train(data)                       # the server runs in this process
    print(device.evaluate(data)["accuracy"])
    device.save("runs/sst2")

``train`` takes a ``DataConfig`` (files or a preset) or any iterable of records (a list of
dicts, a ``datasets.Dataset``) with ``config=`` naming the columns, and a server: ``None`` (in
this process), ``"host:port"`` of a ``mobillm serve``, a ``Server`` or ``ServerProcess``, or a
``ServerConfig`` for an in-process server configured as given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mobillm.backbone import Backbone, BackboneConfig
from mobillm.codec import CodecConfig
from mobillm.config import Config, check
from mobillm.data import (
    DataConfig,
    Example,
    TokenizedDataset,
    hold_out,
    load_examples,
    resolve_labels,
    resolve_preset,
    tokenize_examples,
)
from mobillm.data.config import TASK_FIELDS
from mobillm.device.local import LocalModel
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, ProgressFn, build_side_config
from mobillm.errors import ConfigError
from mobillm.side.config import HEAD_INITS, LEARNER_KINDS, MIXERS, POOLINGS
from mobillm.side.io import META, WEIGHTS, read_meta
from mobillm.transport.base import Transport
from mobillm.transport.link import LinkConfig
from mobillm.transport.messages import SessionInfo, TrainConfig

Records = Iterable[Mapping[str, Any]]
StopFn = Callable[[], bool]
SESSION_FILE = "session.json"


@dataclasses.dataclass(frozen=True)
class LearnerConfig(Config):
    """What the server trains, before it is sized to a backbone (``SideConfig`` is that form).

    ``kind="ladder"``: a side network over the tapped layers, ``hidden / reduction`` wide.
    ``kind="split"``: the device stops below the top ``split_layers`` layers (0 = half of
    them) and the server runs those with LoRA of rank ``lora_rank``. ``kind="transformer"``:
    a side transformer, narrow decoder layers over every token of the tapped layers (by
    default every second layer of the top two thirds), started from the backbone's own
    layers pruned to ``hidden / reduction``. ``kind="auto"`` (the
    default): split for classification, where it beat the ladder by 5 to 14 points on every
    backbone and data set measured (docs/results.md), on backbones split supports and
    without an attention mixer; the ladder otherwise (causal-LM tuning with split is not
    measured yet). ``head_init`` "" starts a classifier from the verbalizers' LM-head rows
    when there are verbalizers.
    """

    kind: str = "auto"
    split_layers: int = 0
    lora_rank: int = 8
    reduction: int = 8
    pooling: str = "last"
    mixer: str = "none"
    head_init: str = ""
    dropout: float = 0.1

    def validate(self) -> None:
        check(
            self.kind in LEARNER_KINDS,
            f"LearnerConfig.kind must be one of {LEARNER_KINDS}, got {self.kind!r}",
        )
        check(self.split_layers >= 0, "LearnerConfig.split_layers must be >= 0 (0 = half)")
        check(self.lora_rank >= 1, "LearnerConfig.lora_rank must be >= 1")
        check(self.reduction >= 1, "LearnerConfig.reduction must be >= 1")
        check(self.pooling in POOLINGS, f"LearnerConfig.pooling must be one of {POOLINGS}")
        check(self.mixer in MIXERS, f"LearnerConfig.mixer must be one of {MIXERS}")
        check(
            self.head_init in ("", *HEAD_INITS),
            f"LearnerConfig.head_init must be '' or one of {HEAD_INITS}",
        )
        check(0.0 <= self.dropout < 1.0, "LearnerConfig.dropout must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class ConnectConfig(Config):
    """How a device reaches a remote server: TLS files (PEM), API key, plaintext consent.

    ``api_key`` "" reads ``$MOBILLM_API_KEY``. ``insecure`` allows plaintext to a
    non-loopback host (the session token, key and activations then cross it in the clear).
    """

    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    api_key: str = dataclasses.field(default="", repr=False)
    insecure: bool = False

    def validate(self) -> None:
        check(
            bool(self.tls_cert) == bool(self.tls_key),
            "ConnectConfig: give both tls_cert and tls_key for mutual TLS, or neither",
        )


class Device:
    """A device: a frozen backbone run forward only, and the side network trained for it.

    ``model`` is a model folder, a ``.gguf`` file, an alias (``smollm2-135m``) or a hub id,
    or a whole ``BackboneConfig``. ``taps`` picks the layers a ladder reads ("all",
    "every:K" or indices); ``stream_weights`` keeps only the running layer's weights
    resident; ``quant="int8"`` runs the frozen linear layers in int8.
    """

    def __init__(
        self,
        model: str | BackboneConfig = "smollm2-135m",
        *,
        taps: str = "all",
        dtype: str = "float32",
        stream_weights: bool = True,
        quant: str = "none",
    ) -> None:
        if isinstance(model, BackboneConfig):
            cfg = model
        else:
            cfg = BackboneConfig(
                source=model, dtype=dtype, taps=taps, stream=stream_weights, quant=quant
            )
        self.backbone = Backbone.load(cfg)
        self.model: LocalModel | None = None
        # The data config the side network was trained or saved with (labels, template...).
        self.task: DataConfig | None = None
        self._folder: Path | None = None

    # --- training ---------------------------------------------------------------------------
    def train(
        self,
        data: DataConfig | Records,
        eval_data: Records | None = None,
        *,
        config: DataConfig | None = None,
        learner: LearnerConfig | None = None,
        training: TrainConfig | None = None,
        streaming: DeviceConfig | None = None,
        codec: CodecConfig | None = None,
        server: Any = None,
        connect: ConnectConfig | None = None,
        link: LinkConfig | None = None,
        out: str | Path = "runs/train",
        callback: ProgressFn | None = None,
        stop: threading.Event | StopFn | None = None,
        evaluate: bool = True,
        resume: bool = False,
    ) -> dict[str, Any]:
        """Side-tune on ``data`` with a server's help; returns the run's summary.

        ``data`` is a ``DataConfig`` (its train split trains, its eval split is scored before
        and after) or records with ``config`` naming columns and task (``eval_data`` then is
        what is scored). ``callback`` gets one dict per step (step, loss, samples/s, bytes)
        and per server epoch; ``stop`` (an ``Event`` or a function) ends training at the next
        step: the side network trained so far is kept. The side network lands in ``out``
        (also ``summary.json`` and ``train_log.jsonl``) and is this device's from then on.
        ``resume=True`` continues the run in ``out`` after this device crashed: call it with
        the same arguments.

        Besides steps and epochs, ``callback`` gets ``{"examples": counts}`` once the data is
        read, ``{"session": id, "server": address}`` once the server accepted the session,
        and ``{"evaluated": "before"|"after", ...}`` with each evaluation.
        """
        learner = learner or LearnerConfig()
        streaming = streaming or DeviceConfig()
        out = Path(out)
        session = None
        noise_seed_asked = streaming.frame_noise_seed  # -1 (secret) is not to be recorded
        label_seed_asked = streaming.label_seed
        if resume:
            session, record = _read_session(out)
            noise_seed = record.get("frame_noise_seed")
            if noise_seed is not None and streaming.frame_noise_seed < 0:
                # the crashed run's secret noise seed: resent steps carry the same bytes
                streaming = streaming.replace(frame_noise_seed=noise_seed)
            eps = float(record.get("label_epsilon", 0.0))
            if eps != streaming.label_epsilon:
                # other labels for the steps resent: the server would hold two draws of them
                raise ConfigError(
                    f"cannot resume {out} with label epsilon {streaming.label_epsilon:g}: the "
                    f"run was started with {eps:g} (--label-epsilon)"
                )
            label_seed = record.get("label_seed", -1)
            if label_seed >= 0 and streaming.label_seed < 0:
                streaming = streaming.replace(label_seed=label_seed)
        dcfg, train_ex, val_ex, eval_ex = self._examples(
            data, eval_data, config, streaming.validation_fraction
        )
        self._check_length(dcfg)
        tok = self.backbone.tokenizer
        train = tokenize_examples(train_ex, tok, dcfg)
        val = tokenize_examples(val_ex, tok, dcfg) if val_ex else None
        held = tokenize_examples(eval_ex, tok, dcfg) if eval_ex and evaluate else None
        # a split whose every example was dropped (no response token within max_length) is
        # no split: trained without validation, evaluated on nothing
        val = val if val is not None and len(val) else None
        held = held if held is not None and len(held) else None
        if not len(train):
            raise ConfigError(
                f"none of the {len(train_ex)} training examples leaves a response token to "
                f"predict within max_length={dcfg.max_length}: raise --max-length"
            )
        if callback is not None:
            counts = {
                "train": len(train),
                "validation": len(val) if val is not None else 0,
                # not evaluating: the examples that would have been
                "held_out": len(held) if held is not None else (0 if evaluate else len(eval_ex)),
            }
            callback({"examples": {**counts, "task": dcfg.task}})
        side = self._side_config(dcfg, learner)
        training = (training or TrainConfig()).replace(seed=dcfg.seed)
        result: dict[str, Any] = {
            "command": "train",
            "model": self.backbone.cfg.source,
            "backbone": self.backbone.fingerprint.to_dict(),
            "data": dcfg.to_dict(),
            "codec": (codec or CodecConfig()).scheme,
            "frame_noise": streaming.frame_noise,
            "frame_noise_seed": noise_seed_asked,
            "label_epsilon": streaming.label_epsilon,
            "label_seed": label_seed_asked,
            "side": side.to_dict(),
        }
        transport = _transport(server, connect, link, out)
        trainer = DeviceTrainer(
            self.backbone, side, transport, codec, training, streaming, state_dir=out
        )
        result["positions"] = trainer.positions
        # Reach the server and have the session accepted before any slow work: a wrong address
        # or a refused spec fails in seconds, not after minutes of evaluation.
        info = trainer.start(
            train, dcfg.batch_size, seed=dcfg.seed, progress=callback, session=session
        )
        if session is None:
            _write_session(
                out, info, trainer.noise_seed, streaming.label_epsilon, trainer.label_seed
            )
        if callback is not None:
            callback({"session": info.session_id, "server": info.server or "the server"})
        before = out / "before.json"
        if held is not None and before.is_file():
            result["before"] = json.loads(before.read_text())  # measured before the crash
        elif held is not None:
            untrained = LocalModel.untrained(self.backbone, side, dcfg.seed)
            result["before"] = _timed_eval(
                untrained, held, dcfg.batch_size * 2, callback=callback, phase="before"
            )
            _write_json(before, result["before"])
            if callback is not None:
                callback({"evaluated": "before", **result["before"]})
        result["train"] = trainer.train(
            train,
            dcfg.batch_size,
            seed=dcfg.seed,
            progress=callback,
            validation=val,
            stop=stop.is_set if isinstance(stop, threading.Event) else stop,
        )
        # what a later `mobillm eval --side` loads by default
        source = self.backbone.cfg.source
        where = Path(source)
        task = {
            "data": _task_dict(dcfg),
            "model": str(where.resolve()) if where.exists() else source,
            "device_quant": self.backbone.cfg.quant,
        }
        trainer.download(out, task)
        result["server"] = transport.close()
        trainer.write_log(out / "train_log.jsonl")
        (out / SESSION_FILE).unlink(missing_ok=True)  # the session is closed: nothing to resume
        shutil.rmtree(out / "labels", ignore_errors=True)  # private labels' resume state
        before.unlink(missing_ok=True)
        self.load(out)
        if held is not None:
            assert self.model is not None
            result["after"] = _timed_eval(
                self.model, held, dcfg.batch_size * 2, callback=callback, phase="after"
            )
            if callback is not None:
                callback({"evaluated": "after", **result["after"]})
        _write_json(out / "summary.json", result)
        return result

    def _examples(
        self,
        data: DataConfig | Records,
        eval_data: Records | None,
        config: DataConfig | None,
        validation_fraction: float,
    ) -> tuple[DataConfig, list[Example], list[Example], list[Example]]:
        """(config with labels, train, validation, held-out examples), read before any
        model work so a bad file fails in a second."""
        if isinstance(data, DataConfig):
            check(config is None, "give config= only with records; a DataConfig is its own")
            dcfg, records = resolve_preset(data), None
        else:
            dcfg, records = resolve_preset(config or DataConfig()), _materialize(data)
        if dcfg.task == "classification":
            dcfg = dcfg.replace(labels=resolve_labels(dcfg, records=records))
        examples = load_examples(dcfg, "train", records=records)
        if eval_data is not None:
            held = load_examples(dcfg, "eval", records=_materialize(eval_data))
        elif records is None and (dcfg.eval_path or dcfg.eval_fraction):
            held = load_examples(dcfg, "eval")
        else:
            held = []
        train_ex, val_ex = hold_out(examples, validation_fraction, dcfg.seed)
        return dcfg, train_ex, val_ex, held

    def _side_config(self, dcfg: DataConfig, learner: LearnerConfig) -> Any:
        options: dict[str, Any] = {
            "reduction": learner.reduction,
            "pooling": learner.pooling,
            "dropout": learner.dropout,
            "mixer": learner.mixer,
        }
        if learner.head_init:
            options["head_init"] = learner.head_init
        kind = self._kind(dcfg, learner)
        if kind == "split":
            k = learner.split_layers or self.backbone.num_layers // 2
            options |= {"kind": "split", "split_layers": k, "lora_rank": learner.lora_rank}
        elif kind == "transformer":
            options["kind"] = "transformer"
        return build_side_config(
            self.backbone, dcfg.task, len(dcfg.labels), dcfg.verbalizers, **options
        )

    def _kind(self, dcfg: DataConfig, learner: LearnerConfig) -> str:
        """The learner ``kind="auto"`` stands for on this backbone and task."""
        if learner.kind != "auto":
            return learner.kind
        from mobillm.side.split import SPLIT_FAMILIES

        splits = (
            dcfg.task == "classification"
            and learner.mixer == "none"
            and self.backbone.model.config.model_type in SPLIT_FAMILIES
            and self.backbone.num_layers >= 2
        )
        return "split" if splits else "ladder"

    # --- on the device alone ----------------------------------------------------------------
    def load(self, folder: str | Path) -> Device:
        """Use the side network saved in ``folder`` (its backbone fingerprint must match)."""
        self.model = LocalModel.load(self.backbone, folder)
        task = read_meta(folder).task.get("data")
        self.task = DataConfig.from_dict(task) if task else None
        self._folder = Path(folder)
        return self

    def save(self, folder: str | Path) -> Path:
        """Copy the side network (weights + ``side.json``) to ``folder``; returns it."""
        if self._folder is None:
            raise ConfigError("no side network to save: train one or load one first")
        dest = Path(folder)
        dest.mkdir(parents=True, exist_ok=True)
        if dest.resolve() != self._folder.resolve():
            for name in (WEIGHTS, META):
                shutil.copyfile(self._folder / name, dest / name)
        return dest

    def evaluate(
        self,
        data: DataConfig | Records | str | Path | None = None,
        *,
        config: DataConfig | None = None,
        predictions: bool = False,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Accuracy (classification) or held-out loss (causal LM), on this device alone.

        ``data``: a ``DataConfig`` (its eval split), a file path or records, read with the
        task the side network was trained with (``config`` overrides it), or None for the
        training data's eval split. Without a side network this is the frozen backbone
        prompted with the verbalizers (zero-shot), and ``data`` must say the task.
        ``callback`` hears ``{"evaluating": "eval", "done": n, "total": N}`` as it goes.
        """
        dcfg, examples = self._eval_examples(data, config)
        self._check_length(dcfg)
        if self.model is not None:
            model = self.model
        else:
            if dcfg.task == "classification" and not dcfg.verbalizers:
                raise ConfigError(
                    "zero-shot classification needs verbalizers (one word per label, e.g. "
                    "negative,positive): the frozen backbone answers with those words"
                )
            side = build_side_config(self.backbone, dcfg.task, len(dcfg.labels), dcfg.verbalizers)
            model = LocalModel.untrained(self.backbone, side)
        data_t = tokenize_examples(examples, self.backbone.tokenizer, dcfg)
        res = _timed_eval(
            model, data_t, dcfg.batch_size * 2, predictions, callback=callback, phase="eval"
        )
        if dcfg.task == "classification":
            res["labels"] = list(dcfg.labels)
        return res

    def _check_length(self, dcfg: DataConfig) -> None:
        """Refuse a max_length over what the model takes (a learned position table raises an
        IndexError deep in the forward pass)."""
        n = self.backbone.max_positions
        if n is not None and dcfg.max_length > n:
            raise ConfigError(
                f"max_length {dcfg.max_length} is more than the {n} positions this model takes "
                f"(--max-length at most {n})"
            )

    def _eval_examples(
        self, data: DataConfig | Records | str | Path | None, config: DataConfig | None
    ) -> tuple[DataConfig, list[Example]]:
        base = config or self.task
        if isinstance(data, DataConfig):
            dcfg = resolve_preset(data)
            if not dcfg.labels and base is not None and base.labels:
                dcfg = dcfg.replace(labels=base.labels)
            records = None
        elif data is None:
            if base is None:
                raise ConfigError("nothing to evaluate: give a DataConfig, a file or records")
            dcfg, records = base, None
        else:
            if base is None:
                raise ConfigError(
                    "no task to read this data with: pass config=DataConfig(...) (columns, "
                    "labels, template), or load a side network first"
                )
            if isinstance(data, str | Path):
                dcfg = base.replace(
                    eval_path=str(data), train_path="", preset="", eval_fraction=0.0
                )
                records = None
            else:
                dcfg, records = base, _materialize(data)
        if not dcfg.eval_path and not dcfg.eval_fraction and records is None:
            raise ConfigError("nothing to evaluate: the data config has no eval_path")
        if dcfg.task == "classification":
            dcfg = dcfg.replace(labels=resolve_labels(dcfg, records=records))
        return dcfg, load_examples(dcfg, "eval", records=records)

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        frozen: bool = False,
    ) -> str:
        """Continue ``prompt`` with the causal-LM side network (``frozen``: the backbone's own
        continuation, for comparison). ``temperature`` 0 is greedy."""
        if self.model is None or self.model.side.cfg.task != "causal_lm":
            raise ConfigError("generate needs a causal-LM side network: train or load one")
        model = LocalModel.untrained(self.backbone, self.model.side.cfg) if frozen else self.model
        return model.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )


# --- helpers ------------------------------------------------------------------------------------
def _materialize(records: Records) -> list[Mapping[str, Any]]:
    """Records as a list (a one-shot iterable is read once); a ``datasets.Dataset`` as dicts."""
    return records if isinstance(records, list) else list(records)


def _task_dict(dcfg: DataConfig) -> dict[str, Any]:
    d = dcfg.to_dict()
    return {k: d[k] for k in TASK_FIELDS}


def _timed_eval(
    model: LocalModel,
    data: TokenizedDataset,
    batch_size: int,
    keep_predictions: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    phase: str = "",
) -> dict[str, Any]:
    """Evaluate ``model`` on ``data``, timed; ``callback`` hears ``{"evaluating": phase,
    "done", "total"}`` about every tenth of the data (evaluation can take minutes)."""
    t0 = time.perf_counter()
    step, last = max(1, len(data) // 10), [0]

    def progress(done: int, total: int) -> None:
        if callback is not None and (done - last[0] >= step or done == total):
            last[0] = done
            callback({"evaluating": phase, "done": done, "total": total})

    res = model.evaluate(data, batch_size=batch_size, progress=progress)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    if not keep_predictions:
        res.pop("predictions", None)
    return res


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _write_session(
    out: Path, info: SessionInfo, noise_seed: int, label_epsilon: float, label_seed: int
) -> None:
    """What a resumed run needs: the session, with its token, the frame noise's secret seed and
    the labels' randomization (so the file is 0600)."""
    path = out / SESSION_FILE
    out.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    record = {
        "session": dataclasses.asdict(info),
        "frame_noise_seed": noise_seed,
        "label_epsilon": label_epsilon,
        "label_seed": label_seed,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def _read_session(out: Path) -> tuple[SessionInfo, dict[str, Any]]:
    path = out / SESSION_FILE
    if not path.is_file():
        raise ConfigError(
            f"cannot resume {out}: no {SESSION_FILE} there (the run finished, or it never "
            "opened a session)"
        )
    record = json.loads(path.read_text())
    return SessionInfo(**record["session"]), record


def _transport(
    server: Any, connect: ConnectConfig | None, link: LinkConfig | None, out: Path
) -> Transport:
    """The transport to ``server`` (see ``Device.train``)."""
    from mobillm.server.sessions import ServerConfig

    if server is None or isinstance(server, ServerConfig):
        from mobillm.server.inprocess import InProcessTransport
        from mobillm.server.sessions import SessionManager

        cfg = server or ServerConfig(workdir=str(out / "server"))
        return InProcessTransport(SessionManager(cfg), link)
    address = server if isinstance(server, str) else getattr(server, "address", None)
    if not isinstance(address, str):
        raise ConfigError(
            f"server must be None, 'host:port', a Server, a ServerProcess or a ServerConfig; "
            f"got {type(server).__name__}"
        )
    from mobillm.transport.grpc_client import GrpcTransport, TlsClientConfig

    c = connect or ConnectConfig()
    tls = TlsClientConfig(ca=c.tls_ca, cert=c.tls_cert, key=c.tls_key)
    key = c.api_key or os.environ.get("MOBILLM_API_KEY", "")
    return GrpcTransport(address, tls=tls, link=link, api_key=key, insecure=c.insecure)
