"""Frozen-encoder features for whole datasets: sources, batched embedding with a pluggable backend, Parquet output.

``list_sources`` walks a manifest or a folder, ``embed_batches`` yields embedded batches through the repo's own
processor, and ``embed_dataset`` writes them as a resumable Parquet dataset. The default backend is torch
(:class:`TorchBackend`); ``get_backend`` finds others by name (``serving`` adds ONNX Runtime fp32 and int8 through
the ``medhub.embed_backends`` entry points).
"""

from .backends import Backend, Runner, TorchBackend, UnknownBackendError, backend_names, get_backend, register_backend
from .batches import EmbeddedBatch, EmbedError, embed_batches
from .dataset import EmbedResult, embed_dataset
from .inputs import model_inputs, pool_hidden_state, pool_tiles
from .sources import EmbedSource, list_sources

__all__ = [
    "Backend",
    "EmbedError",
    "EmbedResult",
    "EmbedSource",
    "EmbeddedBatch",
    "Runner",
    "TorchBackend",
    "UnknownBackendError",
    "backend_names",
    "embed_batches",
    "embed_dataset",
    "get_backend",
    "list_sources",
    "model_inputs",
    "pool_hidden_state",
    "pool_tiles",
    "register_backend",
]
