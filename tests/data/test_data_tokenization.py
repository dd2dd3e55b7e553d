"""Tokenisation: classification template and truncation, causal-LM prompt/response layout."""

from __future__ import annotations

import pytest

from mobillm.data import (
    ClassificationExample,
    DataConfig,
    DataError,
    LMExample,
    pad_token_id,
    tokenize_examples,
)

TEMPLATE = "Review: {text}\nSentiment:"
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)


def ids(tok, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def test_classification_untruncated_matches_plain_tokenisation(tiny_tokenizer):
    cfg = DataConfig(template=TEMPLATE, max_length=64)
    ds = tokenize_examples([ClassificationExample("a good movie", 1)], tiny_tokenizer, cfg)
    assert ds.input_ids == [ids(tiny_tokenizer, "Review: a good movie\nSentiment:", True)]
    assert ds.labels == [1] and ds.truncated == 0


@pytest.mark.parametrize("max_length", [12, 20, 33])
def test_classification_truncates_text_not_cue(tiny_tokenizer, max_length):
    cfg = DataConfig(template=TEMPLATE, max_length=max_length)
    ds = tokenize_examples([ClassificationExample(LONG, 0)], tiny_tokenizer, cfg)
    (row,) = ds.input_ids
    assert len(row) <= max_length
    assert len(row) >= max_length - 2  # cut on token boundaries, not far short
    text = tiny_tokenizer.decode(row, skip_special_tokens=True)
    assert text.startswith("Review: the quick")
    assert text.endswith("\nSentiment:")
    assert ds.truncated == 1
    if tiny_tokenizer.bos_token_id is not None:
        assert row[0] == tiny_tokenizer.bos_token_id


def test_preset_template_applies_to_tokenisation(tiny_tokenizer):
    cfg = DataConfig(preset="sst2", train_path="unused.tsv")
    ds = tokenize_examples([ClassificationExample("ok", 1)], tiny_tokenizer, cfg)
    assert tiny_tokenizer.decode(ds.input_ids[0], skip_special_tokens=True) == (
        "Review: ok\nSentiment:"
    )


def test_template_longer_than_max_length(tiny_tokenizer):
    cfg = DataConfig(template="Review: {text}\nSentiment:", max_length=4)
    with pytest.raises(DataError, match="max_length=4"):
        tokenize_examples([ClassificationExample("x", 0)], tiny_tokenizer, cfg)


def test_wrong_example_type_for_task(tiny_tokenizer):
    with pytest.raises(DataError, match="LMExample"):
        tokenize_examples(
            [ClassificationExample("x", 0)], tiny_tokenizer, DataConfig(task="causal_lm")
        )


def test_causal_lm_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    cfg = DataConfig(task="causal_lm", max_length=64)
    ds = tokenize_examples([LMExample("what is two plus two?", "four")], tok, cfg)
    prompt = ids(tok, "what is two plus two?\n", True)
    assert ds.input_ids == [[*prompt, *ids(tok, "four"), tok.eos_token_id]]
    assert ds.response_starts == [len(prompt)]


def test_causal_lm_plain_text_has_only_special_prefix(tiny_tokenizer):
    tok = tiny_tokenizer
    ds = tokenize_examples([LMExample("", "the lazy dog")], tok, DataConfig(task="causal_lm"))
    prefix = [] if tok.bos_token_id is None else [tok.bos_token_id]
    assert ds.input_ids == [[*prefix, *ids(tok, "the lazy dog"), tok.eos_token_id]]
    assert ds.response_starts == [len(prefix)]


def test_causal_lm_truncation_keeps_prompt_and_drops_hopeless(tiny_tokenizer):
    tok = tiny_tokenizer
    cfg = DataConfig(task="causal_lm", max_length=10)
    examples = [LMExample("Q", LONG), LMExample(LONG, "answer")]
    ds = tokenize_examples(examples, tok, cfg)
    assert len(ds) == 1 and ds.dropped == 1 and ds.truncated == 2
    (row,) = ds.input_ids
    start = ds.response_starts[0]
    assert len(row) == 10
    assert row[:start] == ids(tok, "Q\n", True)
    assert row[start:] == ids(tok, LONG)[: 10 - start]  # the response tail (and EOS) is cut


def test_pad_id_falls_back_to_eos(bos_tokenizer, plain_tokenizer):
    assert pad_token_id(bos_tokenizer) == bos_tokenizer.pad_token_id == 0
    assert plain_tokenizer.pad_token_id is None
    assert pad_token_id(plain_tokenizer) == plain_tokenizer.eos_token_id
