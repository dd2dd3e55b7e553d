"""The frozen backbone on the device: forward only, tapped layers handed out as they finish."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mobillm.backbone import pages
from mobillm.backbone.families import export_head, family_of
from mobillm.backbone.loader import load_model_and_tokenizer
from mobillm.config import Config, check
from mobillm.errors import ConfigError
from mobillm.files import save_tensors
from mobillm.fingerprint import BackboneFingerprint
from mobillm.side.head import HeadSpec, tensors_sha256

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTS = ("none", "int8")

# Config keys that do not change what the layers compute.
_VOLATILE_KEYS = {
    "transformers_version",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "use_cache",
    "architectures",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "_commit_hash",
}


def stream_hooks(
    layers: Sequence[nn.Module], weights: list[list[pages.Region]], cold: bool = False
) -> list[torch.utils.hooks.RemovableHandle]:
    """Per layer: prefetch the next layer's weights (``weights[i + 1]``) before it runs, and
    hand its own back after; remove the handles when the forward is done."""
    handles = []
    for i, layer in enumerate(layers):
        # hooks must return None: a forward hook's return value replaces the output
        def before(_m: nn.Module, _inp: object, i: int = i) -> None:
            if i + 1 < len(weights):
                pages.prefetch_regions(weights[i + 1])

        def after(_m: nn.Module, _inp: object, _out: object, i: int = i) -> None:
            pages.release_regions(weights[i], cold)

        handles += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    return handles


@dataclasses.dataclass(frozen=True)
class BackboneConfig(Config):
    """Which model to load and which layers to tap.

    ``source``: a Hugging Face folder, a ``.gguf`` file, an alias (``smollm2-135m``) or a hub id.
    ``taps``: ``"all"``, ``"every:K"`` (layers K-1, 2K-1, ...) or a comma list ``"3,7,11"``
    (0-based decoder layer indices). The last layer is always tapped: the head needs it.
    ``stream``: weights stay in their memory-mapped file and only the layer that runs is
    resident: each layer's pages are handed back once it has run and the next layer's are
    prefetched meanwhile (``mobillm.backbone.pages``); the embedding keeps only the rows the
    batch read. Results are bit for bit the same. On by default: it cost 1% (SmolLM2-135M) and 8%
    (Qwen2.5-Coder-0.5B) of a short training run's wall time for 1.6x and 2.2x less peak
    memory. ``cold``: streamed pages are also dropped
    from the page cache, so every step reads the weights from storage again (a device under
    memory pressure; for measuring).
    ``quant="int8"``: the linear layers the device runs use int8 weights (one scale per output
    channel) and int8 activations quantized per token on each call (PyTorch's integer matmul),
    smoothed first and with the MLP's down projection left in float where the family allows
    (``mobillm.backbone.quant``); the side
    network trains on, and later infers with, this quantized backbone's features, and the
    fingerprint says so.
    """

    source: str = "smollm2-135m"
    dtype: str = "float32"
    taps: str = "all"
    stream: bool = True
    cold: bool = False
    quant: str = "none"

    def validate(self) -> None:
        check(bool(self.source), "BackboneConfig.source is empty")
        check(self.dtype in DTYPES, f"BackboneConfig.dtype must be one of {sorted(DTYPES)}")
        check(self.quant in QUANTS, f"BackboneConfig.quant must be one of {QUANTS}")
        check(
            self.quant == "none" or self.dtype == "float32",
            "BackboneConfig.quant='int8' quantizes float32 weights; use dtype float32",
        )
        _parse_taps(self.taps)
        check(not self.cold or self.stream, "BackboneConfig.cold needs stream=True")


def _parse_taps(spec: str) -> tuple[str, int | tuple[int, ...]]:
    spec = spec.strip()
    if spec == "all":
        return "all", 1
    if spec.startswith("every:"):
        k = spec.split(":", 1)[1]
        check(
            k.isdigit() and int(k) > 0, f"taps 'every:K' needs a positive integer K, got {spec!r}"
        )
        return "every", int(k)
    try:
        idx = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        idx = ()
    check(bool(idx), f"taps must be 'all', 'every:K' or a comma list of layer indices: {spec!r}")
    return "list", idx


def resolve_taps(spec: str, num_layers: int) -> tuple[int, ...]:
    """Sorted 0-based layer indices to tap; always includes the last layer."""
    kind, arg = _parse_taps(spec)
    if kind == "all":
        taps = set(range(num_layers))
    elif kind == "every":
        assert isinstance(arg, int)
        taps = set(range(arg - 1, num_layers, arg))
    else:
        assert isinstance(arg, tuple)
        bad = [i for i in arg if not 0 <= i < num_layers]
        check(not bad, f"tap indices {bad} out of range for a model with {num_layers} layers")
        taps = set(arg)
    taps.add(num_layers - 1)
    return tuple(sorted(taps))


LayerCallback = Callable[[int, torch.Tensor], None]


class _Stop(Exception):
    """Raised by the last tap's hook when the layers above it belong to the server."""


class Backbone:
    """A frozen causal LM whose tapped decoder layers report their outputs one by one.

    ``run`` calls ``on_layer(tap_index, hidden)`` with ``hidden`` of shape (batch, seq, hidden)
    as soon as each tapped layer finishes; nothing keeps a reference, so at most one layer's
    output is alive beyond the model's own working set, and no LM logits are ever computed.
    """

    def __init__(self, model: nn.Module, tokenizer: object, cfg: BackboneConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.family = family_of(model)
        self.layers = self.family.layers(model)
        self.taps = resolve_taps(cfg.taps, len(self.layers))
        self.split_layers = 0  # top layers the server runs (split mode): the device stops below
        self._regions: list[list[pages.Region]] | None = None  # streamed weights' pages
        self._amax: dict[str, torch.Tensor] | None = None  # int8: smoothing maxima, per layer
        # the weights' state as loaded, not as found when the first layer is quantized: files
        # replaced in between must not have this process's layers cached under their key
        self._weights_key = _weights_key(model)

    @classmethod
    def load(cls, cfg: BackboneConfig) -> Backbone:
        model, tok = load_model_and_tokenizer(cfg.source, DTYPES[cfg.dtype])
        return cls(model, tok, cfg)

    def set_taps(self, taps: tuple[int, ...] | list[int], split_layers: int = 0) -> None:
        """Tap exactly these layers (e.g. the ones a saved side network was trained on).

        ``split_layers`` > 0: the top layers run elsewhere, so the device taps the boundary
        layer below them and stops there.
        """
        taps = tuple(int(t) for t in taps)
        n = self.num_layers
        end = n - 1 - split_layers
        check(
            bool(taps) and list(taps) == sorted(set(taps)) and taps[0] >= 0 and taps[-1] == end,
            f"taps {taps} must be sorted, unique, within [0, {n}) and end at layer {end}",
        )
        self.taps = taps
        self.split_layers = split_layers

    def set_split(self, k: int) -> None:
        """Split mode: the server runs the top ``k`` layers; tap and stop below them."""
        check(
            1 <= k < self.num_layers,
            f"split layers must be in [1, {self.num_layers - 1}] for a model with "
            f"{self.num_layers} layers, got {k}",
        )
        from mobillm.side.split import SPLIT_FAMILIES

        arch = self.model.config.model_type
        if arch not in SPLIT_FAMILIES:
            raise ConfigError(f"split mode supports {list(SPLIT_FAMILIES)}, not {arch!r}")
        self.set_taps((self.num_layers - 1 - k,), split_layers=k)

    def top_layers(self, k: int) -> tuple[str, dict[str, torch.Tensor]]:
        """The top ``k`` layers for a split learner: config JSON and tensors ``layers.{i}.*``.

        The tensors are the model's own (no copies); callers treat them as read-only.
        """
        from mobillm.side.split import top_layers_config

        tensors = {
            f"layers.{i}.{name}": t.detach()
            for i, layer in enumerate(self.layers[self.num_layers - k :])
            for name, t in layer.state_dict().items()
        }
        return top_layers_config(self.model.config, k), tensors

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        c = self.model.config
        return int(getattr(c, "hidden_size", None) or c.n_embd)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (its position table or trained context), if
        its config says."""
        c = self.model.config
        n = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        return int(n) if n else None

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pid if pid is not None else 0)

    @cached_property
    def fingerprint(self) -> BackboneFingerprint:
        cfg = {k: v for k, v in self.model.config.to_dict().items() if k not in _VOLATILE_KEYS}
        if self.cfg.quant != "none":  # another backbone as far as its features go
            from mobillm.backbone.quant import RECIPE

            cfg["mobillm_device_quant"] = f"{self.cfg.quant}-{RECIPE}"
        blob = json.dumps(cfg, sort_keys=True, default=str).encode()
        _, head = export_head(self.model)
        # read once for the hash and not needed while training: handed back piece by piece
        head_sha256 = tensors_sha256(head, done=pages.releaser())
        return BackboneFingerprint(
            architecture=self.model.config.model_type,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            vocab_size=int(self.model.config.vocab_size),
            config_sha256=hashlib.sha256(blob).hexdigest(),
            head_sha256=head_sha256,
        )

    def export_head(
        self, rows: list[int] | None = None
    ) -> tuple[HeadSpec, dict[str, torch.Tensor]]:
        """Final norm (+ projection) and LM-head rows for the server (``families.export_head``)."""
        return export_head(self.model, rows)

    def word_token_ids(self, words: tuple[str, ...] | list[str]) -> list[int]:
        """First token id of ``" " + word`` per word: what a prompt ending in ':' predicts."""
        ids = []
        for w in words:
            toks = self.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            if not toks:
                raise ConfigError(f"verbalizer {w!r} tokenizes to nothing")
            ids.append(int(toks[0]))
        if len(set(ids)) != len(ids):
            raise ConfigError(f"verbalizers {list(words)} share a first token {ids}")
        return ids

    def _quantize(self) -> None:
        """int8 weights for the linear layers of the layers the device runs (up to its last tap;
        in split mode the top layers stay as they are: the server receives them), smoothed
        first where the family allows (``mobillm.backbone.quant``).

        Each quantized layer is written to a cache folder keyed by the model's files and the
        recipe (``_int8_cache``) and mapped back from there, so its pages are file pages that
        streaming hands back like the float weights', and a later run maps it instead of
        quantizing again. The smoothing factors come from one calibration of the whole float
        model, kept beside the cached layers: a layer quantized later (more taps, an
        interrupted first run) is smoothed as a fresh run would smooth it."""
        from mobillm.backbone import quant

        todo = [
            (i, m)
            for i, m in enumerate(self.layers[: self.taps[-1] + 1])
            if not getattr(m, "_mobillm_q", 0)
        ]
        if not todo:
            return
        smooth = self.model.config.model_type in quant.SMOOTH_FAMILIES
        keep = quant.FLOAT_LINEARS if smooth else ()
        stream = self.cfg.stream
        cache = self._int8_cache()
        files = {i: cache / f"layer-{i}.safetensors" for i, _ in todo} if cache else {}
        # the float weights' pages: handed back once their layer is quantized (streamed)
        floats = {i: pages.regions(m.parameters()) for i, m in todo} if stream else {}
        # read from the cache or measured while every layer is float: a cached layer may
        # still prove unusable below
        if smooth and self._amax is None:
            self._amax = self._calibration(cache)
        cached = {
            i
            for i, layer in todo
            if i in files and files[i].is_file() and quant.load_layer(layer, keep, files[i])
        }
        # one layer at a time: its smoothed float copy lives only until it is quantized
        for i, layer in todo:
            if i not in cached:
                names = quant.saved_shapes(layer, keep)
                if smooth:
                    assert self._amax is not None
                    quant.smooth_layer(layer, quant.layer_amax(self._amax, i), self.model.config)
                quant.quantize_layers([layer], keep)
                if i in files:
                    try:
                        quant.save_layer(layer, names, files[i])
                        quant.map_layer(layer, files[i])
                    except OSError as e:  # a cache is an optimisation: keep it in memory
                        log.warning("int8 layer %d not cached (%s): kept in memory", i, e)
            layer._mobillm_q = 1
            if stream:
                pages.release_regions(floats[i], self.cfg.cold)
            # the replaced float modules sit in reference cycles, and glibc keeps what they
            # free: collected and trimmed layer by layer, or most of them stay resident
            # (Qwen2.5-Coder-1.5B, 28 layers quantized: 5.1 GB; collected 2.2 GB; both 1.7 GB)
            gc.collect()
            pages.trim_heap()
        self._regions = None

    def _calibration(self, cache: Path | None) -> dict[str, torch.Tensor]:
        """The smoothing maxima of every layer (``quant.calibrate``) from the float model, or
        as kept in ``cache`` by the run that quantized its first layers."""
        from mobillm.backbone import quant

        file = cache / "calibration.safetensors" if cache is not None else None
        if file is not None and file.is_file():
            try:
                return load_file(str(file))
            except (OSError, SafetensorError):
                pass
        if any(getattr(m, "_mobillm_q", 0) for m in self.layers):
            raise ConfigError(
                "int8: layers were quantized before any calibration was kept; load the "
                "backbone again to quantize more layers"
            )
        text = quant.CALIBRATION_TEXT
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]  # type: ignore[operator]
        base = self.family.base(self.model)

        def forward() -> object:
            return base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

        handles = self._stream_hooks() if self.cfg.stream else []  # one float layer resident
        try:
            amax = quant.calibrate(list(self.layers), forward)
        finally:
            for h in handles:
                h.remove()
        if file is not None:
            try:
                save_tensors(amax, file)
            except OSError as e:
                log.warning("int8 calibration not cached (%s)", e)
        return amax

    def _int8_cache(self) -> Path | None:
        """Where this model's quantized layers are kept: a folder named by the recipe, the
        calibration text, the model's config and its weight files as loaded (``_weights_key``),
        so that other weights or another recipe never read them. None for a model not loaded
        from a local folder, or when the folder cannot be made (then nothing is cached).
        A new folder replaces the ones made for the model folder's earlier weights by the same
        recipe: each is as large as the model's int8 layers."""
        from mobillm.backbone.loader import cache_root
        from mobillm.backbone.quant import CALIBRATION_TEXT, RECIPE

        if self._weights_key is None:
            return None
        where, weights = self._weights_key
        h = hashlib.sha256(f"{RECIPE}|{CALIBRATION_TEXT}|".encode() + weights)
        folder = cache_root() / "int8" / h.hexdigest()[:24]
        # what a folder was made for, less the weights' state: folders that share it hold
        # earlier weights of this model (another recipe may be another install's: kept)
        made_for = json.dumps(
            {"source": str(where.resolve()), "recipe": RECIPE, "calibration": CALIBRATION_TEXT}
        )
        try:
            new = not folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            if new:
                (folder / "source.json").write_text(made_for)
                _prune_int8(folder, made_for)
        except OSError as e:
            log.warning("int8 layers not cached: %s", e)
            return None
        return folder

    def _stream_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Per layer: prefetch the next layer's weights before it runs, release its own after;
        the embedding's pages once the batch's rows are copied out."""
        if self._regions is None:  # where each layer's weights live: looked up once
            embed = self.model.get_input_embeddings().parameters()
            self._regions = [pages.regions(embed)] + [
                # buffers too: an int8 layer's weights are buffers (``quant.Int8Linear``)
                pages.regions([*layer.parameters(), *layer.buffers()])
                for layer in self.layers
            ]
        embed_pages, *weights = self._regions
        cold = self.cfg.cold
        handles = stream_hooks(self.layers, weights, cold)

        def embedded(m: nn.Module, _inp: object, _out: object) -> None:
            pages.release_regions(embed_pages, cold)  # this batch's rows are copied out by now
            pages.prefetch_regions(weights[0])

        handles.append(self.model.get_input_embeddings().register_forward_hook(embedded))
        return handles

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        on_layer: LayerCallback,
        cache: object | None = None,
        use_cache: bool = False,
    ) -> object | None:
        """Forward (batch, seq) ids through the frozen layers, calling ``on_layer`` per tap.

        Returns the KV cache when ``use_cache`` (generation), else None.
        """
        if self.cfg.quant != "none":
            self._quantize()
        tap_of = {layer: i for i, layer in enumerate(self.taps)}
        # streaming hooks first: forward hooks run in order, and in split mode the boundary
        # layer's tap hook stops the forward, which must not keep that layer's weights
        handles = self._stream_hooks() if self.cfg.stream else []
        for layer_idx, tap_idx in tap_of.items():

            def hook(_m: nn.Module, _inp: object, out: object, tap_idx: int = tap_idx) -> None:
                on_layer(tap_idx, out[0] if isinstance(out, tuple) else out)
                if self.split_layers and tap_idx == len(self.taps) - 1:
                    raise _Stop  # the layers above belong to the server

            handles.append(self.layers[layer_idx].register_forward_hook(hook))
        try:
            with torch.inference_mode():
                out = self.family.base(self.model)(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    cache=cache,
                    use_cache=use_cache,
                )
        except _Stop:
            return None
        finally:
            for h in handles:
                h.remove()
        return out.cache if use_cache else None


def _weights_key(model: nn.Module) -> tuple[Path, bytes] | None:
    """The model's local folder and its weights' state: the config's bytes and each weight
    file's path, size and modification time (a digest of the contents would read gigabytes).
    None for a model not loaded from a local folder of safetensors files."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    where = Path(name) if name else None
    try:
        if where is None or not (where / "config.json").is_file():
            return None
        files = sorted(where.glob("*.safetensors"))
        if not files:
            return None
        key = (where / "config.json").read_bytes()
        for f in files:
            st = f.stat()
            key += f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    except OSError:
        return None
    return where, key


def _prune_int8(keep: Path, made_for: str) -> None:
    """Remove the int8 cache folders other than ``keep`` made for the same ``made_for``. A
    process still running from one keeps its mapped pages (removing a mapped file leaves the
    mapping); one still writing to it keeps those layers in memory."""
    for other in keep.parent.iterdir():
        try:
            stale = other != keep and (other / "source.json").read_text() == made_for
        except OSError:
            continue  # not a folder of ours, one being made, or one from before this file
        if stale:
            log.info("removing the int8 cache of earlier weights: %s", other)
            shutil.rmtree(other, ignore_errors=True)
