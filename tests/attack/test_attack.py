"""``mobillm attack`` on tiny models: the attacks find what is there, the frame noise and the
codec are applied as a device applies them, and the CLI writes its JSON, JSONL, PNG and page."""

import json
import random

import pytest
import torch
from tinymodels import tiny_model

from mobillm.attack import AttackConfig, run_attack
from mobillm.attack.frames import public_token_ids, record_rows
from mobillm.attack.inversion import FitOptions, fit_token_inverter, nearest_embedding
from mobillm.backbone import Backbone, BackboneConfig
from mobillm.cli.main import main
from mobillm.codec import CodecConfig
from mobillm.data import ClassificationExample, DataConfig, tokenize_examples
from mobillm.errors import ConfigError

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "charming", "journey",
    "bleak", "desperate", "movie",
]  # fmt: skip
TEMPLATE = "Review: {text}\nSentiment:"


def _sentences(n, seed):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        label = rnd.randint(0, 1)
        words = [rnd.choice(WORDS) for _ in range(rnd.randint(3, 7))]
        out.append((" ".join([*words, ("good" if label else "bad")]), label))
    return out


def _embedding_led_backbone(tokenizer):
    """A tiny Llama whose layers write small updates, so each layer's rows stay close to the
    input embedding (as in early layers of many real models): nearest-embedding territory."""
    model = tiny_model("llama", vocab=len(tokenizer), layers=3, seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.02)
            layer.mlp.down_proj.weight.mul_(0.02)
    return Backbone(model, tokenizer, BackboneConfig(source="tiny-llama"))


def _data(tokenizer, n, seed):
    cfg = DataConfig(labels=("0", "1"), verbalizers=("bad", "good"), template=TEMPLATE)
    ex = [ClassificationExample(t, y) for t, y in _sentences(n, seed)]
    return tokenize_examples(ex, tokenizer, cfg)


def test_nearest_embedding_reads_layer_zero_and_noise_hides_it(bos_tokenizer):
    bb = _embedding_led_backbone(bos_tokenizer)
    data = _data(bos_tokenizer, 40, 0)
    rows = record_rows(bb, data, [0], public_token_ids(bos_tokenizer, TEMPLATE))
    emb = bb.model.get_input_embeddings().weight.detach().float()
    view = rows.view(CodecConfig("fp16"))
    mask = view.private
    truth = view.token_ids[mask]
    assert mask.sum() > 100 and not mask.all()  # the template's tokens are left out
    hit = (nearest_embedding(view.valid[0][mask], emb) == truth).float().mean()
    assert hit >= 0.95
    # the same rows scored against shuffled tokens: what a broken attack would look like
    wrong = truth[torch.randperm(len(truth), generator=torch.Generator().manual_seed(0))]
    assert (nearest_embedding(view.valid[0][mask], emb) == wrong).float().mean() < 0.3
    # the device's frame noise, applied by the attack, hides most tokens at 4x the rows' RMS
    noisy = rows.view(CodecConfig("fp16"), noise=4.0)
    assert not torch.equal(noisy.valid[0], view.valid[0])
    assert (nearest_embedding(noisy.valid[0][mask], emb) == truth).float().mean() < hit - 0.3
    # loss rows: one per sample, in data order, the last real token's
    assert view.loss[0].shape == (len(data), bb.hidden_size)
    last = torch.tensor([len(ids) - 1 for ids in data.input_ids])
    starts = torch.cumsum(torch.tensor(data.lengths), 0) - torch.tensor(data.lengths)
    torch.testing.assert_close(view.loss[0], view.valid[0][starts + last])


def test_learned_inverter_generalises_to_held_out_text(make_tiny_backbone, bos_tokenizer):
    """On an ordinary tiny model, where the nearest embedding fails at layer 0 (its first layer
    writes more than the embedding holds), the MLP inverter still names most held-out tokens."""
    bb = make_tiny_backbone("llama")
    template = public_token_ids(bos_tokenizer, TEMPLATE)
    pub = record_rows(bb, _data(bos_tokenizer, 200, 0), [0], template).view(CodecConfig("int8"))
    priv = record_rows(bb, _data(bos_tokenizer, 40, 1), [0], template).view(CodecConfig("int8"))
    emb = bb.model.get_input_embeddings().weight.detach().float()
    m = priv.private
    assert (nearest_embedding(priv.valid[0][m], emb) == priv.token_ids[m]).float().mean() < 0.2
    inv = fit_token_inverter(pub.valid[0], pub.token_ids, emb, "mlp", FitOptions(epochs=100))
    assert (inv.predict(priv.valid[0][m]) == priv.token_ids[m]).float().mean() >= 0.7


