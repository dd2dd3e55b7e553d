"""CodecConfig: which scheme encodes activations, its group size, and the frame size limit."""

from __future__ import annotations

from dataclasses import dataclass

from mobillm.codec.schemes import MAX_GROUP_SIZE, MIN_GROUP_SIZE, scheme_names, valid_group_size
from mobillm.config import Config, check

DEFAULT_MAX_FRAME_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CodecConfig(Config):
    """How activations are encoded for the wire.

    ``scheme`` is a registered scheme name (``fp16``, ``int8``, ``int4``, ``nf4``);
    ``group_size`` is the number of elements per quantization group along the last dim, used by
    int4 and nf4 only; ``max_frame_bytes`` caps a whole frame (header + payload) on both ends:
    ``encode`` refuses to build a larger one and ``decode`` refuses to read one.
    """

    scheme: str = "int8"
    group_size: int = 64
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES

    def validate(self) -> None:
        known = scheme_names()
        check(
            isinstance(self.scheme, str) and self.scheme in known,
            f"CodecConfig.scheme: unknown scheme {self.scheme!r}; known: {', '.join(known)}",
        )
        check(
            valid_group_size(self.group_size),
            f"CodecConfig.group_size: must be a power of two in [{MIN_GROUP_SIZE}, "
            f"{MAX_GROUP_SIZE}], got {self.group_size!r}",
        )
        check(
            isinstance(self.max_frame_bytes, int)
            and not isinstance(self.max_frame_bytes, bool)
            and self.max_frame_bytes > 0,
            f"CodecConfig.max_frame_bytes: must be a positive int, got {self.max_frame_bytes!r}",
        )
