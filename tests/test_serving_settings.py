"""Service settings come from MEDHUB_* environment variables, with errors that name the variable."""

from pathlib import Path

import pytest

from serving.settings import MIB, ServeSettings


def test_settings_read_every_variable(monkeypatch, tmp_path):
    values = {"MEDHUB_MODELS": " org/a, ./b ,", "MEDHUB_MAX_BODY_MB": "3", "MEDHUB_MAX_PIXELS": "10",
              "MEDHUB_MAX_VOXELS": "20", "MEDHUB_MAX_CONCURRENCY": "4", "MEDHUB_TIMEOUT": "9",
              "MEDHUB_API_TOKEN": "secret", "MEDHUB_DEVICE": "cpu", "MEDHUB_FP16": "1", "MEDHUB_THREADS": "2",
              "MEDHUB_RUNNERS": "5", "MEDHUB_MAX_BATCH": "6", "MEDHUB_ONNX_CACHE": str(tmp_path)}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = ServeSettings.from_env()
    assert settings == ServeSettings(models=("org/a", "./b"), max_body_bytes=3 * MIB, max_pixels=10, max_voxels=20,
                                     max_concurrency=4, timeout=9, token="secret", device="cpu", fp16=True,
                                     threads=2, runners=5, max_batch=6, onnx_cache=tmp_path)
    limits = settings.read_limits()
    assert (limits.max_bytes, limits.max_pixels, limits.max_voxels) == (3 * MIB, 10, 20)


def test_unset_variables_give_the_defaults(monkeypatch):
    for name in ("MEDHUB_MODELS", "MEDHUB_MAX_BATCH", "MEDHUB_RUNNERS", "MEDHUB_API_TOKEN", "MEDHUB_ONNX_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDHUB_THREADS", "")
    settings = ServeSettings.from_env()
    assert (settings.models, settings.max_batch, settings.runners, settings.threads, settings.token) == ((), 0, 0, 0, None)
    assert settings.onnx_cache == Path.home() / ".cache" / "medhub" / "onnx"


def test_a_non_integer_names_the_variable(monkeypatch):
    monkeypatch.setenv("MEDHUB_MAX_BATCH", "two")
    with pytest.raises(ValueError, match=r"MEDHUB_MAX_BATCH='two' must be an integer"):
        ServeSettings.from_env()
