"""The public API: ``Device`` and ``Server``, their process and config companions."""

from mobillm.api.device import ConnectConfig, Device, LearnerConfig
from mobillm.api.server import Server, ServerProcess

__all__ = ["ConnectConfig", "Device", "LearnerConfig", "Server", "ServerProcess"]
