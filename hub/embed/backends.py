"""Backends turn a batch of ``pixel_values`` into the pooled embedding and the pooled hidden states."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import AutoModel

from hub.errors import InputError

from .inputs import pool_hidden_state

ENTRY_POINT_GROUP = "medhub.embed_backends"
"""Other packages add backends here: each entry point names a factory taking keyword options (``serving``: onnx,
onnx-int8). ``hub`` never imports them."""

Runner = Callable[[np.ndarray], list[np.ndarray]]
"""(B, C, *size) float32 -> [pooled embedding (B, D), pooled hidden state 0 (B, D0), ...]."""


class Backend(Protocol):
    name: str

    def open(self, repo_dir: Path, repo_id: str, revision: str) -> Runner:
        """Load the repo's encoder and return its runner."""

    def describe(self) -> str:
        """Where the runner runs (device or provider), once opened."""


class TorchBackend:
    """The repo's ``AutoModel`` in eager torch, on CUDA for ``device="auto"`` when one is visible; ``threads``, when
    given, sets torch's intra-op threads of this process (a Ray actor: 1)."""

    name = "torch"

    def __init__(self, device: str = "auto", threads: int | None = None) -> None:
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.threads = threads

    def open(self, repo_dir: Path, repo_id: str, revision: str) -> Runner:
        if self.threads:
            torch.set_num_threads(self.threads)
        model = AutoModel.from_pretrained(repo_dir).eval().to(self.device)

        @torch.inference_mode()
        def run(pixel_values: np.ndarray) -> list[np.ndarray]:
            outputs = model(pixel_values=torch.from_numpy(pixel_values).to(self.device), output_hidden_states=True)
            pooled = [outputs.pooler_output] + [pool_hidden_state(h) for h in outputs.hidden_states or ()]
            return [p.float().cpu().numpy() for p in pooled]

        return run

    def describe(self) -> str:
        return f"torch:{self.device}"


class UnknownBackendError(InputError):
    """A backend name that is neither built in, registered, nor an installed entry point."""


_FACTORIES: dict[str, Callable[..., Backend]] = {"torch": TorchBackend}


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    """Make ``get_backend(name)`` call ``factory`` (before and instead of an entry point of that name)."""
    _FACTORIES[name] = factory


def backend_names() -> list[str]:
    return sorted(set(_FACTORIES) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_backend(name: str, **options) -> Backend:
    """The embedding backend ``name`` built with ``options``: torch, a registered one, or an entry point's."""
    factory = _FACTORIES.get(name)
    if factory is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise UnknownBackendError(
                f"embedding backend {name!r} is not one of {', '.join(backend_names())} "
                f"(installed packages add backends through the {ENTRY_POINT_GROUP!r} entry points)"
            )
        factory = found[0].load()
    return factory(**options)
