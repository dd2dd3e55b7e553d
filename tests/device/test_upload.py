"""The frozen head upload streams from the weights: the server gets what ``save`` would have
written, and the device never holds the whole payload (a split learner's top layers)."""

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from transformers import LlamaConfig, LlamaForCausalLM

from mobillm.backbone import Backbone, BackboneConfig
from mobillm.device.runtime import DeviceTrainer, build_side_config
from mobillm.server.inprocess import InProcessTransport
from mobillm.server.sessions import ServerConfig, SessionManager
from mobillm.transport import serde
from mobillm.transport.messages import HeadBytes, SessionInfo, SessionSpec


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Recorder:
    """Just enough of a transport to take an upload: the chunks' hash, sizes, and the
    process's RSS as each chunk goes out."""

    def __init__(self, chunk: int) -> None:
        self.chunk, self.sizes, self.rss = chunk, [], []
        self.digest = hashlib.sha256()

    def open(self, spec: SessionSpec) -> SessionInfo:
        return SessionInfo("s", "t", need_head=True, max_chunk_bytes=self.chunk)

    def set_responder(self, responder) -> None:  # private labels: no step is ever answered
        pass

    def upload_head(self, data: HeadBytes) -> None:
        for part in serde.head_parts("s", data, self.chunk):
            self.digest.update(part.data)
            self.sizes.append(len(part.data))
            self.rss.append(_rss_mb())


def _write_model(folder: Path, tokenizer) -> None:
    """A 4-layer Llama whose top 3 layers are 81 MiB of float32: far above RSS noise."""
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048,
        num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=12,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_split_head_upload_streams_with_bounded_memory(tmp_path, bos_tokenizer):
    _write_model(tmp_path, bos_tokenizer)
    bb = Backbone.load(BackboneConfig(source=str(tmp_path)))
    side = build_side_config(bb, "classification", 2, ("good", "bad"), kind="split",
                             split_layers=3)  # fmt: skip
    transport = Recorder(chunk=1 << 20)
    tr = DeviceTrainer(bb, side, transport)
    _, head = tr._session_spec(10)  # what open() uploads, to compare with afterwards
    head_mb = sum(t.numel() * t.element_size() for t in head.values()) / 2**20
    before = _rss_mb()
    tr.open(10)
    grew = max(transport.rss) - before
    assert head_mb > 64
    assert grew < head_mb / 4, (grew, head_mb)  # a whole blob in memory: over head_mb
    assert all(n == 1 << 20 for n in transport.sizes[:-1])
    whole = save({k: v.contiguous() for k, v in head.items()})
    assert transport.digest.hexdigest() == hashlib.sha256(whole).hexdigest()


def test_split_head_streamed_in_small_chunks_starts_the_session(tmp_path, make_tiny_backbone):
    """In process, a head of many chunks: the server parses it and its hash checks out."""
    bb = make_tiny_backbone("llama", layers=4)
    side = build_side_config(bb, "classification", 2, ("good", "bad"), kind="split",
                             split_layers=2)  # fmt: skip
    mgr = SessionManager(ServerConfig(workdir=str(tmp_path / "server"), max_chunk_bytes=4096))
    transport = InProcessTransport(mgr)
    tr = DeviceTrainer(bb, side, transport)
    info = tr.open(10)
    assert info.need_head and info.max_chunk_bytes == 4096
    assert transport.bytes_sent > 4 * 4096  # many chunks
    assert mgr._sessions[info.session_id].trainer is not None  # parsed, hash checked
    transport.close()
