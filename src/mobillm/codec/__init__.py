"""Activation codec: float tensors ``(rows, hidden)`` to self-describing byte frames and back.

``encode(x, cfg)`` quantizes along the last dim with the scheme named in ``CodecConfig``;
``decode(buf)`` reads the scheme from the frame header and returns float32 of the same shape,
raising only ``CodecError`` subclasses on malformed input. See ``frame`` for the wire layout and
``schemes`` for the payloads.
"""

from mobillm.codec.config import CodecConfig
from mobillm.codec.errors import (
    CodecError,
    FrameTooLargeError,
    MalformedFrameError,
    TruncatedFrameError,
    UnknownSchemeError,
)
from mobillm.codec.frame import FrameHeader, decode, encode, encoded_nbytes, read_header
from mobillm.codec.schemes import SCHEMES

__all__ = [
    "SCHEMES",
    "CodecConfig",
    "CodecError",
    "FrameHeader",
    "FrameTooLargeError",
    "MalformedFrameError",
    "TruncatedFrameError",
    "UnknownSchemeError",
    "decode",
    "encode",
    "encoded_nbytes",
    "read_header",
]
