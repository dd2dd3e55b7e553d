"""Tables, the recovery-vs-layer plot, and accuracy runs matched to the recovery they allow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def settings(rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The (codec, frame noise) settings measured, in the order they ran."""
    seen: list[tuple[str, float]] = []
    for r in rows:
        key = (r.get("codec"), r.get("frame_noise"))
        if r["mode"] != "labels" and key not in seen:
            seen.append(key)  # type: ignore[arg-type]
    return seen


def _select(rows: list[dict[str, Any]], mode: str, codec: str, noise: float) -> list[dict]:
    return [
        r
        for r in rows
        if r["mode"] == mode and r.get("codec") == codec and r.get("frame_noise") == noise
    ]


def token_table(rows: list[dict[str, Any]], codec: str, noise: float) -> str:
    """Markdown: per layer, top-1 token recovery of each attack (all-token frames)."""
    out = [
        "| layer | nearest embedding | nearest embedding, centered | learned inverter | prior "
        "| learned inverter, content tokens |",
        "|---|---|---|---|---|---|",
    ]
    for r in _select(rows, "tokens", codec, noise):
        out.append(
            f"| {r['layer']} | {_f(r['nearest_embedding'])} | "
            f"{_f(r['nearest_embedding_centered'])} | **{_f(r['inverter'])}** | {_f(r['prior'])} "
            f"| {_f(r.get('inverter_content'))} |"
        )
    return "\n".join(out)


