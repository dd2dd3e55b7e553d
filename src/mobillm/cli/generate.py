"""``mobillm generate``: text from the backbone plus a saved side network, on the device alone."""

from __future__ import annotations

import argparse
from typing import Any

from mobillm.cli import common
from mobillm.errors import MobiLLMError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate with a saved causal-LM side network (no server)",
        description=__doc__,
    )
    common.add_model_args(p, side=True)
    p.add_argument("--side", required=True, help="folder of a saved causal-LM side network")
    p.add_argument(
        "--prompt", action="append", required=True, help="prompt text; repeat for several prompts"
    )
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare", action="store_true", help="also show the frozen backbone's own continuation"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mobillm.api import Device

    common.setup(args)
    common.model_from_side(args, args.side)
    device = Device(common.backbone_config(args)).load(args.side)
    assert device.model is not None
    if device.model.side.cfg.task != "causal_lm":
        raise MobiLLMError(
            f"{args.side} holds a {device.model.side.cfg.task} side network; "
            "generate needs one trained with --task causal_lm"
        )
    kw = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    results = []
    for prompt in args.prompt:
        item = {"prompt": prompt, "output": device.generate(prompt, **kw)}
        if args.compare:
            item["frozen_backbone"] = device.generate(prompt, frozen=True, **kw)
        results.append(item)
        common.say(f"\n>>> {prompt}\n{item['output']}")
        if args.compare:
            common.say(f"[frozen backbone] {item['frozen_backbone']}")
    return {"command": "generate", "side": args.side, "results": results}
