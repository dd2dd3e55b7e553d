"""The int8 device backbone: SmoothQuant-style smoothing, then int8 linears with one scale per
token.

``Int8Linear`` keeps int8 weights with one scale per output channel and quantizes its input to
int8 with one scale per row (per token) on every call, then multiplies in int32 with
PyTorch's own integer matmul (``torch._int_mm``, oneDNN's s8 GEMM on x86). Why not a library:
PyTorch's dynamic quantized linears (``torch.ao.quantization.quantize_dynamic``, fbgemm)
scale each input with one number per *tensor*, so a batch's few loud tokens coarsen every
other token's levels; torchao's per-token int8 path runs on CPU no faster than fp32 (576 x
1536 at 128 rows: torchao 1.27 ms, fbgemm 0.39 ms, ``_int_mm`` with per-token scales 0.37 ms,
fp32 1.42 ms; torch 2.13, 2 x86 cores). Error left in SmolLM2-135M's last-token state at
layer 13 against fp32 (64 SST-2 sentences, mean relative L2): per-tensor 0.113, per-token
0.038.

Decoder LMs also carry a few input *channels* far larger than the rest. Smoothing (Xiao et
al., SmoothQuant, ICML 2023) moves that range into the weights, which int8 handles per output
channel: for a linear ``y = x W^T`` and a per-input-channel factor ``s``,
``y = (x / s) (W s)^T``. The ``1 / s`` is folded into whatever produced ``x``: the RMSNorm's
weight before the attention and MLP input projections, and the value projection's rows before
the output projection (attention mixes rows, not channels). So the network computes the same
function in float and only the quantization changes. ``s_j = max|x_j|^a / max|W_:j|^(1-a)``
with ``a = ALPHA``, from activation maxima over ``CALIBRATION_TEXT``: a fixed public passage,
so the quantized backbone, and its fingerprint, are the same on every run and device (which
channels are outliers is a property of the model, not of the input).

The MLP's down projection stays in float (``FLOAT_LINEARS``, why there). Measured on
SmolLM2-135M, SST-2 zero-shot on 400 dev sentences, with one scale per tensor: fp32 0.780;
int8 with the down projection in float 0.700 unsmoothed, 0.780 smoothed; every linear int8
and smoothed 0.625. With per-token scales, quantizing the down projection too still doubles
the layer-13 error above (0.059), so it stays in float.

Smoothing applies to the families whose norms multiply by their weight and whose blocks are
named like Llama's (``SMOOTH_FAMILIES``); other families have every linear quantized as is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mobillm.files import save_tensors

ALPHA = 0.5
# Left in float: the MLP's down projection. Its inputs' outliers belong to a few tokens (the
# "massive activations" at the first token) more than to channels, so no per-channel factor
# tames one scale per tensor: quantized and smoothed (a = 0.5 to 0.9 for its factors), SST-2
# zero-shot was 0.48 to 0.63; kept in float, 0.78 as fp32 (400 dev sentences, SmolLM2-135M).
FLOAT_LINEARS = ("mlp.down_proj",)
# part of the fingerprint: other factors, other features
RECIPE = f"smoothquant-a{ALPHA}-float-down-pertoken-v2"
SMOOTH_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
CALIBRATION_TEXT = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors may "
    "borrow up to five books at a time, and most loans last three weeks. Children's stories, "
    "travel guides, cookbooks and history are on the ground floor; science, law and medicine "
    "are upstairs. Last year the town council voted to extend the hours on Thursdays, after "
    'a survey found that many people could not come before work. "We were surprised by how '
    'many answers we got," said the head librarian. Reviews of the new reading room have been '
    "mixed: some call it bright, quiet and welcoming, others find the chairs uncomfortable "
    "and the lighting too harsh. The film club meets on the first Monday of every month; in "
    "March it showed a black-and-white comedy from 1954, which was, by most accounts, "
    "wonderful. Question: what time does the library close? Answer: at six in the evening.\n"
    "def mean(values):\n    return sum(values) / len(values)\n"
)


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` as int8: weights per output channel, inputs per row."""

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def shell(cls, in_features: int, out_features: int, bias: bool) -> Int8Linear:
        """An ``Int8Linear`` of that shape whose tensors are still to be assigned
        (``load_layer``)."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = in_features, out_features
        out.register_buffer("qweight", torch.empty(0, dtype=torch.int8))
        out.register_buffer("scale", torch.empty(0))
        out.register_buffer("bias", torch.empty(0) if bias else None)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        step = rows.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        q = rows.div(step).round_().to(torch.int8)
        y = torch._int_mm(q, self.qweight.t()).float().mul_(step).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_layers(layers: Sequence[nn.Module], keep_float: Sequence[str] = ()) -> None:
    """``Int8Linear`` for the linears of ``layers``, but those whose names end with one of
    ``keep_float``."""
    for layer in layers:
        for name in _targets(layer, keep_float):
            parent, _, child = name.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            setattr(owner, child, Int8Linear(getattr(owner, child)))


def _targets(layer: nn.Module, keep_float: Sequence[str]) -> list[str]:
    return [
        n
        for n, m in layer.named_modules()
        if type(m) is nn.Linear and not n.endswith(tuple(keep_float))
    ]


def saved_shapes(layer: nn.Module, keep_float: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The tensors ``save_layer`` writes for the float ``layer``, and their shapes: every int8
    linear's weights, scales and bias, and the rest of its state but the float linears
    (unchanged, read from the model's own file)."""
    targets = _targets(layer, keep_float)
    floats = [n for n, m in layer.named_modules() if type(m) is nn.Linear and n not in targets]
    out: dict[str, tuple[int, ...]] = {}
    for name, t in layer.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in floats:
            continue
        if owner in targets:
            lin = layer.get_submodule(owner)
            out[f"{owner}.qweight"] = (lin.out_features, lin.in_features)
            out[f"{owner}.scale"] = (lin.out_features,)
            if name.endswith(".bias"):
                out[name] = (lin.out_features,)
        else:
            out[name] = tuple(t.shape)
    return out


