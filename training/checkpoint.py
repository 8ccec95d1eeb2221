"""Atomic checkpoints and the random-number-generator state they carry.

A checkpoint is written to a temporary file in the run folder, flushed to disk, then renamed over
`checkpoint.pt` with `os.replace` (atomic on POSIX). A crash or interruption mid-write leaves the previous
checkpoint untouched and removes the partial file; a process killed mid-write (`kill -9`) cannot, so every run
removes such leftovers when it starts (`remove_stale_temporaries`). Everything stored is plain tensors, numbers,
strings and containers, so checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    """Write `state` to `path` so that readers only ever see the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the partial files (`.checkpoint.pt.*.tmp`) that a process killed mid-write left beside `path`."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for temporary in stale:
        temporary.unlink(missing_ok=True)
    return stale


def load(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; start the run without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from None


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states as plain bytes, ints and tuples: loadable with
    weights_only=True and picklable through `all_gather_object` (each rank's state goes into the checkpoint)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.astype("<u4").tobytes(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype="<u4").copy(), position, has_gauss, cached))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])
