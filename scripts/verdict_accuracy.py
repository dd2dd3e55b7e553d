#!/usr/bin/env python3
"""How often the tuned model's *generated* verdict matches the held-out label.

``python scripts/verdict_accuracy.py runs/verdict runs/verdict-data/eval.jsonl`` generates a
reply for every held-out prompt with the backbone plus the saved side network (no server) and
counts replies that are exactly the expected ``Verdict: positive.`` / ``Verdict: negative.``.
"""

from __future__ import annotations

import json
import sys

from mobillm.backbone import Backbone, BackboneConfig
from mobillm.device.local import LocalModel


def main() -> None:
    side, data = sys.argv[1], sys.argv[2]
    with open(data) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    model = LocalModel.load(Backbone.load(BackboneConfig(source="smollm2-135m")), side)
    exact = well_formed = 0
    for r in rows:
        out = model.generate(r["prompt"], max_new_tokens=8)
        exact += out == r["response"]
        well_formed += out in ("Verdict: positive.", "Verdict: negative.")
    n = len(rows)
    print(json.dumps({"prompts": n, "exact_match": exact / n, "well_formed": well_formed / n}))


if __name__ == "__main__":
    main()
