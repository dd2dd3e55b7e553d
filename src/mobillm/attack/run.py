"""``run_attack``: the whole measurement of ``mobillm attack`` on one backbone and data set."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import torch

from mobillm.attack.config import AttackConfig
from mobillm.attack.frames import public_token_ids, record_rows
from mobillm.attack.labels import cosine_attack, expected_gradient_attack, record_private_session
from mobillm.attack.measure import Say, measure_frames
from mobillm.backbone import Backbone
from mobillm.codec import CodecConfig
from mobillm.config import check
from mobillm.data import DataConfig, load_examples, resolve_preset, tokenize_examples
from mobillm.transport.messages import TrainConfig


def _quiet(_msg: str) -> None:
    pass


def run_attack(
    backbone: Backbone, data: DataConfig, cfg: AttackConfig, say: Say = _quiet
) -> dict[str, Any]:
    """Measure token, bag-of-words and label recovery; returns ``{"rows": [...], ...}``.

    ``data``'s train split is the attacker's public text (``cfg.public_samples`` of it), its
    eval split the held-out private text (``cfg.private_samples``); the label session trains on
    ``cfg.label_samples`` of the train split, drawn with another seed.
    """
    n = backbone.num_layers
    bad = [i for i in cfg.layers if i >= n]
    check(not bad, f"--layers {bad} out of range for a model with {n} layers")
    base = resolve_preset(data)
    check(base.task == "classification", "mobillm attack measures classification data sets")
    pub_cfg = base.replace(max_train_samples=cfg.public_samples, seed=cfg.seed + 1)
    priv_cfg = base.replace(max_eval_samples=cfg.private_samples, seed=cfg.seed)
    tok = backbone.tokenizer
    public = tokenize_examples(load_examples(pub_cfg, "train"), tok, pub_cfg)
    private = tokenize_examples(load_examples(priv_cfg, "eval"), tok, priv_cfg)
    check(len(private) > 0, "the data set has no eval split to hold out as private text")
    template = public_token_ids(tok, base.template)
    emb = backbone.model.get_input_embeddings().weight.detach().float()
    t0 = time.perf_counter()

    def progress(what: str) -> Any:
        def tick(done: int, total: int) -> None:
            if done == total or done % 10 == 0:
                say(f"[attack] forward over {what} text: batch {done}/{total}")

        return tick

    pub_rows = record_rows(
        backbone, public, cfg.layers, template, cfg.batch_size, progress("public")
    )
    priv_rows = record_rows(
        backbone, private, cfg.layers, template, cfg.batch_size, progress("private")
    )
    result: dict[str, Any] = {
        "public_samples": len(public),
        "private_samples": len(private),
        "public_tokens": int(pub_rows.private.sum()),
        "private_tokens": int(priv_rows.private.sum()),
        "forward_seconds": round(time.perf_counter() - t0, 1),
    }
    result["rows"] = measure_frames(pub_rows, priv_rows, emb, cfg, say)
    del pub_rows, priv_rows
    backbone.set_taps(tuple(range(n)))  # the label session's ladder taps every layer
    if cfg.label_samples:
        for eps in cfg.label_epsilons:
            say(f"[attack] private-label session on {cfg.label_samples} samples, label eps {eps:g}")
            result["rows"].append(label_row(backbone, base, cfg, eps))
    return result


def label_row(
    backbone: Backbone, data: DataConfig, cfg: AttackConfig, epsilon: float = 0.0
) -> dict[str, Any]:
    """Run a real private-label session (ladder, in process; its labels randomized at
    ``epsilon`` when > 0) and attack its gradients. Recovery is scored against the true labels;
    ``*_sent`` against the labels the device trained with (the randomized ones)."""
    from mobillm.device.runtime import DeviceConfig, build_side_config

    t0 = time.perf_counter()
    dcfg = data.replace(max_train_samples=cfg.label_samples, seed=cfg.seed)
    examples = load_examples(dcfg, "train")
    n_val = max(1, len(examples) // 10)
    tok = backbone.tokenizer
    train = tokenize_examples(examples[n_val:], tok, dcfg)
    val = tokenize_examples(examples[:n_val], tok, dcfg)
    side = build_side_config(backbone, "classification", len(dcfg.labels), dcfg.verbalizers)
    # a fixed label seed: the measurement can be repeated (a real device keeps its own secret)
    device = DeviceConfig(
        epochs=cfg.label_epochs, private_labels=True, label_epsilon=epsilon, label_seed=cfg.seed
    )
    codec = CodecConfig(scheme=cfg.codecs[0], group_size=cfg.group_size)
    with tempfile.TemporaryDirectory(prefix="mobillm-attack-") as work:
        steps, summary = record_private_session(
            backbone, side, train, val, dcfg.batch_size, device, codec, TrainConfig(), work
        )
    _, head = backbone.export_head(backbone.word_token_ids(dcfg.verbalizers))
    w0 = head["lm_head.weight"].float()
    b0 = head.get("lm_head.bias")
    labels = torch.cat([s.labels for s in steps]) if steps else torch.zeros(0)
    # the label shares the attacker expects: public, from other samples of the train split
    public = load_examples(
        data.replace(max_train_samples=cfg.public_samples, seed=cfg.seed + 1), "train"
    )
    positive = sum(ex.label == 1 for ex in public) / max(1, len(public))
    cos = cosine_attack(steps, prior_positive=positive)
    exp = expected_gradient_attack(steps, w0, None if b0 is None else b0.float())
    as_sent = [dataclasses.replace(s, labels=s.sent) for s in steps]
    exp_sent = expected_gradient_attack(as_sent, w0, None if b0 is None else b0.float())
    sent = torch.cat([s.sent for s in steps]) if steps else torch.zeros(0)
    return {
        "mode": "labels",
        "positions": "loss",
        "learner": side.kind,
        "codec": codec.scheme,
        "train_samples": len(train),
        "steps": len(steps),
        "gradients": len(labels),
        "replayed_steps": sum(s.replay for s in steps),
        "label_epsilon": epsilon,
        "label_1_share": float(labels.float().mean()) if len(labels) else float("nan"),
        "labels_kept": float((sent == labels).float().mean()) if len(labels) else float("nan"),
        "expected_gradient_sent": exp_sent["recovery"],
        "cosine_majority": cos["recovery_majority"],
        "cosine_up_to_sign": cos["recovery_up_to_sign"],
        **{f"expected_gradient{k.removeprefix('recovery')}": v for k, v in exp.items()},
        "device_val_accuracy": summary.get("epochs", [{}])[-1].get("val_accuracy"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