@pytest.fixture
def sst2_dir(tmp_path, monkeypatch):
    """An SST-2-shaped folder of tiny sentences, found through MOBILLM_SST2_DIR."""
    root = tmp_path / "sst2"
    root.mkdir()
    for name, n, seed in (("train.tsv", 160, 0), ("dev.tsv", 40, 1)):
        lines = ["sentence\tlabel", *(f"{t} \t{y}" for t, y in _sentences(n, seed))]
        (root / name).write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("MOBILLM_SST2_DIR", str(root))
    return root


def test_run_attack_end_to_end_with_labels(sst2_dir, bos_tokenizer):
    bb = _embedding_led_backbone(bos_tokenizer)
    cfg = AttackConfig(
        layers=(0, 2),
        codecs=("fp16",),
        noises=(0.0,),
        public_samples=120,
        private_samples=30,
        epochs=20,
        probe_epochs=3,
        label_samples=64,
        label_epochs=1,
        label_epsilons=(0.0, 0.5),
    )
    result = run_attack(bb, DataConfig(preset="sst2"), cfg)
    rows = {(r["mode"], r.get("layer")): r for r in result["rows"] if not r.get("label_epsilon")}
    assert set(rows) == {
        ("tokens", 0),
        ("tokens", 2),
        ("bag_of_words", 0),
        ("bag_of_words", 2),
        ("labels", None),
    }
    assert rows["tokens", 0]["nearest_embedding"] >= 0.95
    assert rows["tokens", 0]["inverter"] >= 0.8
    for r in (rows["bag_of_words", 0], rows["bag_of_words", 2]):
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    labels = rows["labels", None]
    assert labels["gradients"] >= 40 and 0.3 < labels["label_1_share"] < 0.7
    # two classes, no label smoothing: every gradient is +-(w1 - w0), so the split is exact
    assert labels["cosine_up_to_sign"] == 1.0
    # one epoch from the verbalizer start: the guessed classifier is close to the real one
    assert labels["expected_gradient"] >= 0.95
    assert labels["labels_kept"] == 1.0 and labels["expected_gradient_sent"] >= 0.95
    # randomized response at eps 0.5 keeps 62% of the labels: the attack still reads the
    # labels the device trained on, and so no more of the true ones than were kept
    (rr,) = [r for r in result["rows"] if r.get("label_epsilon") == 0.5]
    assert rr["gradients"] == labels["gradients"]
    assert 0.45 < rr["labels_kept"] < 0.8
    assert rr["expected_gradient_sent"] >= 0.9
    assert rr["expected_gradient"] <= rr["labels_kept"] + 0.1


