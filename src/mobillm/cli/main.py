"""``mobillm``: the command line. Each subcommand lives in its own module; this one dispatches."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from mobillm import __version__
from mobillm.errors import MobiLLMError


class _Parser(argparse.ArgumentParser):
    """A refused option ends with one line, like every other bad input, not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from mobillm.cli import evaluate, generate, train

    # Subcommand parsers inherit the class, so theirs are one line too.
    p = _Parser(
        prog="mobillm",
        description="Server-assisted side-tuning: fine-tune a frozen LLM from a weak device.",
    )
    p.add_argument("--version", action="version", version=f"mobillm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in (train, evaluate, generate):
        mod.register(sub)
    for name in ("serve", "demo", "bench", "attack"):
        try:
            mod = __import__(f"mobillm.cli.{name}", fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: Any = args.func(args)
    except MobiLLMError as e:
        print(f"mobillm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"mobillm {args.command}: error: file not found: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobillm {args.command}: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
