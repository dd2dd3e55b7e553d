"""The privacy page (``docs/privacy.md``) and the command's summary, from a results.json."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mobillm.attack.report import (
    bag_table,
    exposure,
    label_table,
    settings,
    token_table,
    train_command,
)


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}%"


def _points(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}"


def _best(rows: list[dict[str, Any]], mode: str, key: str, codec: str, noise: float) -> dict:
    cand = [
        r
        for r in rows
        if r["mode"] == mode and r.get("codec") == codec and r.get("frame_noise") == noise
    ]
    return max(cand, key=lambda r: r[key]) if cand else {}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per setting, the worst layer of each attack; the label attacks; the mitigation verdict."""
    rows = result["rows"]
    out: dict[str, Any] = {"settings": []}
    for codec, noise in settings(rows):
        tok = _best(rows, "tokens", "inverter", codec, noise)
        bag = _best(rows, "bag_of_words", "recall", codec, noise)
        out["settings"].append(
            {
                "codec": codec,
                "frame_noise": noise,
                "token_recovery_max": tok.get("inverter"),
                "token_recovery_layer": tok.get("layer"),
                "bag_recall_max": bag.get("recall"),
                "bag_precision_there": bag.get("precision"),
                "bag_layer": bag.get("layer"),
            }
        )
    out["labels"] = [r for r in rows if r["mode"] == "labels"]
    if result.get("accuracy"):
        out["mitigations"] = mitigations(result)
    return out


def mitigations(result: dict[str, Any]) -> dict[str, Any]:
    """Each accuracy run with the recovery its frames allow, its cost against the first run
    (the reference), and whether it meets the issue's bar: recovery at least 10x below the
    reference's all-token recovery at a cost of at most 1 point."""
    rows, runs = result["rows"], result["accuracy"]
    ref = runs[0]
    ref_exp = exposure(ref, rows)
    undefended = ref_exp["recovery"] if ref_exp and ref_exp["mode"] == "tokens" else None
    if undefended is None:  # the reference sends loss rows: take the worst all-token layer
        tok = _best(rows, "tokens", "inverter", ref["codec"], ref["frame_noise"])
        undefended = tok.get("inverter")
    bar = undefended / 10 if undefended else None
    table = []
    for run in runs:
        exp = exposure(run, rows)
        cost = 100 * (ref["after"] - run["after"])
        base = _undefended_twin(run, runs)
        rec = exp["recovery"] if exp else None
        table.append(
            {
                "name": run["name"],
                "exposure": exp,
                "after": run["after"],
                "before": run["before"],
                "cost_points": cost,
                "cost_vs_learner_points": 100 * (base["after"] - run["after"]) if base else None,
                "meets_bar": bool(rec is not None and bar and rec <= bar and cost <= 1.0),
                "command": train_command(run),
            }
        )
    affordable = [t for t in table if t["cost_points"] <= 1.0 and t["exposure"]]
    pick = min(affordable, key=lambda t: t["exposure"]["recovery"], default=None)
    return {
        "reference": ref["name"],
        "undefended_recovery": undefended,
        "bar": bar,
        "runs": table,
        "recommended": pick["name"] if pick else None,
        "bar_met": bool(pick and pick["meets_bar"]),
        "missed_by_factor": (pick["exposure"]["recovery"] / bar) if pick and bar else None,
    }


def _undefended_twin(run: dict[str, Any], runs: list[dict[str, Any]]) -> dict | None:
    """The run of the same learner with int8 frames, no noise and every layer tapped."""
    for r in runs:
        if (
            r["learner"] == run["learner"]
            and r["codec"] == "int8"
            and not r["frame_noise"]
            and (r["learner"] == "split" or len(r["taps"]) == r["num_layers"])
        ):
            return r
    return None


def tables(result: dict[str, Any]) -> str:
    """Every table of the page, for the terminal."""
    rows, thr = result["rows"], result.get("config", {}).get("threshold", 0.5)
    parts = []
    for codec, noise in settings(rows):
        parts.append(f"\n## tokens, all-token frames ({codec}, frame noise {noise:g})\n")
        parts.append(token_table(rows, codec, noise))
        parts.append(f"\n## bag of words, loss rows ({codec}, frame noise {noise:g})\n")
        parts.append(bag_table(rows, codec, noise, thr))
    if any(r["mode"] == "labels" for r in rows):
        parts.append("\n## labels, private-label mode\n")
        parts.append(label_table(rows))
    return "\n".join(parts)


