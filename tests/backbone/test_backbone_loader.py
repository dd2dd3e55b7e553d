"""Loading from folders, GGUF files and aliases, and the errors for everything else."""

import pytest
import torch
from tinymodels import tiny_model

from mobillm.backbone import Backbone, BackboneConfig, BackboneLoadError, resolve_source
from mobillm.errors import ConfigError


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(BackboneLoadError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "nope.gguf"))
    with pytest.raises(BackboneLoadError, match="model not found"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneLoadError, match=r"no config\.json"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(BackboneLoadError, match="neither"):
        resolve_source(str(tmp_path / "file.bin"))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ("hub", None)


def test_folder_round_trip(tmp_path, bos_tokenizer):
    model = tiny_model("qwen2", vocab=len(bos_tokenizer))
    model.save_pretrained(tmp_path)
    bos_tokenizer.save_pretrained(tmp_path)
    bb = Backbone.load(BackboneConfig(source=str(tmp_path)))
    assert bb.num_layers == 3 and not any(p.requires_grad for p in bb.model.parameters())
    ref = Backbone(model, bos_tokenizer, BackboneConfig(source="x"))
    assert bb.fingerprint == ref.fingerprint


def test_bad_dtype_is_config_error():
    with pytest.raises(ConfigError, match="dtype"):
        BackboneConfig(dtype="int3")


def test_unsupported_gguf_architecture(tmp_path, monkeypatch):
    """A well-formed GGUF of an architecture transformers cannot load is refused clearly."""
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("MOBILLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BackboneLoadError, match="cannot load GGUF"):
        Backbone.load(BackboneConfig(source=str(path)))
