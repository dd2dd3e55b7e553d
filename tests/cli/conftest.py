"""A tiny model saved as a folder, as a user's own model would be."""

import pytest
from tinymodels import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bos_tokenizer):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", vocab=len(bos_tokenizer), seed=0).save_pretrained(d)
    bos_tokenizer.save_pretrained(d)
    return str(d)