def bag_table(rows: list[dict[str, Any]], codec: str, noise: float, threshold: float) -> str:
    """Markdown: per layer, the bag-of-words probe's precision and recall (loss rows)."""
    out = [
        f"| layer | precision (p ≥ {threshold:g}) | recall (p ≥ {threshold:g}) | claims per "
        "sample | recall of top-k (k = true count) | prior: recall of top-k | content tokens: "
        "precision / recall | content: top-k / prior top-k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in _select(rows, "bag_of_words", codec, noise):
        out.append(
            f"| {r['layer']} | {_f(r['precision'])} | **{_f(r['recall'])}** | "
            f"{_f(r['predicted_per_sample'], 1)} | {_f(r['topk_recall'])} | "
            f"{_f(r['prior_topk_recall'])} | {_f(r.get('content_precision'))} / "
            f"{_f(r.get('content_recall'))} | {_f(r.get('content_topk_recall'))} / "
            f"{_f(r.get('content_prior_topk_recall'))} |"
        )
    return "\n".join(out)


def label_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: the label attacks on private-label sessions' gradients, one row per label
    epsilon; recovery is against the true labels, and against the labels sent (trained on)."""
    out = [
        "| learner | label epsilon (randomized response) | labels kept | gradients (samples x "
        "steps) | share of label 1 | cosine, sign by majority | cosine, up to the sign | "
        "expected gradient (all / first half / second half) | expected gradient, against the "
        "labels trained on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["mode"] != "labels":
            continue
        exp = " / ".join(
            _f(r.get(k))
            for k in (
                "expected_gradient",
                "expected_gradient_first_half",
                "expected_gradient_second_half",
            )
        )
        eps = r.get("label_epsilon", 0.0)
        out.append(
            f"| {r['learner']} | {'none' if not eps else f'{eps:g}'} | "
            f"{_f(r.get('labels_kept', 1.0))} | {r['gradients']} ({r['steps']} steps, "
            f"{r['replayed_steps']} replayed) | {_f(r['label_1_share'])} | "
            f"{_f(r['cosine_majority'])} | {_f(r['cosine_up_to_sign'])} | {exp} | "
            f"{_f(r.get('expected_gradient_sent', r.get('expected_gradient')))} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """recovery_vs_layer.png: token recovery (inverter, nearest embedding) and bag-of-words
    recall per layer, one line per frame setting. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for codec, noise in settings(rows):
        label = f"{codec}, noise {noise:g}"
        tok = _select(rows, "tokens", codec, noise)
        bag = _select(rows, "bag_of_words", codec, noise)
        (line,) = a.plot([r["layer"] for r in tok], [r["inverter"] for r in tok], "o-", label=label)
        if (codec, noise) == settings(rows)[0]:
            a.plot(
                [r["layer"] for r in tok],
                [r["nearest_embedding_centered"] for r in tok],
                "x:",
                color=line.get_color(),
                label=f"{label}: nearest embedding",
            )
        b.plot([r["layer"] for r in bag], [r["recall"] for r in bag], "o-", label=label)
        b.plot(
            [r["layer"] for r in bag],
            [r["topk_recall"] for r in bag],
            "s--",
            color=b.lines[-1].get_color(),
            alpha=0.5,
        )
    first = _select(rows, "bag_of_words", *settings(rows)[0]) if settings(rows) else []
    if first:
        b.axhline(first[0]["prior_topk_recall"], color="grey", lw=1, ls=":", label="prior, top-k")
    a.set_title("tokens from all-token frames (learned inverter)")
    b.set_title("bag of words from the loss row (solid: p ≥ threshold, dashed: top-k)")
    for ax in (a, b):
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a.set_ylabel("share of private tokens recovered")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# --- accuracy runs (mobillm train) and the recovery their frames allow ---------------------


def accuracy_record(run_dir: str | Path, name: str) -> dict[str, Any]:
    """What a finished ``mobillm train`` run in ``run_dir`` says about its setting and accuracy."""
    d = Path(run_dir)
    summary = json.loads((d / "summary.json").read_text())
    side = json.loads((d / "side.json").read_text())
    data = summary["data"]
    return {
        "name": name,
        "run": str(d),
        "learner": summary["side"]["kind"],
        "split_layers": summary["side"].get("split_layers", 0),
        "codec": summary["codec"],
        "frame_noise": float(summary.get("frame_noise", 0.0)),
        "frame_noise_seed": summary.get("frame_noise_seed", -1),
        "positions": summary["positions"],
        "taps": side["taps"],
        "train_samples": data["max_train_samples"],
        "batch_size": data["batch_size"],
        "epochs": summary["train"].get("server_epochs"),
        "kept_epoch": summary["train"].get("kept_epoch"),
        "wall_seconds": summary["train"].get("wall_seconds"),
        "bytes_per_sample": summary["train"].get("bytes_per_sample"),
        "before": summary["before"]["accuracy"],
        "after": summary["after"]["accuracy"],
        "eval_samples": summary["after"]["samples"],
        "num_layers": summary["backbone"]["num_layers"],
    }


def exposure(run: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The worst recovery measured for what ``run`` sends: the learned inverter over its tapped
    layers for all-token frames, the bag-of-words recall for loss rows. None if unmeasured."""
    all_tokens = run["positions"] != "loss" or run["learner"] == "split"
    mode = "tokens" if all_tokens else "bag_of_words"
    key = "inverter" if all_tokens else "recall"
    cand = [
        r
        for r in _select(rows, mode, run["codec"], run["frame_noise"])
        if r["layer"] in run["taps"]
    ]
    if not cand:
        return None
    worst = max(cand, key=lambda r: r[key])
    out = {"mode": mode, "layer": worst["layer"], "recovery": worst[key]}
    if all_tokens:
        out["content_recovery"] = max(r["inverter_content"] for r in cand)
    else:
        out |= {"precision": worst["precision"], "topk_recall": worst["topk_recall"]}
        out["prior_topk_recall"] = worst["prior_topk_recall"]
        best = max(cand, key=lambda r: r["content_recall"])
        out |= {"content_recovery": best["content_recall"]}
        out["content_precision"] = best["content_precision"]
    return out


def train_command(run: dict[str, Any]) -> str:
    """The ``mobillm train`` command line that made ``run``."""
    cmd = (
        f"mobillm train --data sst2 --max-train-samples {run['train_samples']} "
        f"--batch-size {run['batch_size']} --learner {run['learner']} --epochs {run['epochs']}"
    )
    if run["learner"] == "split":
        cmd += f" --split-layers {run['split_layers']}"
    if run["codec"] != "int8":
        cmd += f" --codec {run['codec']}"
    if run["frame_noise"]:
        cmd += f" --frame-noise {run['frame_noise']:g}"
        if run["frame_noise_seed"] >= 0:
            cmd += f" --frame-noise-seed {run['frame_noise_seed']}"
    if run["learner"] == "ladder" and len(run["taps"]) < run["num_layers"]:
        cmd += f" --taps {','.join(str(t) for t in run['taps'])}"
    return cmd + f" --out runs/privacy/{run['name']}"