INTRO = """\
# Privacy: what the server can recover

MobiLLM promises that training text never leaves the device, and no token id or text crosses
the wire in classification (`tests/transport/test_grpc_privacy.py`). But the server receives
hidden states of a *public* backbone, and published attacks (Vec2Text, SipIt, PIA) recover
input tokens from hidden states. `mobillm attack` plays that server: it runs the public
backbone over text, gathers rows exactly as the device does (`device.rows.plan_rows`), applies
the device's frame noise (`device.noise`, the very function a device with `--frame-noise`
uses, with the attacker's own seed) and passes them through the session's codec, encode then
decode: what a server really reads. It fits its attacks on *public* text (SST-2 train
sentences) and is scored on *held-out private* text it never fitted on (SST-2 dev sentences).

Everything below is generated by `mobillm attack --write-doc docs/privacy.md` from
`results/privacy/results.json`; the numbers are measurements, not estimates.
"""

METHOD = """\
## The attacks

* **Token recovery from all-token frames** (positions `valid`: the default split learner's
  boundary layer, `--mixer attention`, `--pooling mean`, `--positions valid`). Scored as the
  share of the private text's tokens recovered top-1; template tokens (`Review:`,
  `Sentiment:`) and special tokens are left out, as the attacker knows them. "Content" scores
  leave out the public text's 100 most frequent tokens too (punctuation, articles).
  * *nearest embedding*: the input-embedding row of highest cosine with the row; *centered*:
    after subtracting the layer's mean row over the public text (from the first layer on,
    SmolLM2's rows share a large common component that swamps the raw cosine).
  * *learned inverter*: a linear map (`--inverter linear`; or a small MLP) from the
    standardised row into the embedding space, scored by cosine against every input embedding
    (softmax regression with the public embedding matrix as its tied output layer), fitted on
    the public rows with cross-entropy over the tokens of the public text; it predicts over the
    whole vocabulary, so it can name tokens the public text never held.
  * *prior*: always the public text's most frequent token; what no frame is needed for.
* **Bag-of-words from loss rows** (positions `loss`, the ladder's default: one row per sample,
  at the template's last token). A multi-label linear probe (the same tied map, one bias per
  token, binary cross-entropy) from that row to the set of the sample's private tokens, over
  the public text's vocabulary. Precision and recall are micro-averaged over samples; the
  probe claims every token of probability at least the threshold. "Top-k" gives it the true
  number k of distinct private tokens of each sample and takes its k best (an upper bound: a
  real attacker does not know k); the *prior* ranks tokens by how many public samples hold
  them, with no frame at all.
* **Labels in private-label mode** (`--private-labels`): the server sees, per step, the side
  network's features of the loss rows and the device's gradient with respect to them, one row
  per sample. A real private-label session (ladder, in process) is recorded; the harness
  holds the true labels aside. *Cosine* (Li et al. 2021, "Label Leakage and Protection in
  Two-party Split Learning"): per step the gradients' leading direction splits the samples by
  sign; steps are chained by keeping consecutive directions in agreement, which leaves one
  global sign; "by majority" gives the larger side the label the public train split holds
  most often (positive for SST-2), "up to the sign" is what an attacker who learns a single
  label gets. *Expected gradient*: the attacker guesses the classifier's start (the public LM
  head's rows of the preset's verbalizers, " negative"/" positive") and picks per sample the
  label whose expected gradient `W0^T (softmax(W0 f) - e_y)` is closest in cosine to the one
  received; no sign is left open. Every training step is scored, cache-epoch replays included.
  With a label epsilon (`--label-epsilons`, the device's `--label-epsilon`) the session's
  training labels went through randomized response on the device first: recovery is scored
  against the true labels, and the last column against the randomized ones the device
  trained on (what the gradients carry).
"""


def _setup(result: dict[str, Any]) -> str:
    cfg = result.get("config", {})
    return (
        f"Backbone `{result.get('model')}` ({result.get('backbone_layers')} layers), data "
        f"`{result.get('data')}`: the attacker fits on {result.get('public_samples')} public "
        f"sentences ({result.get('public_tokens')} private-text tokens) and is scored on "
        f"{result.get('private_samples')} held-out ones ({result.get('private_tokens')} "
        f"tokens); inverter `{cfg.get('inverter')}`, {cfg.get('epochs')} epochs; probe "
        f"threshold {cfg.get('threshold')}. Measured in {result.get('seconds')} s on the "
        "development machine (2 cores, shared).\n\n"
        f"```bash\n{result.get('command')}\n```\n"
    )


