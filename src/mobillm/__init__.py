"""MobiLLM: server-assisted side-tuning of frozen language models."""

__version__ = "0.1.0"
