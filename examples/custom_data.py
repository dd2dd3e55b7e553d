"""Your own data as a Python list (a ``datasets.Dataset`` works the same way).

python examples/custom_data.py [MODEL]
"""

import random
import sys

import mobillm

GOOD = ["great", "lovely", "superb", "friendly", "delicious", "wonderful"]
BAD = ["awful", "rude", "cold", "bland", "terrible", "slow"]
THINGS = ["food", "service", "staff", "coffee", "room", "view"]


def reviews(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good = rng.random() < 0.5
        word = rng.choice(GOOD if good else BAD)
        rows.append(
            {
                "review": f"The {rng.choice(THINGS)} was {word}.",
                "verdict": "good" if good else "bad",
            }
        )
    return rows


model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
config = mobillm.DataConfig(
    text_column="review",
    label_column="verdict",
    labels=("bad", "good"),  # class order; inferred (sorted) when omitted
    verbalizers=("negative", "positive"),  # words the frozen model starts from
    template="Review: {text}\nSentiment:",
    batch_size=8,
)
device = mobillm.Device(model)
run = device.train(reviews(160, seed=0), reviews(60, seed=1), config=config, out="runs/custom")
print(f"accuracy {run['before']['accuracy']:.3f} -> {run['after']['accuracy']:.3f}")
print(device.evaluate([{"review": "The staff were rude.", "verdict": "bad"}], predictions=True))
