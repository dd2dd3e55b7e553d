"""The backbone's frozen output pieces (final norm, projection, LM head) as a portable module.

The server must turn ``h_L + up(s_L)`` into logits exactly as the backbone would, but it never
imports the backbone's forward. The device therefore describes those pieces with a small
``HeadSpec`` (norm kind, eps, softcap) plus named tensors; this module rebuilds them for any
supported family.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mobillm.config import Config, check

NORM_KINDS = ("rms", "rms_offset", "layer", "none")


@dataclasses.dataclass(frozen=True)
class HeadSpec(Config):
    """Describes the frozen head: ``logits = softcap(lm_head(proj(norm(x))))``.

    ``norm``: "rms" (Llama/Qwen2: ``w * x/rms(x)``), "rms_offset" (Gemma: ``(1+w) * x/rms(x)``),
    "layer" (GPT-2/OPT LayerNorm), "none" (OPT with post-norm layers).
    ``vocab_rows``: rows of ``lm_head`` present; a classification session ships only a few.
    """

    hidden_size: int = 0
    out_size: int = 0
    vocab_rows: int = 0
    norm: str = "rms"
    norm_eps: float = 1e-6
    has_norm_bias: bool = False
    has_proj: bool = False
    has_lm_bias: bool = False
    softcap: float = 0.0

    def validate(self) -> None:
        check(self.hidden_size > 0, f"HeadSpec.hidden_size must be > 0, got {self.hidden_size}")
        check(self.out_size > 0, f"HeadSpec.out_size must be > 0, got {self.out_size}")
        check(self.vocab_rows >= 0, "HeadSpec.vocab_rows must be >= 0")
        check(self.norm in NORM_KINDS, f"HeadSpec.norm must be one of {NORM_KINDS}: {self.norm!r}")
        check(self.norm_eps > 0 or self.norm == "none", "HeadSpec.norm_eps must be > 0")
        check(self.softcap >= 0, "HeadSpec.softcap must be >= 0")
        check(
            self.has_proj or self.out_size == self.hidden_size,
            "HeadSpec.out_size differs from hidden_size without a projection",
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors a head of this spec must carry, by name."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.norm != "none":
            shapes["norm.weight"] = (self.hidden_size,)
            if self.has_norm_bias:
                shapes["norm.bias"] = (self.hidden_size,)
        if self.has_proj:
            shapes["proj.weight"] = (self.out_size, self.hidden_size)
        if self.vocab_rows:
            shapes["lm_head.weight"] = (self.vocab_rows, self.out_size)
            if self.has_lm_bias:
                shapes["lm_head.bias"] = (self.vocab_rows,)
        return shapes


class FrozenHead(nn.Module):
    """Frozen final norm (+ projection) (+ LM head): ``(rows, hidden) -> (rows, vocab_rows)``.

    Tensors live in buffers, not parameters, so an optimizer over the side network can never
    touch them and ``state_dict`` of the side network can leave them out.
    """

    def __init__(self, spec: HeadSpec, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        expected = spec.tensor_shapes()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(
                f"head tensors do not match the spec: missing {missing}, extra {extra}"
            )
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"head tensor {name} has shape {tuple(tensors[name].shape)}, spec says {shape}"
                )
        self.spec = spec
        for name in expected:
            # float() shares fp32 storage: on the device the head *is* the backbone's weights
            self.register_buffer(name.replace(".", "_"), tensors[name].detach().float())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n.replace(".", "_")) for n in self.spec.tensor_shapes()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and projection: ``(..., hidden) -> (..., out_size)``, in float32."""
        s = self.spec
        x = x.float()
        if s.norm in ("rms", "rms_offset"):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.norm_eps)
            w = self.norm_weight + 1.0 if s.norm == "rms_offset" else self.norm_weight
            x = x * w
        elif s.norm == "layer":
            bias = self.norm_bias if s.has_norm_bias else None
            x = nn.functional.layer_norm(x, (s.hidden_size,), self.norm_weight, bias, s.norm_eps)
        if s.has_proj:
            x = x @ self.proj_weight.T
        return x

    def logits_from_features(self, f: torch.Tensor) -> torch.Tensor:
        """LM head on normed features: ``(..., out_size) -> (..., vocab_rows)``."""
        if not self.spec.vocab_rows:
            raise ValueError("this frozen head carries no LM head rows")
        out = f @ self.lm_head_weight.T
        if self.spec.has_lm_bias:
            out = out + self.lm_head_bias
        if self.spec.softcap:
            out = torch.tanh(out / self.spec.softcap) * self.spec.softcap
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))


# Large tensors are hashed and uploaded in pieces of this many bytes, so the device can hand
# each piece's pages back before it reads the next: a 544 MB LM head is never resident at once.
PIECE_BYTES = 16 << 20


def tensor_pieces(t: torch.Tensor, piece_bytes: int = PIECE_BYTES) -> Iterator[torch.Tensor]:
    """``t`` flattened, as consecutive 1-D views of at most ``piece_bytes`` bytes (none if
    empty); views, not copies, unless ``t`` is not contiguous."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    step = max(1, piece_bytes // flat.element_size())
    for i in range(0, flat.numel(), step):
        yield flat[i : i + step]


def tensors_sha256(
    tensors: dict[str, torch.Tensor], done: Callable[[torch.Tensor], object] | None = None
) -> str:
    """Content hash of named tensors (names, shapes, float32 bytes), independent of dict order.

    Reads one piece (``tensor_pieces``) at a time and calls ``done`` with it once hashed, so
    the device can hand its pages back (``backbone.pages.releaser``) as it goes.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        for piece in tensor_pieces(t):
            h.update(piece.to(torch.float32).numpy())  # a no-op view on float32 weights
            if done is not None:
                done(piece)
    return h.hexdigest()
