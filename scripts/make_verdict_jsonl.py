#!/usr/bin/env python3
"""Write a small prompt/response JSONL for causal-LM tuning from SST-2 (read from its folder).

Each row is ``{"prompt": "Review: <sentence>", "response": "Verdict: positive."}`` (or
negative). The frozen SmolLM2 never answers in this format on its own, so after tuning,
``mobillm generate`` shows both the learned format and the sentiment. SST-2 itself stays where
it is (``--sst2``, default ../shared/data/sst2); only the derived files are written.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path


def rows(path: Path) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [(r[0].strip(), int(r[1])) for r in reader if len(r) == 2]


def write(path: Path, items: list[tuple[str, int]]) -> None:
    with path.open("w") as f:
        for text, label in items:
            verdict = "positive" if label else "negative"
            f.write(
                json.dumps({"prompt": f"Review: {text}", "response": f"Verdict: {verdict}."}) + "\n"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sst2", default="../shared/data/sst2")
    p.add_argument("--out", default="runs/verdict-data")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    root, out = Path(a.sst2), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # whole sentences (dev) read like real reviews; train holds many short phrases
    train = [r for r in rows(root / "train.tsv") if len(r[0].split()) >= 8]
    random.Random(a.seed).shuffle(train)
    dev = rows(root / "dev.tsv")
    random.Random(a.seed).shuffle(dev)
    write(out / "train.jsonl", train[: a.train])
    write(out / "eval.jsonl", dev[: a.eval])
    print(f"wrote {min(a.train, len(train))} train and {min(a.eval, len(dev))} eval rows to {out}")


if __name__ == "__main__":
    main()
