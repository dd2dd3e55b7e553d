"""MobiLLM: server-assisted side-tuning of frozen language models.

A device runs a frozen backbone forward only and streams quantized activations; a server
trains a small side network on them; the device then runs inference alone::

    import mobillm

    device = mobillm.Device("smollm2-135m")
    device.train(mobillm.DataConfig(preset="sst2", max_train_samples=400))
    print(device.evaluate()["accuracy"])

``Device`` and ``Server`` (or ``ServerProcess``) are the whole API; the config dataclasses
below tune them. The ``mobillm`` command is a thin layer over the same objects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use: `import mobillm` stays light
    from mobillm.api import ConnectConfig, Device, LearnerConfig, Server, ServerProcess
    from mobillm.backbone import BackboneConfig
    from mobillm.codec import CodecConfig
    from mobillm.data import DataConfig
    from mobillm.device.runtime import DeviceConfig
    from mobillm.errors import ConfigError, MobiLLMError
    from mobillm.server.sessions import ServerConfig
    from mobillm.transport.link import LinkConfig
    from mobillm.transport.messages import TrainConfig
    from mobillm.transport.tls import TlsServerConfig

__version__ = "0.1.0"

_PUBLIC = {
    "BackboneConfig": "mobillm.backbone",
    "CodecConfig": "mobillm.codec",
    "ConfigError": "mobillm.errors",
    "ConnectConfig": "mobillm.api",
    "DataConfig": "mobillm.data",
    "Device": "mobillm.api",
    "DeviceConfig": "mobillm.device.runtime",
    "LearnerConfig": "mobillm.api",
    "LinkConfig": "mobillm.transport.link",
    "MobiLLMError": "mobillm.errors",
    "Server": "mobillm.api",
    "ServerConfig": "mobillm.server.sessions",
    "ServerProcess": "mobillm.api",
    "TlsServerConfig": "mobillm.transport.tls",
    "TrainConfig": "mobillm.transport.messages",
}

__all__ = [  # the same names as _PUBLIC (a test checks it), literal for static tools
    "BackboneConfig",
    "CodecConfig",
    "ConfigError",
    "ConnectConfig",
    "DataConfig",
    "Device",
    "DeviceConfig",
    "LearnerConfig",
    "LinkConfig",
    "MobiLLMError",
    "Server",
    "ServerConfig",
    "ServerProcess",
    "TlsServerConfig",
    "TrainConfig",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mobillm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
