"""Shared fixtures: offline Hugging Face settings, tiny MUSCLE configs, and a CLI runner."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402

import hub  # noqa: E402,F401  (registers the families)
from hub.catalogue import get_variant  # noqa: E402
from hub.cli.main import main  # noqa: E402
from hub.models.muscle import MuscleConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config() -> MuscleConfig:
    """ResNet-18 layout (basic blocks) at widths 8-64 and 64x64 input."""
    return get_variant("muscle-resnet18-tiny").build_config()


@pytest.fixture
def tiny_bottleneck_config() -> MuscleConfig:
    return MuscleConfig(depths=[1, 1, 1, 1], hidden_sizes=[4, 8, 16, 32], stem_width=8, block_type="bottleneck", image_size=64)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache for this test, seen by this process and by subprocesses."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run `medhub ARGS...` in this process and return exit code, stdout and stderr."""

    def run(*args: str) -> CliResult:
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def run_python():
    """Run a Python snippet in a new interpreter (fresh imports, so offline flags and import blocks take effect)."""

    def run(code: str, env: dict[str, str] | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO_ROOT
        )

    return run
