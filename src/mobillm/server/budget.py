"""What a session will cost the server, estimated from what the client declares.

Every size in a session spec or a step header is the client's choice: the side network's width
and adapter ratio, the backbone's hidden size, rows per step and per sample. The server prices
them here *before* it allocates anything and refuses what is over its budget, so a 1 KB spec or
a 46-byte step header can never make it allocate gigabytes.

Side networks are priced exactly: the learner is built on PyTorch's ``meta`` device (shapes, no
storage) and its parameters counted. Step memory is an upper-bound model of what the forward
keeps for the backward pass, linear in rows, plus the attention matrices, quadratic in the rows
of a sample (the mixer attends over all rows of a step, the split layers over each sample).
"""

from __future__ import annotations

import dataclasses
import json

import torch

from mobillm.side.head import FrozenHead
from mobillm.side.learner import build_learner
from mobillm.side.split import build_layers
from mobillm.side.transformer import KEEP
from mobillm.transport.messages import RemoteError, SessionSpec

# fp32 weight + gradient + AdamW's two moments
BYTES_PER_TRAINABLE = 16
BYTES_PER_FROZEN = 4
# Sizes no real backbone comes near; past them even a meta build (whose time grows with the
# number of modules) is refused.
MAX_HIDDEN = 1 << 15
MAX_LAYERS = 1024
MAX_LAYERS_CONFIG_CHARS = 1 << 16
# safetensors header (names, shapes, offsets) beside the tensor bytes of an upload
UPLOAD_SLACK = 1 << 20


def _over(what: str, need: int, limit: int) -> RemoteError:
    return RemoteError(
        "RESOURCE_EXHAUSTED",
        f"{what} would take {need >> 20} MiB; this server allows {limit >> 20} MiB",
    )


def _meta_head(spec: SessionSpec) -> FrozenHead:
    with torch.device("meta"):
        tensors = {k: torch.empty(s) for k, s in spec.head.tensor_shapes().items()}
        return FrozenHead(spec.head, tensors)


@dataclasses.dataclass(frozen=True)
class Price:
    """``side_bytes``: the learner with its optimizer state; ``upload_bytes``: the most its
    head upload can take (fp32 tensors plus room for the safetensors header)."""

    side_bytes: int
    upload_bytes: int


def price(spec: SessionSpec) -> Price:
    """What the session's learner costs: trainable parameters with their optimizer state,
    frozen head and (split mode) frozen top layers, counted on a build with no storage."""
    side = spec.side
    if max(side.hidden_size, spec.head.out_size) > MAX_HIDDEN:
        raise RemoteError("RESOURCE_EXHAUSTED", f"hidden size over {MAX_HIDDEN} is not served")
    if max(side.num_taps, side.split_layers) > MAX_LAYERS:
        raise RemoteError("RESOURCE_EXHAUSTED", f"more than {MAX_LAYERS} layers are not served")
    if len(side.layers_config) > MAX_LAYERS_CONFIG_CHARS:
        raise RemoteError("RESOURCE_EXHAUSTED", "layers_config is over 64 KiB")
    try:
        head = _meta_head(spec)
        layers = None
        if side.kind != "ladder":  # split layers run at the backbone's width, blocks at r
            stack, _, config = build_layers(side.layers_config)
            width = side.hidden_size if side.kind == "split" else side.width
            if int(getattr(config, "hidden_size", -1)) != width:
                raise ValueError(f"layers_config's hidden_size differs from {width}")
            layers = {f"layers.{k}": v for k, v in stack.state_dict().items()}
            if side.kind == "transformer":
                layers[KEEP] = torch.empty(side.width, dtype=torch.long, device="meta")
        with torch.device("meta"):
            private = spec.private_labels  # the device keeps the classifier
            net = build_learner(side, head, layers, cast=False, with_classifier=not private)
    except RemoteError:
        raise
    except Exception as e:  # anything the client's numbers make the build trip over
        raise RemoteError("INVALID_ARGUMENT", f"cannot build the side network: {e}") from None
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    frozen += sum(b.numel() for b in net.buffers())
    uploaded = sum(t.numel() for t in head.tensors().values())
    uploaded += sum(t.numel() for t in (layers or {}).values())
    return Price(
        trainable * BYTES_PER_TRAINABLE + frozen * BYTES_PER_FROZEN,
        uploaded * BYTES_PER_FROZEN + UPLOAD_SLACK,
    )


def check_side(spec: SessionSpec, limit: int) -> Price:
    """The session's ``price``; RESOURCE_EXHAUSTED when its learner is over ``limit``."""
    p = price(spec)
    if p.side_bytes > limit:
        raise _over("the side network with its optimizer state", p.side_bytes, limit)
    return p


def step_bytes(spec: SessionSpec, rows_per_sample: torch.Tensor) -> int:
    """An upper bound on the memory one step of this layout takes on the server."""
    side, n = spec.side, int(rows_per_sample.sum())
    d, w = side.hidden_size, side.width
    counts = rows_per_sample.long()
    # decoded layer + one tap's frame parts (fp32), live at once
    total = 2 * 4 * n * d
    if side.kind == "split":
        cfg = json.loads(side.layers_config)
        inner = int(cfg.get("intermediate_size", 4 * d))
        heads = int(cfg.get("num_attention_heads", 1))
        b, t = counts.numel(), int(counts.max())
        # per layer: ~12 hidden-wide and 3 MLP-wide activations per padded row kept for backward,
        # plus the (B, heads, T, T) scores and the (B, 1, T, T) mask
        total += side.split_layers * 4 * (b * t * (12 * d + 3 * inner) + 2 * b * heads * t * t)
        total += 4 * b * t * t
    elif side.kind == "transformer":
        cfg = json.loads(side.layers_config)
        inner = int(cfg.get("intermediate_size", 4 * w))
        heads = int(cfg.get("num_attention_heads", 1))
        attn = heads * int(cfg.get("head_dim", 1))
        b, t = counts.numel(), int(counts.max())
        # per tap: the normalised tap and the ladder's rows, then a narrow decoder layer's
        # activations per padded row (as for split layers), scores and mask
        total += (
            side.num_taps
            * 4
            * (
                n * (2 * d + 4 * w)
                + b * t * (12 * w + 4 * attn + 3 * inner)
                + 2 * b * heads * t * t
            )
        )
        total += 4 * b * t * t
    else:
        inner = max(1, round(w * side.adapter_ratio))
        total += side.num_taps * 4 * n * (2 * d + 8 * w + 2 * inner)
        if side.mixer == "attention":
            # rows x rows mask and, per tap, scores and softmax kept for backward
            total += n * n + side.num_taps * 2 * 4 * side.mixer_heads * n * n
    loss_rows = n if side.task == "causal_lm" else counts.numel()
    out = spec.head.vocab_rows if side.task == "causal_lm" else side.num_labels
    total += 3 * 4 * loss_rows * (out + spec.head.out_size)
    return total


def check_step(spec: SessionSpec, rows_per_sample: torch.Tensor, limit: int) -> None:
    """RESOURCE_EXHAUSTED when a step of this layout would take more than ``limit`` bytes."""
    need = step_bytes(spec, rows_per_sample)
    if need > limit:
        raise _over(f"a step of {int(rows_per_sample.sum())} rows", need, limit)
