"""Data and flags the CLI tests share: a review task with non-default columns and labels."""

import csv

TEMPLATE = "Review: {text}\\nSentiment:"
TASK_FLAGS = [
    "--text-column",
    "review",
    "--label-column",
    "stars",
    "--labels",
    "neg,pos",
    "--verbalizers",
    "negative,positive",
    "--template",
    TEMPLATE,
]


def write_reviews(path, n: int) -> str:
    """A TSV as pandas writes it: texts with newlines, tabs or quotes are quoted."""
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["review", "stars"])
        for i in range(n):
            w.writerow([f"a good movie {i}", "pos"])
            w.writerow([f'a bad\nmovie, "really"\tbad {i}', "neg"])
    return str(path)
