"""``mobillm train``: side-tune a frozen backbone, in-process or against a ``mobillm serve``."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from mobillm.cli import common
from mobillm.data import load_examples
from mobillm.device.runtime import DeviceConfig
from mobillm.errors import ConfigError
from mobillm.server.sessions import ServerConfig


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


COMMAND_FILE = "command.json"  # the options of a run, for --resume


def _resumed(args: argparse.Namespace) -> argparse.Namespace:
    path = Path(args.resume) / COMMAND_FILE
    if not path.is_file():
        raise ConfigError(
            f"--resume {args.resume}: no {COMMAND_FILE} there (the run finished, or it never "
            "started)"
        )
    saved = json.loads(path.read_text())
    return argparse.Namespace(**{**saved, "func": args.func, "resume": args.resume})


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mobillm.api import ConnectConfig, Device, LearnerConfig

    resume = bool(args.resume)
    if resume:
        args = _resumed(args)
    common.setup(args)
    out = Path(args.out)
    dcfg = common.data_config(args)
    key = os.environ.get("MOBILLM_API_KEY", "")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--api-key-file: {e}") from None
    learner = LearnerConfig(
        kind=args.learner,
        split_layers=args.split_layers,
        lora_rank=args.lora_rank,
        reduction=args.reduction,
        pooling=args.pooling,
        mixer=args.mixer,
        head_init=args.head_init or "",
        dropout=args.dropout,
    )
    streaming = DeviceConfig(
        positions=args.positions or "auto",
        window=args.window,
        epochs=args.epochs,
        replay=args.replay,
        validation_fraction=args.validation_fraction,
        max_steps=args.max_steps,
        log_every=args.log_every,
        reconnect_seconds=args.reconnect_s,
        private_labels=args.private_labels,
        frame_noise=args.frame_noise,
        frame_noise_seed=-1 if args.frame_noise_seed is None else args.frame_noise_seed,
        label_epsilon=args.label_epsilon,
        label_seed=-1 if args.label_seed is None else args.label_seed,
    )
    connect = ConnectConfig(
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        api_key=key,
        insecure=args.insecure,
    )
    # Read the data before loading the model: a bad file should fail in a second, not a minute.
    load_examples(dcfg, "train")
    t0 = time.perf_counter()
    device = Device(common.backbone_config(args, args.taps))
    common.say(
        f"[train] backbone {device.backbone.fingerprint.short()} loaded in "
        f"{time.perf_counter() - t0:.1f}s; {len(device.backbone.taps)} tapped layers"
    )
    if not resume:
        record = {k: v for k, v in vars(args).items() if k not in ("func", "resume")}
        common.write_json(out / COMMAND_FILE, record)
    server = args.server or ServerConfig(device=args.server_device, workdir=str(out / "server"))
    result = device.train(
        dcfg,
        learner=learner,
        training=common.train_config(args, dcfg.seed),
        streaming=streaming,
        codec=common.codec_config(args),
        server=server,
        connect=connect,
        link=common.link_config(args),
        out=out,
        callback=_Report(args.log_every, resume),
        evaluate=not args.no_eval,
        resume=resume,
    )
    (out / COMMAND_FILE).unlink(missing_ok=True)
    _say_kept(result["train"])
    common.say(f"[train] side network saved to {out}")
    result["model"] = args.model
    return result


class _Report(common.Progress):
    """The CLI's progress lines, plus what the API reports beyond steps and epochs."""

    def __init__(self, every: int, resume: bool) -> None:
        super().__init__(every)
        self.resume = resume

    def __call__(self, m: dict[str, Any]) -> None:
        if "session" in m:
            what = "resuming session" if self.resume else "session"
            where = f" open on {m['server']}" if not self.resume else ""
            common.say(f"[train] {what} {m['session']}{where}")
        elif "evaluated" in m:
            common.say(f"[train] {m['evaluated']}: {_fmt(m)}")
        elif "evaluating" in m:
            common.say(f"[train] evaluating ({m['evaluating']}): {m['done']}/{m['total']}")
        elif "examples" in m:
            n = m["examples"]
            common.say(
                f"[train] {n['train']} training, {n['validation']} validation and "
                f"{n['held_out']} held-out examples ({n['task']})"
            )
        else:
            super().__call__(m)


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
