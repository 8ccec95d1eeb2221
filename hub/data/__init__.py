"""Synthetic phantom data and the dataset manifest schema."""

from hub.data.manifest import ManifestError, ManifestRow, load_manifest, write_manifest
from hub.data.phantoms import generate

__all__ = ["ManifestError", "ManifestRow", "generate", "load_manifest", "write_manifest"]
