"""The measurements of ``mobillm attack``: per frame setting and layer, how much text the server
recovers; once, how many private labels it recovers. Rows are plain dicts (one JSONL line each).

Token rows (``mode="tokens"``, positions "valid"): top-1 accuracy over the private text's tokens
(template and special tokens excluded: the attacker knows them) of the nearest input embedding
(raw cosine, and after subtracting the layer's public mean row), of the learned inverter, and of
a prior that always names the public text's most frequent token.

"Content" variants score only the rarer tokens: those outside the public text's
``COMMON`` most frequent ones (punctuation, articles), whose recovery tells little.

Bag-of-words rows (``mode="bag_of_words"``, positions "loss"): micro precision and recall of the
probe's claims at ``threshold``, the recall of its top-k with k the sample's true token count,
and the same two for a prior that ranks tokens by how many public samples hold them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from mobillm.attack.config import AttackConfig
from mobillm.attack.frames import CleanRows, ServerView
from mobillm.attack.inversion import (
    FitOptions,
    bag_scores,
    fit_bag_probe,
    fit_token_inverter,
    nearest_embedding,
)
from mobillm.codec import CodecConfig

Say = Callable[[str], None]
COMMON = 100  # the public text's most frequent tokens, left out of the "content" scores


def common_tokens(view: ServerView, k: int = COMMON) -> set[int]:
    """The ``k`` most frequent private-text tokens of the public text."""
    return {t for t, _ in Counter(view.token_ids[view.private].tolist()).most_common(k)}


def _mean(hits: torch.Tensor) -> float:
    return float(hits.float().mean()) if len(hits) else float("nan")


def token_row(
    pub: ServerView, priv: ServerView, layer: int, emb: torch.Tensor, cfg: AttackConfig
) -> dict[str, Any]:
    """Token recovery from all-token frames of ``layer``."""
    mask = priv.private
    x, y = priv.valid[layer][mask], priv.token_ids[mask]
    content = ~torch.isin(y, torch.tensor(sorted(common_tokens(pub)) or [-1]))
    t0 = time.perf_counter()
    center = pub.valid[layer].mean(0)
    raw = nearest_embedding(x, emb) == y
    centered = nearest_embedding(x, emb, center) == y
    opt = FitOptions(epochs=cfg.epochs, seed=cfg.seed)
    inverter = fit_token_inverter(pub.valid[layer], pub.token_ids, emb, cfg.inverter, opt)
    learned = inverter.predict(x) == y
    top = common_tokens(pub, 1)
    return {
        "mode": "tokens",
        "positions": "valid",
        "layer": layer,
        "nearest_embedding": _mean(raw),
        "nearest_embedding_centered": _mean(centered),
        "inverter": _mean(learned),
        "prior": _mean(torch.isin(y, torch.tensor(sorted(top) or [-1]))),
        "nearest_embedding_centered_content": _mean(centered[content]),
        "inverter_content": _mean(learned[content]),
        "tokens": len(y),
        "content_tokens": int(content.sum()),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def bag_row(
    pub: ServerView, priv: ServerView, layer: int, emb: torch.Tensor, cfg: AttackConfig
) -> dict[str, Any]:
    """Bag-of-words recovery from the loss row of ``layer`` (one row per sample)."""
    t0 = time.perf_counter()
    pub_bags, priv_bags = pub.bags(), priv.bags()
    opt = FitOptions(epochs=cfg.probe_epochs, batch=64, seed=cfg.seed)
    probe = fit_bag_probe(pub.loss[layer], pub_bags, emb, cfg.inverter, opt)
    scores = bag_scores(probe, priv.loss[layer], priv_bags, cfg.threshold)
    common = common_tokens(pub)
    content = bag_scores(probe, priv.loss[layer], priv_bags, cfg.threshold, common)
    drop = [b - common for b in pub_bags], [b - common for b in priv_bags]
    return {
        "mode": "bag_of_words",
        "positions": "loss",
        "layer": layer,
        **scores,
        **bag_prior(pub_bags, priv_bags, cfg.threshold),
        **{f"content_{k}": v for k, v in content.items()},
        **{f"content_{k}": v for k, v in bag_prior(*drop, cfg.threshold).items()},
        "samples": len(priv_bags),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def bag_prior(pub: list[set[int]], priv: list[set[int]], threshold: float) -> dict[str, float]:
    """What no frame is needed for: tokens ranked by the share of public samples holding them."""
    share = Counter(t for bag in pub for t in bag)
    ranked = [t for t, _ in share.most_common()]
    claimed = {t for t, n in share.items() if n / max(1, len(pub)) >= threshold}
    total = sum(len(b) for b in priv)
    hits = sum(len(b & claimed) for b in priv)
    top = sum(len(b & set(ranked[: len(b)])) for b in priv)
    return {
        "prior_precision": hits / max(1, len(claimed) * len(priv)),
        "prior_recall": hits / max(1, total),
        "prior_topk_recall": top / max(1, total),
    }


def measure_frames(
    pub: CleanRows,
    priv: CleanRows,
    emb: torch.Tensor,
    cfg: AttackConfig,
    say: Say | None = None,
) -> list[dict[str, Any]]:
    """Every token and bag-of-words row, for each codec x noise setting and each layer."""
    rows = []
    for codec in cfg.codecs:
        for noise in cfg.noises:
            ccfg = CodecConfig(scheme=codec, group_size=cfg.group_size)
            # the attacker's own noise seeds: it cannot know the device's
            pv = pub.view(ccfg, noise, seed=cfg.seed + 1000)
            qv = priv.view(ccfg, noise, seed=cfg.seed + 2000)
            for layer in cfg.layers:
                setting = {"codec": codec, "frame_noise": noise}
                tok = {**token_row(pv, qv, layer, emb, cfg), **setting}
                bag = {**bag_row(pv, qv, layer, emb, cfg), **setting}
                rows += [tok, bag]
                if say is not None:
                    say(
                        f"[attack] {codec} noise {noise:g} layer {layer}: tokens "
                        f"{tok['inverter']:.3f} (inverter), {tok['nearest_embedding']:.3f} / "
                        f"{tok['nearest_embedding_centered']:.3f} (nearest embedding); bag of "
                        f"words P {bag['precision']:.3f} R {bag['recall']:.3f}"
                    )
    return rows
