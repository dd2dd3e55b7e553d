"""Split learner: frozen copies of the backbone's top K layers with LoRA, on the server.

The device runs layers ``1..L-K`` forward only and streams the boundary layer's hidden states
for every real token of a sample (rows grouped by sample, in position order). This learner
runs the top ``K`` decoder layers on them, with LoRA on the attention's query and value
projections, then the frozen head, so back-propagation goes through ``K`` layers only and the
device does ``(L-K)/L`` of the forward work and holds only those layers' weights.

The layers are the backbone's own (uploaded once by the device, cached by content hash); LoRA's
``B`` starts at zero, so an untrained split learner reproduces the frozen backbone's logits.
On the device the same class wraps the backbone's own top layers for inference alone.

Supported families feed hidden states straight into their decoder layers with rotary positions
(Llama, Qwen2, Qwen3, Mistral); the others embed or rescale inside the model and are refused.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.side.model import task_classifier

SPLIT_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
LORA_TARGETS = ("q_proj", "v_proj")
# Keys of the backbone's config that the K-layer stack must not inherit as they are.
_LAYER_COUNT_KEYS = ("num_hidden_layers", "layer_types", "max_window_layers")


def top_layers_config(config: Any, k: int) -> str:
    """The backbone's config as JSON, cut to its top ``k`` layers (what the server builds)."""
    d = config.to_dict()
    n = int(d["num_hidden_layers"])
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][n - k :]
    d["num_hidden_layers"] = k
    return json.dumps(d, sort_keys=True, default=str)


def build_layers(config_json: str) -> tuple[nn.ModuleList, nn.Module, Any]:
    """Empty (meta) decoder layers and a real rotary module for a ``top_layers_config`` JSON."""
    from transformers import AutoConfig, AutoModel

    d = json.loads(config_json)
    kind = d.pop("model_type", None)
    if kind not in SPLIT_FAMILIES:
        raise ValueError(f"split mode supports {list(SPLIT_FAMILIES)}, not {kind!r}")
    config = AutoConfig.for_model(kind, **d)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        base = AutoModel.from_config(config)
    rotary = type(base.rotary_emb)(config=config)  # its buffers are computed, not loaded
    return base.layers, rotary, config


