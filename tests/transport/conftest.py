"""Fixtures for the gRPC tests: servers on loopback, certificates, a tiny learnable task."""

from __future__ import annotations

import dataclasses
import random

import pytest
from safetensors.torch import save

from mobillm.codec import CodecConfig
from mobillm.data import ClassificationExample, DataConfig, tokenize_examples
from mobillm.device.runtime import DeviceConfig, DeviceTrainer, build_session, build_side_config
from mobillm.server.grpc_server import GrpcServer
from mobillm.server.sessions import ServerConfig
from mobillm.transport.messages import TrainConfig
from mobillm.transport.tls import make_certs

HEADS = ["the quick fox", "lazy dog", "it 's a journey"]


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> dict[str, str]:
    """A CA, a server cert for localhost/127.0.0.1 and a client cert."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def start_server(tmp_path):
    """Factory: ``start_server(tls=None, port=0, **server_config_fields) -> GrpcServer``."""
    servers: list[GrpcServer] = []
    names = {f.name for f in dataclasses.fields(ServerConfig)}

    def start(tls=None, interceptors=(), port=0, metrics_port=None, **kw) -> GrpcServer:
        kw.setdefault("workdir", str(tmp_path / f"server{len(servers)}"))
        kw.setdefault("open_access", True)
        cfg = ServerConfig(**{k: v for k, v in kw.items() if k in names})
        server = GrpcServer(
            cfg, port=port, tls=tls, interceptors=interceptors, metrics_port=metrics_port
        )
        server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop(grace=0)


@pytest.fixture
def cls_data():
    """Factory: ``cls_data(tokenizer, n=64, seed=0) -> (TokenizedDataset, texts)``.

    The label is the last word ("good" or "bad"), so a side network learns it in a few steps.
    """

    def make(tok, n: int = 64, seed: int = 0):
        rnd = random.Random(seed)
        ex = []
        for _ in range(n):
            word = rnd.choice(["good", "bad"])
            ex.append(ClassificationExample(f"{rnd.choice(HEADS)} {word}", int(word == "good")))
        cfg = DataConfig(labels=("0", "1"), verbalizers=("bad", "good"), batch_size=16)
        return tokenize_examples(ex, tok, cfg), [e.text for e in ex]

    return make


@pytest.fixture
def device_trainer():
    """Factory: a ``DeviceTrainer`` for a deterministic classification run (no dropout)."""

    def make(bb, transport, epochs=2, lr=5e-3, window=2, seed=0, replay=True, private=False):
        side = build_side_config(bb, "classification", 2, ("bad", "good"), dropout=0.0)
        return DeviceTrainer(
            bb,
            side,
            transport,
            CodecConfig("int8"),
            TrainConfig(lr=lr, seed=seed),
            DeviceConfig(window=window, epochs=epochs, replay=replay, private_labels=private),
        )

    return make


@pytest.fixture
def session_spec():
    """Factory: ``session_spec(bb, **codec) -> (SessionSpec, head safetensors bytes)``."""

    def make(bb, scheme: str = "int8"):
        side = build_side_config(bb, "classification", 2, ("bad", "good"), dropout=0.0)
        spec, head = build_session(bb, side, CodecConfig(scheme), TrainConfig(total_steps=10))
        return spec, save({k: v.contiguous() for k, v in head.items()})

    return make
