"""Reading upstream PyTorch checkpoints safely (`weights_only=True` with a narrow allow-list)."""

import argparse
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from hub.errors import ConversionError

# Objects that released SSL checkpoints carry beside tensors (MoCo/PCL save their argparse namespace).
SAFE_GLOBALS = [argparse.Namespace, OrderedDict]


def load_checkpoint(path: Path) -> Any:
    """Unpickle a checkpoint without running arbitrary code; refuse anything outside the allow-list."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise ConversionError(
                f"checkpoint {path} holds {found.group(1)}, outside medhub's allow-list of safe objects"
            ) from None
        raise ConversionError(f"checkpoint {path} is not a readable PyTorch file") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ConversionError(
            f"checkpoint {path} is not a readable PyTorch file ({error.__class__.__name__})"
        ) from None


def unwrap_state_dict(checkpoint: Any, path: Path, wrappers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensor dict inside `checkpoint`: the first of `wrappers` present, else the checkpoint itself."""
    if isinstance(checkpoint, dict):
        for key in wrappers:
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ConversionError(f"checkpoint {path} holds no state dict (looked under {', '.join(wrappers)})")
    tensors = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ConversionError(f"checkpoint {path} holds no tensors")
    return tensors


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, of: str = "") -> None:
    """Name the first tensor of `state` whose shape differs from the model's (`of`: whose shape was expected)."""
    for key, value in state.items():
        if key in expected and value.shape != expected[key].shape:
            raise ConversionError(
                f"checkpoint {path} key {key} has shape {tuple(value.shape)}, expected {of}{tuple(expected[key].shape)}"
            )
