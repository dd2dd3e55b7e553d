"""Where each model family keeps its decoder layers and its frozen output head.

We never fork a Hugging Face model file: a family is only a description of where things are,
so the backbone can hook its layers and export its head for the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from mobillm.errors import MobiLLMError
from mobillm.side.head import HeadSpec


class UnsupportedModelError(MobiLLMError):
    """The model's architecture is not one MobiLLM knows how to tap."""


@dataclasses.dataclass(frozen=True)
class Family:
    """Accessors for one family: ``base(model)`` runs embeddings + layers without the LM head."""

    base: Callable[[nn.Module], nn.Module]
    layers: Callable[[nn.Module], nn.ModuleList]
    final_norm: Callable[[nn.Module], nn.Module | None]
    project_out: Callable[[nn.Module], nn.Module | None] = lambda m: None


_LLAMA_LIKE = Family(
    base=lambda m: m.model,
    layers=lambda m: m.model.layers,
    final_norm=lambda m: m.model.norm,
)

FAMILIES: dict[str, Family] = {
    **dict.fromkeys(
        ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo"),
        _LLAMA_LIKE,
    ),
    "gpt2": Family(
        base=lambda m: m.transformer,
        layers=lambda m: m.transformer.h,
        final_norm=lambda m: m.transformer.ln_f,
    ),
    "opt": Family(
        base=lambda m: m.model.decoder,
        layers=lambda m: m.model.decoder.layers,
        final_norm=lambda m: m.model.decoder.final_layer_norm,
        project_out=lambda m: m.model.decoder.project_out,
    ),
}


def family_of(model: nn.Module) -> Family:
    arch = model.config.model_type
    if arch not in FAMILIES:
        raise UnsupportedModelError(
            f"model architecture {arch!r} is not supported; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[arch]


def _norm_spec(norm: nn.Module | None) -> tuple[str, float, bool]:
    if norm is None:
        return "none", 1e-5, False
    name = type(norm).__name__
    if isinstance(norm, nn.LayerNorm):
        return "layer", float(norm.eps), norm.bias is not None
    if name == "OlmoLayerNorm":  # a layer norm without weight or bias, eps fixed at 1e-5
        return "layer", 1e-5, False
    if "RMSNorm" in name:
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        # Gemma-style norms store w and scale by (1 + w); they initialise w at zero.
        return ("rms_offset" if "Gemma" in name else "rms"), eps, False
    raise UnsupportedModelError(f"unknown final norm type {name}")


def export_head(
    model: nn.Module, rows: list[int] | None = None
) -> tuple[HeadSpec, dict[str, torch.Tensor]]:
    """The frozen head the server needs, as a spec plus float32 tensors.

    ``rows``: LM-head rows to keep (token ids, e.g. a classifier's verbalizers); ``None`` keeps
    the whole vocabulary, ``[]`` none (a randomly initialised classifier needs only the norm).
    """
    fam = family_of(model)
    norm = fam.final_norm(model)
    kind, eps, has_bias = _norm_spec(norm)
    proj = fam.project_out(model)
    lm = model.get_output_embeddings()
    weight = lm.weight.detach()
    lm_bias = getattr(lm, "bias", None)
    if rows is not None:
        idx = torch.tensor(rows, dtype=torch.long)
        weight = weight[idx]
        lm_bias = lm_bias[idx] if lm_bias is not None else None
    hidden = (
        model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    )
    softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
    spec = HeadSpec(
        hidden_size=hidden,
        out_size=weight.shape[1] if weight.numel() else (proj.out_features if proj else hidden),
        vocab_rows=weight.shape[0],
        norm=kind,
        norm_eps=eps,
        has_norm_bias=has_bias,
        has_proj=proj is not None,
        has_lm_bias=lm_bias is not None,
        softcap=softcap,
    )
    # No copies: float() is a no-op on fp32 weights, so exporting the whole head of a big
    # vocabulary costs no device memory (callers treat these tensors as read-only).
    tensors: dict[str, torch.Tensor] = {}
    if norm is not None:
        w = getattr(norm, "weight", None)  # OLMo's has none: a weight of ones is the same
        tensors["norm.weight"] = w.detach().float() if w is not None else torch.ones(hidden)
        if has_bias:
            tensors["norm.bias"] = norm.bias.detach().float()
    if proj is not None:
        tensors["proj.weight"] = proj.weight.detach().float()
    if spec.vocab_rows:
        tensors["lm_head.weight"] = weight.float()
        if lm_bias is not None:
            tensors["lm_head.bias"] = lm_bias.detach().float()
    return spec, tensors
