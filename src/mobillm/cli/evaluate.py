"""``mobillm eval``: accuracy or held-out loss of a saved side network, on the device alone.

Needs only the file to evaluate: ``--side OUT --eval-file f`` takes the task (labels,
verbalizers, template, columns) saved with the side network; ``--zero-shot`` takes it from the
flags. No train file is read unless one is given (or a preset names one).
"""

from __future__ import annotations

import argparse
from typing import Any

from mobillm.cli import common
from mobillm.data import load_examples, resolve_labels
from mobillm.errors import MobiLLMError
from mobillm.side.io import read_meta


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a saved side network locally (no server)", description=__doc__
    )
    common.add_model_args(p, side=True)
    p.add_argument("--side", default="", help="folder of a saved side network")
    p.add_argument(
        "--zero-shot",
        action="store_true",
        help="no side network: the frozen backbone prompted with the verbalizers",
    )
    common.add_data_args(p, train=False)
    p.add_argument("--out", default="", help="write the JSON result here too")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mobillm.api import Device

    common.setup(args)
    if bool(args.side) == bool(args.zero_shot):
        raise MobiLLMError("give exactly one of --side FOLDER or --zero-shot")
    # The task saved with the side network is the default; flags given here still win.
    base = read_meta(args.side).task.get("data", {}) if args.side else {}
    dcfg = common.data_config(args, base)
    if not dcfg.eval_path and not dcfg.eval_fraction:
        raise MobiLLMError("nothing to evaluate: give --eval-file or --data")
    if args.zero_shot and dcfg.task == "classification" and not dcfg.verbalizers:
        raise MobiLLMError(
            "--zero-shot classification needs --verbalizers (one word per label, e.g. "
            "negative,positive): the frozen backbone answers with those words"
        )
    # Read the data before loading the model: a bad file should fail in a second, not a minute.
    if dcfg.task == "classification":
        dcfg = dcfg.replace(labels=resolve_labels(dcfg))
    examples = load_examples(dcfg, "eval")
    common.say(f"[eval] {len(examples)} examples")
    common.model_from_side(args, args.side)
    device = Device(common.backbone_config(args))
    if args.side:
        device.load(args.side)
    res = device.evaluate(
        dcfg,
        callback=lambda m: common.say(f"[eval] {m['done']}/{m['total']}"),
    )
    out = {
        "command": "eval",
        "model": args.model,
        "side": args.side or "zero-shot",
        "eval_file": dcfg.eval_path,
        **res,
    }
    if args.out:
        common.write_json(args.out, out)
    return out
