"""Frozen backbone on the device: load (folder, GGUF, alias, hub id), tap layers, export head."""

from mobillm.backbone.families import FAMILIES, UnsupportedModelError, export_head
from mobillm.backbone.loader import ALIASES, BackboneLoadError, cache_root, resolve_source
from mobillm.backbone.model import Backbone, BackboneConfig, resolve_taps

__all__ = [
    "ALIASES",
    "FAMILIES",
    "Backbone",
    "BackboneConfig",
    "BackboneLoadError",
    "UnsupportedModelError",
    "cache_root",
    "export_head",
    "resolve_source",
    "resolve_taps",
]