def test_cli_writes_json_jsonl_png_and_page(sst2_dir, model_dir, tmp_path, capsys):
    out, doc = tmp_path / "privacy", tmp_path / "privacy.md"
    args = [
        "attack", "--model", model_dir, "--layers", "0,1", "--codecs", "int8,int4",
        "--frame-noise", "0,1", "--public-samples", "60", "--private-samples", "20",
        "--epochs", "1", "--probe-epochs", "1", "--label-samples", "0",
        "--out", str(out), "--write-doc", str(doc),
    ]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(result["rows"]) == 2 * 2 * 2 * 2  # codecs x noises x layers x modes
    first = json.loads(lines[0])
    assert {"mode", "layer", "codec", "frame_noise"} <= set(first)
    assert result["command"].startswith("mobillm attack --model")
    assert (out / "recovery_vs_layer.png").stat().st_size > 1000
    page = doc.read_text()
    assert "recovery_vs_layer.png" in page and "mobillm attack --model" in page
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["settings"]) == 4
    # the page again from the JSON alone, with a finished-run folder that is not one: refused
    again = ["attack", "--from-json", str(out / "results.json"), "--out", str(out)]
    assert main([*again, "--write-doc", str(doc)]) == 0
    assert main([*again, "--accuracy", f"x={tmp_path}"]) == 2
    # two measurements merge into one page: other settings are added, a repeated one refused
    more = tmp_path / "more"
    extra = [
        "attack", "--model", model_dir, "--layers", "0,1", "--codecs", "fp16",
        "--frame-noise", "0", "--public-samples", "60", "--private-samples", "20",
        "--epochs", "1", "--probe-epochs", "1", "--label-samples", "0", "--out", str(more),
    ]  # fmt: skip
    assert main(extra) == 0
    both = f"{out / 'results.json'},{more / 'results.json'}"
    merged = tmp_path / "merged"
    assert main(["attack", "--from-json", both, "--out", str(merged), "--write-doc", str(doc)]) == 0
    rows = json.loads((merged / "results.json").read_text())["rows"]
    assert len(rows) == 16 + 4 and "fp16" in doc.read_text()
    twice = f"{out / 'results.json'},{out / 'results.json'}"
    assert main(["attack", "--from-json", twice, "--out", str(merged)]) == 2


def test_attack_config_is_checked_and_round_trips():
    cfg = AttackConfig(layers=(1, 3), noises=(0.0, 0.5), codecs=("int4",))
    assert AttackConfig.from_json(cfg.to_json()) == cfg
    for bad in ({"layers": ()}, {"codecs": ("int3",)}, {"noises": (-1.0,)}, {"threshold": 1.0}):
        with pytest.raises(ConfigError):
            AttackConfig(**bad)


def _run(name, learner, after, noise=0.0, positions="loss", taps=(0, 1, 2)):
    return {
        "name": name, "learner": learner, "split_layers": 1 if learner == "split" else 0,
        "codec": "int8", "frame_noise": noise, "frame_noise_seed": 0, "positions": positions,
        "taps": list(taps), "num_layers": 3, "train_samples": 100, "batch_size": 16,
        "epochs": 2, "before": 0.7, "after": after,
    }  # fmt: skip


def test_mitigations_judge_each_run_against_the_bar():
    from mobillm.attack.doc import mitigations

    def tok(layer, noise, inv):
        return {"mode": "tokens", "codec": "int8", "frame_noise": noise, "layer": layer,
                "inverter": inv, "inverter_content": inv}  # fmt: skip

    def bag(layer, noise, recall):
        return {"mode": "bag_of_words", "codec": "int8", "frame_noise": noise, "layer": layer,
                "recall": recall, "precision": 0.5, "topk_recall": 0.3,
                "prior_topk_recall": 0.3, "content_recall": recall / 2,
                "content_precision": 0.4}  # fmt: skip

    rows = [tok(1, 0.0, 0.9), tok(2, 0.0, 0.6), bag(1, 0.0, 0.2), bag(2, 0.0, 0.1)]
    rows += [bag(1, 1.0, 0.05), bag(2, 1.0, 0.08)]
    runs = [
        _run("split", "split", 0.88, positions="valid", taps=(1,)),
        _run("ladder", "ladder", 0.875),
        _run("ladder-noise", "ladder", 0.874, noise=1.0),
        _run("ladder-top", "ladder", 0.80, taps=(2,)),
    ]
    m = mitigations({"rows": rows, "accuracy": runs})
    by = {t["name"]: t for t in m["runs"]}
    assert m["undefended_recovery"] == 0.9 and m["bar"] == pytest.approx(0.09)
    assert by["split"]["exposure"]["recovery"] == 0.9  # its one tapped layer
    assert by["ladder"]["exposure"]["recovery"] == 0.2  # the worst of its layers
    assert not by["ladder"]["meets_bar"]  # 0.2 > 0.09
    assert by["ladder-noise"]["meets_bar"]  # 0.08 <= 0.09, 0.6 points
    assert not by["ladder-top"]["meets_bar"]  # 0.1 recall, and 8 points
    assert by["ladder-noise"]["cost_vs_learner_points"] == pytest.approx(0.1)
    assert m["recommended"] == "ladder-noise" and m["bar_met"]
