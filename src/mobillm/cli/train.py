"""``mobillm train``: side-tune a frozen backbone, in-process or against a ``mobillm serve``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from mobillm.backbone import Backbone
from mobillm.cli import common
from mobillm.data import DataConfig, hold_out, load_examples, resolve_labels, tokenize_examples
from mobillm.device.local import LocalModel
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_side_config
from mobillm.errors import ConfigError
from mobillm.transport.base import Transport
from mobillm.transport.messages import SessionInfo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="side-tune a model (device side; server in-process or remote)",
        description=__doc__,
    )
    common.add_model_args(p)
    common.add_data_args(p)
    common.add_train_args(p)
    g = p.add_argument_group("server")
    g.add_argument(
        "--server",
        default="",
        help="HOST:PORT of a `mobillm serve`; empty = run the server in-process",
    )
    g.add_argument("--tls-ca", default="", help="CA certificate that signed the server's (PEM)")
    g.add_argument("--tls-cert", default="", help="client certificate for mutual TLS (PEM)")
    g.add_argument("--tls-key", default="", help="client key for mutual TLS (PEM)")
    g.add_argument(
        "--api-key-file",
        default="",
        help="file holding the API key the server gave you (default: $MOBILLM_API_KEY)",
    )
    g.add_argument(
        "--reconnect-s",
        type=float,
        default=300.0,
        help="keep trying to reach a lost server this long, then resend only the steps it "
        "lacks (0 = fail at once; default: %(default)s)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext to a non-loopback server (token, key and activations in the clear)",
    )
    g.add_argument("--server-device", default="cpu", help="in-process server: cpu or cuda")
    p.add_argument("--no-eval", action="store_true", help="skip accuracy/loss before and after")
    p.add_argument(
        "--resume",
        default="",
        metavar="OUT",
        help="continue the run whose --out was OUT after this device crashed (its session, "
        "settings and data order are in OUT/session.json); other options are ignored",
    )
    p.set_defaults(func=run)


def make_transport(args: argparse.Namespace, out: Path) -> Transport:
    link = common.link_config(args)
    if args.server:
        from mobillm.transport.grpc_client import GrpcTransport, TlsClientConfig

        tls = TlsClientConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
        key = os.environ.get("MOBILLM_API_KEY", "")
        if args.api_key_file:
            try:
                key = Path(args.api_key_file).read_text().strip()
            except OSError as e:
                raise ConfigError(f"--api-key-file: {e}") from None
        return GrpcTransport(args.server, tls=tls, link=link, api_key=key, insecure=args.insecure)
    from mobillm.server.inprocess import InProcessTransport
    from mobillm.server.sessions import ServerConfig, SessionManager

    manager = SessionManager(ServerConfig(device=args.server_device, workdir=str(out / "server")))
    return InProcessTransport(manager, link)


def evaluate(model: LocalModel, data: Any, batch_size: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = model.evaluate(data, batch_size=batch_size)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res.pop("predictions", None)
    return res


def task_meta(dcfg: DataConfig, labels: tuple[str, ...]) -> dict[str, Any]:
    """What a device needs later to evaluate or generate with the saved side network."""
    keep = (
        "task",
        "labels",
        "verbalizers",
        "template",
        "max_length",
        "text_column",
        "label_column",
        "prompt_column",
        "response_column",
        "format",
        "encoding",
        "quoting",
    )
    d = {k: v for k, v in dcfg.to_dict().items() if k in keep}
    d["labels"] = list(labels)
    return {"data": d}


SESSION_FILE = "session.json"


def _save_session(out: Path, args: argparse.Namespace, info: SessionInfo) -> None:
    """What ``--resume`` needs: every option as given and the session (its token: 0600)."""
    record = {
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "resume")},
        "session": dataclasses.asdict(info),
    }
    path = out / SESSION_FILE
    out.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _resumed(args: argparse.Namespace) -> tuple[argparse.Namespace, SessionInfo]:
    path = Path(args.resume) / SESSION_FILE
    if not path.is_file():
        raise ConfigError(
            f"--resume {args.resume}: no {SESSION_FILE} there (the run finished, or it never "
            "opened a session)"
        )
    record = json.loads(path.read_text())
    saved = argparse.Namespace(**{**record["args"], "func": args.func, "resume": args.resume})
    return saved, SessionInfo(**record["session"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    session: SessionInfo | None = None
    if args.resume:
        args, session = _resumed(args)
    common.setup(args)
    out = Path(args.out)
    dcfg = common.data_config(args)
    # Read the data before loading the model: a bad file should fail in a second, not a minute.
    train_ex, val_ex = hold_out(load_examples(dcfg, "train"), args.validation_fraction, dcfg.seed)
    eval_ex = load_examples(dcfg, "eval") if dcfg.eval_path or dcfg.eval_fraction else []
    labels = resolve_labels(dcfg) if dcfg.task == "classification" else ()
    dcfg = dcfg.replace(labels=labels)
    t0 = time.perf_counter()
    backbone = Backbone.load(common.backbone_config(args, args.taps))
    common.say(
        f"[train] backbone {backbone.fingerprint.short()} loaded in "
        f"{time.perf_counter() - t0:.1f}s; {len(backbone.taps)} tapped layers"
    )
    train = tokenize_examples(train_ex, backbone.tokenizer, dcfg)
    val = tokenize_examples(val_ex, backbone.tokenizer, dcfg) if val_ex else None
    held = tokenize_examples(eval_ex, backbone.tokenizer, dcfg) if eval_ex else None
    common.say(
        f"[train] {len(train)} training, {len(val) if val else 0} validation and "
        f"{len(held) if held else 0} held-out examples ({dcfg.task})"
    )
    options: dict[str, Any] = {
        "reduction": args.reduction,
        "pooling": args.pooling,
        "dropout": args.dropout,
        "mixer": args.mixer,
    }
    if args.head_init:
        options["head_init"] = args.head_init
    if args.learner == "split":
        k = args.split_layers or backbone.num_layers // 2
        options |= {"kind": "split", "split_layers": k, "lora_rank": args.lora_rank}
    side = build_side_config(backbone, dcfg.task, len(labels), dcfg.verbalizers, **options)
    if side.kind == "split":
        common.say(
            f"[train] split: the device runs layers 0-{backbone.taps[0]}, the server the top "
            f"{side.split_layers} with LoRA rank {side.lora_rank}"
        )
    # a learner that reads more than the loss rows needs every real token by default
    mixes = side.kind == "split" or side.mixer != "none" or side.pooling == "mean"
    positions = args.positions or ("valid" if mixes else "loss")
    result: dict[str, Any] = {
        "command": "train",
        "model": args.model,
        "backbone": backbone.fingerprint.to_dict(),
        "data": dcfg.to_dict(),
        "codec": args.codec,
        "positions": positions,
        "side": side.to_dict(),
    }
    transport = make_transport(args, out)
    trainer = DeviceTrainer(
        backbone,
        side,
        transport,
        codec=common.codec_config(args),
        train=common.train_config(args, dcfg.seed),
        device=DeviceConfig(
            positions=positions,
            window=args.window,
            epochs=args.epochs,
            replay=args.replay,
            validation_fraction=args.validation_fraction,
            max_steps=args.max_steps,
            log_every=args.log_every,
            reconnect_seconds=args.reconnect_s,
        ),
    )
    progress = common.Progress(args.log_every)
    # Reach the server and have the session accepted before any slow work: a wrong address
    # or a refused spec fails in seconds, not after minutes of evaluation.
    info = trainer.start(train, dcfg.batch_size, seed=dcfg.seed, progress=progress, session=session)
    if session is None:
        _save_session(out, args, info)
        common.say(f"[train] session {info.session_id} open on {info.server or 'the server'}")
    else:
        common.say(f"[train] resuming session {info.session_id}")
    before = out / "before.json"
    if held is not None and not args.no_eval and before.is_file():
        result["before"] = json.loads(before.read_text())  # measured before the crash
    elif held is not None and not args.no_eval:
        common.say("[train] evaluating the untrained side network (= the frozen backbone)")
        result["before"] = evaluate(
            LocalModel.untrained(backbone, side, dcfg.seed), held, dcfg.batch_size * 2
        )
        common.write_json(before, result["before"])
        common.say(f"[train] before: {_fmt(result['before'])}")
    result["train"] = trainer.train(
        train, dcfg.batch_size, seed=dcfg.seed, progress=progress, validation=val
    )
    _say_kept(result["train"])
    trainer.download(out, task_meta(dcfg, labels))
    result["server"] = transport.close()
    trainer.write_log(out / "train_log.jsonl")
    (out / SESSION_FILE).unlink(missing_ok=True)  # the session is closed: nothing to resume
    before.unlink(missing_ok=True)
    common.say(f"[train] side network saved to {out}")
    if held is not None and not args.no_eval:
        model = LocalModel.load(backbone, out)
        result["after"] = evaluate(model, held, dcfg.batch_size * 2)
        common.say(f"[train] after: {_fmt(result['after'])}")
    common.write_json(out / "summary.json", result)
    return result


def _say_kept(summary: dict[str, Any]) -> None:
    """Tell the user which epoch the validation split chose, plainly when it is none."""
    kept = summary.get("kept_epoch")
    if kept is None:
        return
    if kept == 0:
        common.say(
            "[train] no epoch beat the untrained side network on the validation split: kept "
            "the untrained one (= the frozen backbone); try another --lr or more data"
        )
    else:
        common.say(f"[train] kept epoch {kept} of {summary['server_epochs']} (best on validation)")


def _fmt(r: dict[str, Any]) -> str:
    if "accuracy" in r:
        return f"accuracy {r['accuracy']:.4f} on {r['samples']} samples ({r['seconds']}s)"
    return f"loss {r['loss']:.4f} (ppl {r['perplexity']:.2f}) on {r['tokens']} tokens"