def _headline(result: dict[str, Any]) -> str:
    s = summary(result)
    lines = [
        "## Summary",
        "",
        "| frames | learned inverter, worst layer (all-token frames) | bag of words, worst "
        "layer (loss rows): recall / precision |",
        "|---|---|---|",
    ]
    for st in s["settings"]:
        lines.append(
            f"| {st['codec']}, frame noise {st['frame_noise']:g} | "
            f"{_pct(st['token_recovery_max'])} (layer {st['token_recovery_layer']}) | "
            f"{_pct(st['bag_recall_max'])} / {_pct(st['bag_precision_there'])} "
            f"(layer {st['bag_layer']}) |"
        )
    for r in s["labels"]:
        eps = r.get("label_epsilon", 0.0)
        rr = f", labels randomized at epsilon {eps:g}" if eps else ""
        lines.append(
            f"\nPrivate labels ({r['gradients']} per-sample gradients of a {r['learner']} "
            f"session{rr}): the expected-gradient attack recovers "
            f"{_pct(r.get('expected_gradient'))}"
            f" of the labels, the cosine attack {_pct(r['cosine_majority'])} with the sign "
            f"set by the majority class ({_pct(r['cosine_up_to_sign'])} up to the sign)."
        )
    return "\n".join(lines) + "\n"


def _mitigation_section(result: dict[str, Any]) -> str:
    if not result.get("accuracy"):
        return (
            "## Mitigations, measured\n\nNo accuracy runs were given (`--accuracy "
            "NAME=RUN`); see the tables above for recovery per layer, codec and noise.\n"
        )
    m = mitigations(result)
    lines = [
        "## Mitigations, measured",
        "",
        "SST-2 dev accuracy of `mobillm train` runs with the same budget and seed, beside the "
        "worst recovery the attacks above reach on what each run sends (all-token frames: the "
        "learned inverter over the run's tapped layers among those attacked; loss rows: the "
        "bag-of-words recall at the probe's threshold, with its precision). Cost is against "
        f"the first run, `{m['reference']}`.",
        "",
        "| run | what the server reads | recovery | dev accuracy before → after | cost "
        "(points) | cost against the same learner undefended | meets the bar | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in m["runs"]:
        e = t["exposure"]
        if e is None:
            what, rec = "–", "not measured"
        elif e["mode"] == "tokens":
            what = f"all-token frames, layer {e['layer']} worst"
            rec = f"{_pct(e['recovery'])} of tokens (content tokens: {_pct(e['content_recovery'])})"
        else:
            what = f"loss rows, layer {e['layer']} worst"
            rec = (
                f"bag of words: recall {_pct(e['recovery'])} at precision "
                f"{_pct(e['precision'])} (top-k {_pct(e['topk_recall'])}, prior "
                f"{_pct(e['prior_topk_recall'])}; content tokens: recall "
                f"{_pct(e['content_recovery'])} at precision {_pct(e['content_precision'])})"
            )
        lines.append(
            f"| {t['name']} | {what} | {rec} | {t['before']:.4f} → {t['after']:.4f} | "
            f"{t['cost_points']:+.2f} | {_points(t['cost_vs_learner_points'])} | "
            f"{'yes' if t['meets_bar'] else 'no'} | "
            f"`{t['command']}` |"
        )
    lines += [
        "",
        f"The bar (issue 10): token recovery at least 10x below the undefended all-token mode "
        f"({_pct(m['undefended_recovery'])}, so at most {_pct(m['bar'])}) at a cost of at most "
        "1 point of SST-2 accuracy.",
    ]
    if m["recommended"] is None:
        lines.append("No run stayed within 1 point of the reference.")
    elif m["bar_met"]:
        lines.append(f"Met by `{m['recommended']}`, the lowest recovery within 1 point.")
    else:
        lines.append(
            f"Not met: the lowest recovery within 1 point is `{m['recommended']}`'s, "
            f"{m['missed_by_factor']:.1f}x the bar."
        )
    if result.get("accuracy_command"):
        lines += ["", f"```bash\n{result['accuracy_command']}\n```"]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], path: str | Path, png: Path | None, notes: str = "") -> Path:
    """Write the page to ``path``; ``png`` is linked relative to it; ``notes`` (Markdown, the
    analysis a person wrote from these numbers) is kept below the measured sections."""
    path = Path(path)
    rows, thr = result["rows"], result.get("config", {}).get("threshold", 0.5)
    parts = [INTRO, _setup(result), _headline(result)]
    if png is not None:
        rel = Path(os.path.relpath(png, path.parent)).as_posix()
        parts.append(f"![recovery per layer]({rel})\n")
    parts.append(METHOD)
    parts.append("## Token recovery from all-token frames, per layer\n")
    for codec, noise in settings(rows):
        parts.append(f"**{codec}, frame noise {noise:g}**\n\n{token_table(rows, codec, noise)}\n")
    parts.append("## Bag of words from the loss row, per layer\n")
    for codec, noise in settings(rows):
        table = bag_table(rows, codec, noise, thr)
        parts.append(f"**{codec}, frame noise {noise:g}**\n\n{table}\n")
    if any(r["mode"] == "labels" for r in rows):
        parts.append(f"## Labels in private-label mode\n\n{label_table(rows)}\n")
    parts.append(_mitigation_section(result))
    if notes:
        parts.append(notes.strip() + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
