"""`golden.safetensors`: a small input and the `pooler_output` the repo's encoder must give for it."""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from hub.errors import RepoError
from hub.models import Family

GOLDEN_NAME = "golden.safetensors"
EXPECTED_KEY = "expected.pooler_output"
# Loose enough for another CPU or BLAS build, tight enough to catch any changed weight.
ATOL, RTOL = 1e-4, 1e-3


@torch.no_grad()
def pooled_features(encoder: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return encoder.eval()(**inputs).pooler_output


def write_golden(encoder: PreTrainedModel, family: Family, repo_dir: Path) -> Path:
    inputs = family.example_inputs(encoder.config, 1, 0)
    tensors = {**inputs, EXPECTED_KEY: pooled_features(encoder, inputs)}
    target = repo_dir / GOLDEN_NAME
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, target, metadata={"atol": str(ATOL)})
    return target


def check_golden(encoder: PreTrainedModel, repo_dir: Path) -> float:
    """Run the golden input; return the max abs difference or raise RepoError when outside tolerance."""
    path = repo_dir / GOLDEN_NAME
    if not path.is_file():
        raise RepoError(f"{repo_dir} has no {GOLDEN_NAME}")
    tensors = load_file(path)
    expected = tensors.pop(EXPECTED_KEY)
    actual = pooled_features(encoder, tensors)
    if actual.shape != expected.shape:
        raise RepoError(
            f"golden output of {repo_dir} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        )
    difference = (actual - expected).abs().max().item()
    if not torch.allclose(actual, expected, atol=ATOL, rtol=RTOL):
        raise RepoError(f"golden output of {repo_dir} differs from {GOLDEN_NAME} by {difference:.3g} (atol {ATOL})")
    return difference