class TokenLayout:
    """Each sample's rows (its real tokens, in order) as a padded ``(B, T, width)`` batch, with
    what a decoder layer needs to run causal attention over it: positions, rotary embeddings
    and a mask under which a token sees its sample's earlier real tokens (padding sees only
    itself, so no row is all masked)."""

    def __init__(
        self,
        rows_per_sample: torch.Tensor,
        rotary: nn.Module,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        counts = rows_per_sample.long().to(device)
        b, t = counts.numel(), int(counts.max())
        self.valid = torch.arange(t, device=device).unsqueeze(0) < counts.unsqueeze(1)  # (B, T)
        self.pos = torch.arange(t, device=device).unsqueeze(0).expand(b, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        allowed = causal.unsqueeze(0) & self.valid.unsqueeze(1)  # (B, T, T): past real tokens
        allowed |= torch.eye(t, dtype=torch.bool, device=device)  # padding sees itself
        self.mask = torch.zeros(b, 1, t, t, dtype=dtype, device=device)
        self.mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
        self.rotary = rotary
        self._pe: tuple[torch.Tensor, torch.Tensor] | None = None

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """``(rows, w) -> (B, T, w)``, zeros where a sample has no token."""
        b, t = self.valid.shape
        x = rows.new_zeros(b, t, rows.shape[-1])
        return x.index_put((self.valid,), rows)

    def run(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One decoder layer over the padded batch."""
        if self._pe is None:  # one head size for all layers of a stack: computed once
            self._pe = self.rotary(x, self.pos)
        out = layer(
            x, attention_mask=self.mask, position_ids=self.pos, position_embeddings=self._pe
        )
        return out[0] if isinstance(out, tuple) else out


def check_shapes(
    want: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], what: str
) -> None:
    """ValueError unless ``tensors`` has exactly the names and shapes in ``want``."""
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(
            f"{what} do not match the config: missing {missing[:3]}, extra {extra[:3]}, "
            f"wrong shapes {bad[:3]}"
        )


class TokenLearner(nn.Module):
    """What the learners that run attention over every token share (split layers, the side
    transformer): a sample's classifier reads its last row, nothing draws random numbers while
    training, and what trains is what the device downloads."""

    cfg: SideConfig
    frozen: FrozenHead
    classifier: nn.Linear | None

    def seed_dropout(self, seed: int) -> None:
        """No dropout (LoRA's is off too): nothing to seed."""

    # The learner interface the trainer and LocalModel share with SideNetwork.
    def start(self) -> None:
        return None

    def logits(
        self,
        feats: torch.Tensor,
        pool_rows: torch.Tensor | None = None,
        row_sample: torch.Tensor | None = None,
        num_samples: int = 0,
    ) -> torch.Tensor:
        """Classification: the pool rows' logits (B, labels); causal LM: (rows, vocab)."""
        if self.cfg.task != "classification":
            return self.frozen.logits_from_features(feats)
        if self.classifier is None:
            raise ValueError("this learner's classifier is kept by the device")
        return self.classifier(self.pooled(feats, pool_rows))

    def pooled(
        self,
        feats: torch.Tensor,
        pool_rows: torch.Tensor | None = None,
        row_sample: torch.Tensor | None = None,
        num_samples: int = 0,
    ) -> torch.Tensor:
        """The features the classifier reads: the pool rows' ``(B, out_size)``."""
        if pool_rows is None:
            raise ValueError("classification needs pool_rows")
        return feats[pool_rows]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained weights: what the device downloads (LoRA or the side transformer, and
        the classifier; a few MB)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class SplitLearner(TokenLearner):
    """Top-K frozen decoder layers + LoRA + the frozen head: ``(rows, d) -> (rows, out)``.

    ``layers`` are the K decoder layers (the backbone's own on the device, rebuilt from the
    upload on the server); ``rotary`` computes their rotary position embeddings.
    """

    def __init__(
        self,
        cfg: SideConfig,
        head: FrozenHead,
        layers: nn.ModuleList,
        rotary: nn.Module,
        with_classifier: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != cfg.split_layers:
            raise ValueError(f"split learner needs {cfg.split_layers} layers, got {len(layers)}")
        self.cfg = cfg
        self.frozen = head
        self.rotary = rotary
        self.stack = nn.Module()
        self.stack.layers = layers
        for p in self.stack.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,  # dropout would draw from the process-wide generator
            target_modules=list(LORA_TARGETS),
        )
        inject_adapter_in_model(lora, self.stack)
        for name, p in self.stack.named_parameters():
            p.requires_grad_("lora_" in name)
        self.classifier = task_classifier(cfg, head) if with_classifier else None

    @classmethod
    def from_tensors(
        cls,
        cfg: SideConfig,
        head: FrozenHead,
        tensors: dict[str, torch.Tensor],
        cast: bool = True,
        with_classifier: bool = True,
    ) -> SplitLearner:
        """Build the layers from ``layers.*`` tensors (shapes checked), as float32 if ``cast``.

        The modules are new, the tensors are taken as they are (``assign``): on the device the
        learner shares the backbone's own weight storage instead of copying it.
        """
        layers, rotary, _ = build_layers(cfg.layers_config)
        want = {f"layers.{k}": tuple(v.shape) for k, v in layers.state_dict().items()}
        check_shapes(want, tensors, "uploaded layers")
        state = {k.removeprefix("layers."): v.float() if cast else v for k, v in tensors.items()}
        layers.load_state_dict(state, assign=True)
        return cls(cfg, head, layers, rotary, with_classifier)

    def step(
        self,
        state: Any,
        tap: int,
        h: torch.Tensor,
        rows_per_sample: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the boundary layer's rows ``(rows, d)``; the layers run in ``finish``."""
        if tap != 0 or rows_per_sample is None:
            raise ValueError("a split learner reads one tapped layer and needs rows_per_sample")
        return h, rows_per_sample

    def finish(self, state: tuple[torch.Tensor, torch.Tensor], h_last: Any = None) -> torch.Tensor:
        """Run the top K layers over each sample's tokens: features ``(rows, out_size)``."""
        h, rows_per_sample = state
        dtype = next(self.stack.parameters()).dtype
        tokens = TokenLayout(rows_per_sample, self.rotary, dtype, h.device)
        x = tokens.pad(h.to(dtype))
        for layer in self.stack.layers:
            x = tokens.run(layer, x)
        return self.frozen.features(x[tokens.valid])
