"""Errors raised by the activation codec; decode never raises anything outside CodecError."""

from mobillm.errors import MobiLLMError


class CodecError(MobiLLMError, ValueError):
    """An activation tensor could not be encoded, or a frame could not be decoded."""


class TruncatedFrameError(CodecError):
    """The buffer is shorter than its header (or the fixed header) says it must be."""


class MalformedFrameError(CodecError):
    """The frame is inconsistent: bad magic or version, trailing bytes, impossible values."""


class FrameTooLargeError(CodecError):
    """The frame, actual or declared by its header, is larger than ``max_frame_bytes``."""


class UnknownSchemeError(CodecError):
    """The scheme name or frame scheme id is not in the registry."""