def save_layer(layer: nn.Module, names: Iterable[str], path: Path) -> None:
    """Write the quantized ``layer``'s ``names`` (``saved_shapes`` of it, taken before it was
    quantized) to ``path``, atomically."""
    state = layer.state_dict()
    # atomically: another process may be reading or writing the same cache file
    save_tensors({n: state[n].contiguous() for n in sorted(names)}, path, {"recipe": RECIPE})


def load_layer(layer: nn.Module, keep_float: Sequence[str], path: Path) -> bool:
    """Make the float ``layer`` the quantized one saved in ``path`` (``map_layer``). False,
    and ``layer`` untouched, if the file is unreadable or holds other tensors, other shapes or
    another recipe."""
    want = saved_shapes(layer, keep_float)
    try:
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(want) or (f.metadata() or {}).get("recipe") != RECIPE:
                return False
            if any(tuple(f.get_slice(n).get_shape()) != shape for n, shape in want.items()):
                return False
    except (OSError, SafetensorError):
        return False
    for name in _targets(layer, keep_float):
        parent, _, child = name.rpartition(".")
        owner = layer.get_submodule(parent) if parent else layer
        lin = getattr(owner, child)
        shell = Int8Linear.shell(lin.in_features, lin.out_features, lin.bias is not None)
        setattr(owner, child, shell)
    map_layer(layer, path)
    return True


def map_layer(layer: nn.Module, path: Path) -> None:
    """Point each of ``layer``'s tensors saved in ``path`` at the file's memory map: file pages,
    which streaming hands back like the float weights' (anonymous memory it cannot)."""
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            parent, _, attr = name.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            t = f.get_tensor(name)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[attr] = t


def calibrate(
    layers: Sequence[nn.Module], forward: Callable[[], object]
) -> dict[str, torch.Tensor]:
    """Per linear layer of ``layers``, the largest absolute value each input channel took
    while ``forward()`` ran the model (over the tokenized ``CALIBRATION_TEXT``), keyed
    ``"{index in layers}.{name in the layer}"`` (``layer_amax`` picks one layer's)."""
    names = {
        m: f"{i}.{n}"
        for i, layer in enumerate(layers)
        for n, m in layer.named_modules()
        if type(m) is nn.Linear
    }
    amax: dict[str, torch.Tensor] = {}

    def record(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().abs().flatten(0, -2).amax(0).float()
        key = names[m]
        amax[key] = torch.maximum(amax[key], x) if key in amax else x

    handles = [m.register_forward_pre_hook(record) for m in names]
    try:
        with torch.inference_mode():
            forward()
    finally:
        for h in handles:
            h.remove()
    return amax


def layer_amax(amax: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Layer ``index``'s entries of ``calibrate``'s maxima, keyed by linear name."""
    prefix = f"{index}."
    return {k.removeprefix(prefix): v for k, v in amax.items() if k.startswith(prefix)}


def _factors(x: torch.Tensor, linears: Sequence[nn.Linear]) -> torch.Tensor:
    w = torch.stack([lin.weight.detach().abs().amax(0).float() for lin in linears]).amax(0)
    s = x.clamp(min=1e-5).pow(ALPHA) / w.clamp(min=1e-5).pow(1 - ALPHA)
    return s.clamp(min=1e-5)


def _scale_inputs(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach() * s.to(lin.weight.dtype), requires_grad=False)


def _scale_outputs(lin: nn.Linear, s: torch.Tensor) -> None:
    s = s.to(lin.weight.dtype)
    lin.weight = nn.Parameter(lin.weight.detach() / s.unsqueeze(1), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach() / s, requires_grad=False)


def _scale_norm(norm: nn.Module, s: torch.Tensor) -> None:
    w = norm.weight.detach()
    norm.weight = nn.Parameter(w / s.to(w.dtype), requires_grad=False)


def smooth_layer(layer: nn.Module, amax: dict[str, torch.Tensor], config: object) -> None:
    """Fold SmoothQuant factors into ``layer`` in place: the same function in float. ``amax``:
    the layer's input maxima by linear name (``layer_amax``)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    if all(n in amax for n in qkv):
        lins = [attn.q_proj, attn.k_proj, attn.v_proj]
        s = _factors(amax[qkv[0]], lins)
        _scale_norm(layer.input_layernorm, s)
        for lin in lins:
            _scale_inputs(lin, s)
    gate_up = ("mlp.gate_proj", "mlp.up_proj")
    if all(n in amax for n in gate_up):
        lins = [mlp.gate_proj, mlp.up_proj]
        s = _factors(amax[gate_up[0]], lins)
        _scale_norm(layer.post_attention_layernorm, s)
        for lin in lins:
            _scale_inputs(lin, s)
    if "self_attn.o_proj" in amax:
        # o_proj's input channel (head h, dim d) is v_proj's channel (h // group, d): one
        # factor per value channel, the largest over the query heads that share it
        heads = int(config.num_attention_heads)  # type: ignore[attr-defined]
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = attn.o_proj.weight.shape[1] // heads
        x = amax["self_attn.o_proj"]
        s = _factors(x, [attn.o_proj]).view(kv, heads // kv, head_dim).amax(1)
        _scale_outputs(attn.v_proj, s.flatten())
        _scale_inputs(attn.o_proj, s.repeat_interleave(heads // kv, 0).flatten())
