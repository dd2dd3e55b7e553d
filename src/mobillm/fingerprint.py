"""Identity of a frozen backbone, shared by the device, the server and saved side networks."""

from __future__ import annotations

import dataclasses

from mobillm.config import Config, check


@dataclasses.dataclass(frozen=True)
class BackboneFingerprint(Config):
    """What a side network depends on: shape facts plus hashes of the config and head weights.

    ``config_sha256`` hashes the model config (minus volatile keys such as the transformers
    version or the weight dtype); ``head_sha256`` hashes the final norm and LM head weights.
    Two backbones with equal fingerprints produce interchangeable hidden states.
    """

    architecture: str = ""
    hidden_size: int = 0
    num_layers: int = 0
    vocab_size: int = 0
    config_sha256: str = ""
    head_sha256: str = ""

    def validate(self) -> None:
        check(bool(self.architecture), "BackboneFingerprint.architecture is empty")
        check(self.hidden_size > 0, "BackboneFingerprint.hidden_size must be > 0")
        check(self.num_layers > 0, "BackboneFingerprint.num_layers must be > 0")
        check(self.vocab_size > 0, "BackboneFingerprint.vocab_size must be > 0")
        for name in ("config_sha256", "head_sha256"):
            v = getattr(self, name)
            check(
                len(v) == 64 and all(c in "0123456789abcdef" for c in v),
                f"BackboneFingerprint.{name} must be a sha256 hex digest, got {v!r}",
            )

    def mismatch(self, other: BackboneFingerprint) -> str:
        """Say how ``other`` differs from this one ("" when equal)."""
        diffs = [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        return "; ".join(diffs)

    def short(self) -> str:
        return (
            f"{self.architecture} d={self.hidden_size} L={self.num_layers} "
            f"cfg={self.config_sha256[:12]} head={self.head_sha256[:12]}"
        )
