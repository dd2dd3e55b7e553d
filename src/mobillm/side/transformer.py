"""Side transformer (Ladder Side-Tuning): reduced-width decoder layers over every real token.

For tapped layers ``h_1..h_K`` (each ``(rows, d)``: every real token of each sample, grouped
by sample, in order) the side transformer keeps a state of width ``r = d // reduction``::

    x_1 = down_1(norm_1(h_1))
    x_i = g_i * down_i(norm_i(h_i)) + (1 - g_i) * s_{i-1}      g_i = sigmoid(alpha_i / T)
    s_i = block_i(x_i)             one decoder layer of the backbone's family, r wide, causal
    out = h_K + up(s_K)            up starts at zero

so, unlike the ladder, it mixes tokens at every tapped layer, with the backbone's own kind of
attention (rotary positions, causal). Because ``up`` starts at zero, an untrained side
transformer reproduces the frozen backbone exactly.

**Initialisation from the backbone** (as Ladder Side-Tuning does): block ``i`` starts as the
backbone's tapped layer ``taps[i]`` structurally pruned to the side width, and ``down_i`` as
the selection of the residual dimensions kept, so the side stream starts as the backbone's own
residual stream (normalised) restricted to those dimensions. The device prunes (it holds the
weights) and uploads the pruned blocks once, like a split learner's layers.

The pruning rule is weight magnitude, data-free. Ladder Side-Tuning ranks by Fisher
information, which needs gradients through the backbone: exactly the work the device must not
do, and the server never sees the text. Magnitude keeps, per unit, what the layer's weights
amplify most:

- residual dimensions (one set for all blocks, as the stream they share must be one basis):
  the squared norms of the input projections' columns (scaled by their norm's weight) and of
  the output projections' rows, summed over the tapped layers;
- attention: whole heads (their rotary pairs and per-head norms stay intact), ``1/reduction``
  of the key/value heads and of the query heads (at least one), the key/value heads with the
  largest weights first and the query heads of those groups likewise;
- MLP: ``1/reduction`` of the neurons, by the product of their gate, up and down weight norms.

Supported families are the split learner's (``SPLIT_FAMILIES``: Llama, Qwen2, Qwen3, Mistral).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from mobillm.side.config import SideConfig
from mobillm.side.head import FrozenHead
from mobillm.side.model import task_classifier
from mobillm.side.split import TokenLayout, TokenLearner, build_layers, check_shapes

KEEP = "layers.keep"  # the kept residual dimensions, uploaded with the pruned blocks

# Which dimension of each layer tensor indexes what: "res" the residual stream, "q"/"kv" the
# query/key-value heads' rows, "ffn" the MLP neurons, None a dimension kept whole.
_DIMS: dict[str, tuple[str | None, ...]] = {
    "self_attn.q_proj.weight": ("q", "res"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "res"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "res"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("res", "q"),
    "self_attn.o_proj.bias": ("res",),
    "self_attn.q_norm.weight": (None,),
    "self_attn.k_norm.weight": (None,),
    "mlp.gate_proj.weight": ("ffn", "res"),
    "mlp.up_proj.weight": ("ffn", "res"),
    "mlp.down_proj.weight": ("res", "ffn"),
    "input_layernorm.weight": ("res",),
    "post_attention_layernorm.weight": ("res",),
}


def default_taps(num_layers: int) -> tuple[int, ...]:
    """Every second layer of the top two thirds, ending at the last: shallow layers are
    nearly the token embeddings (what an all-token frame must not give away for little
    accuracy), and half the layers halve the bytes sent."""
    return tuple(range(num_layers - 1, num_layers // 3 - 1, -2))[::-1]


def _shape(d: dict[str, Any]) -> tuple[int, int, int, int]:
    heads = int(d["num_attention_heads"])
    kv = int(d.get("num_key_value_heads") or heads)
    head_dim = int(d.get("head_dim") or int(d["hidden_size"]) // heads)
    return heads, kv, head_dim, int(d["intermediate_size"])


def side_layers_config(config: Any, taps: tuple[int, ...], reduction: int) -> str:
    """The side blocks' config as JSON: the backbone's, ``reduction`` times narrower, one
    layer per tap."""
    d = config.to_dict()
    heads, kv, head_dim, inner = _shape(d)
    keep_kv = max(1, kv // reduction)
    per_group = max(1, heads // reduction // keep_kv)
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = [d["layer_types"][t] for t in taps]
    d |= {
        "hidden_size": max(1, int(d["hidden_size"]) // reduction),
        "num_attention_heads": keep_kv * per_group,
        "num_key_value_heads": keep_kv,
        "head_dim": head_dim,
        "intermediate_size": max(1, inner // reduction),
        "num_hidden_layers": len(taps),
    }
    return json.dumps(d, sort_keys=True, default=str)


def prune_layers(
    config: Any, layers: list[dict[str, torch.Tensor]], reduction: int
) -> dict[str, torch.Tensor]:
    """The backbone's tapped layers (state dicts, in tap order) pruned to the side width:
    ``layers.{i}.*`` tensors for ``side_layers_config`` and ``layers.keep``; see the module
    docstring for the rule."""
    d = config.to_dict()
    heads, kv, hd, _ = _shape(d)
    side = json.loads(side_layers_config(config, tuple(range(len(layers))), reduction))
    width, keep_kv = side["hidden_size"], side["num_key_value_heads"]
    per_group = side["num_attention_heads"] // keep_kv
    group = heads // kv  # query heads per key/value head

    def sq(t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.float().pow(2).sum(dim)

    score = torch.zeros(int(d["hidden_size"]))
    for w in layers:
        g_in = w["input_layernorm.weight"].float().pow(2)
        g_post = w["post_attention_layernorm.weight"].float().pow(2)
        attn_in = sum(sq(w[f"self_attn.{p}_proj.weight"], 0) for p in "qkv")
        mlp_in = sq(w["mlp.gate_proj.weight"], 0) + sq(w["mlp.up_proj.weight"], 0)
        score += g_in * attn_in + g_post * mlp_in
        score += sq(w["self_attn.o_proj.weight"], 1) + sq(w["mlp.down_proj.weight"], 1)
    res = score.topk(width).indices.sort().values

    out: dict[str, torch.Tensor] = {}
    for i, w in enumerate(layers):
        q_heads = sq(w["self_attn.q_proj.weight"], 1) + sq(w["self_attn.o_proj.weight"], 0)
        q_heads = q_heads.view(heads, hd).sum(1)
        kv_heads = sq(w["self_attn.k_proj.weight"], 1) + sq(w["self_attn.v_proj.weight"], 1)
        kv_heads = kv_heads.view(kv, hd).sum(1) + q_heads.view(kv, group).sum(1)
        kept_kv = kv_heads.topk(keep_kv).indices.sort().values
        kept_q = torch.cat(
            [
                g * group + q_heads.view(kv, group)[g].topk(per_group).indices.sort().values
                for g in kept_kv.tolist()
            ]
        )
        neuron = (
            sq(w["mlp.gate_proj.weight"], 1).sqrt()
            * sq(w["mlp.up_proj.weight"], 1).sqrt()
            * sq(w["mlp.down_proj.weight"], 0).sqrt()
        )
        index = {
            "res": res,
            "q": _head_rows(kept_q, hd),
            "kv": _head_rows(kept_kv, hd),
            "ffn": neuron.topk(side["intermediate_size"]).indices.sort().values,
        }
        for name, t in w.items():
            if name not in _DIMS:
                raise ValueError(f"cannot prune layer tensor {name!r} (unknown to the rule)")
            for dim, what in enumerate(_DIMS[name]):
                if what is not None:
                    t = t.index_select(dim, index[what])
            out[f"layers.{i}.{name}"] = t.detach().float().contiguous()
    out[KEEP] = res
    return out


def _head_rows(kept: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (kept.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


class SideTransformer(TokenLearner):
    """Gated ladder of reduced-width decoder layers + the frozen head; see the module
    docstring. Same layer-by-layer interface as ``SideNetwork``."""

    def __init__(
        self,
        cfg: SideConfig,
        head: FrozenHead,
        blocks: nn.ModuleList,
        rotary: nn.Module,
        keep: torch.Tensor | None,
        with_classifier: bool = True,
    ) -> None:
        super().__init__()
        if len(blocks) != cfg.num_taps:
            raise ValueError(f"side transformer needs {cfg.num_taps} blocks, got {len(blocks)}")
        self.cfg = cfg
        r, d = cfg.width, cfg.hidden_size
        self.in_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg.num_taps))
        self.down = nn.ModuleList(nn.Linear(d, r) for _ in range(cfg.num_taps))
        if keep is not None and not keep.is_meta:
            with torch.no_grad():  # each down starts as the selection of the kept dimensions
                for down in self.down:
                    down.weight.zero_()
                    down.weight[torch.arange(r), keep.long()] = 1.0
                    down.bias.zero_()
        self.gates = nn.Parameter(torch.zeros(cfg.num_taps))
        self.blocks = blocks
        self.rotary = rotary
        self.up = nn.Linear(r, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.frozen = head
        self.classifier = task_classifier(cfg, head) if with_classifier else None

    @classmethod
    def build(
        cls,
        cfg: SideConfig,
        head: FrozenHead,
        tensors: dict[str, torch.Tensor] | None = None,
        with_classifier: bool = True,
    ) -> SideTransformer:
        """From the pruned blocks ``tensors`` (shapes checked; copied, as training changes
        them), or with freshly initialised blocks when None (weights about to be loaded)."""
        blocks, rotary, _ = build_layers(cfg.layers_config)
        want = {f"layers.{k}": tuple(v.shape) for k, v in blocks.state_dict().items()}
        want[KEEP] = (cfg.width,)
        if tensors is None:
            state = {k.removeprefix("layers."): _fresh(k, s) for k, s in want.items() if k != KEEP}
            keep = None
        else:
            check_shapes(want, tensors, "pruned blocks")
            keep = tensors[KEEP]
            if not keep.is_meta and (
                keep.dtype.is_floating_point
                or keep.numel() != keep.unique().numel()
                or not bool(((keep >= 0) & (keep < cfg.hidden_size)).all())
            ):
                raise ValueError("layers.keep must hold distinct dimensions of the hidden size")
            state = {
                k.removeprefix("layers."): v.float().clone()
                for k, v in tensors.items()
                if k != KEEP
            }
        blocks.load_state_dict(state, assign=True)
        return cls(cfg, head, blocks, rotary, keep, with_classifier)

    def step(
        self,
        state: tuple[torch.Tensor, TokenLayout] | None,
        tap: int,
        h: torch.Tensor,
        rows_per_sample: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TokenLayout]:
        """Fold tapped layer ``tap``'s rows ``(rows, hidden)`` in and run its block."""
        dtype = self.up.weight.dtype
        x = self.down[tap](self.in_norms[tap](h.to(dtype)))
        if state is None:
            if rows_per_sample is None:
                raise ValueError("a side transformer mixes tokens: pass rows_per_sample")
            tokens = TokenLayout(rows_per_sample, self.rotary, dtype, x.device)
        else:
            s, tokens = state
            x = torch.lerp(s, x, torch.sigmoid(self.gates[tap] / self.cfg.gate_temperature))
        x = tokens.run(self.blocks[tap], tokens.pad(x))
        return x[tokens.valid], tokens

    def finish(self, state: tuple[torch.Tensor, TokenLayout], h_last: torch.Tensor) -> torch.Tensor:
        """Head features ``(rows, out_size)`` from the last block and the last layer's rows."""
        return self.frozen.features(h_last.to(self.up.weight.dtype) + self.up(state[0]))


def _fresh(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A block tensor before its trained weights are loaded: norms at one, the rest small and
    finite (an untrained side transformer's output ignores them: ``up`` is zero)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.randn(shape) * 0.02
