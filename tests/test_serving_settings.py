"""Service settings come from MEDHUB_* environment variables, with errors that name the variable."""

from pathlib import Path

import pytest

from serving.settings import MIB, ServeSettings


def test_settings_read_every_variable(monkeypatch, tmp_path):
    values = {
        "MEDHUB_MODELS": " org/a, ./b ,",
        "MEDHUB_MAX_BODY_MB": "3",
        "MEDHUB_MAX_PIXELS": "10",
        "MEDHUB_MAX_VOXELS": "20",
        "MEDHUB_MAX_ARRAY_MB": "7",
        "MEDHUB_MAX_CONCURRENCY": "4",
        "MEDHUB_TIMEOUT": "9",
        "MEDHUB_API_TOKEN": "secret",
        "MEDHUB_DEVICE": "cpu",
        "MEDHUB_FP16": "1",
        "MEDHUB_THREADS": "2",
        "MEDHUB_RUNNERS": "5",
        "MEDHUB_MAX_BATCH": "6",
        "MEDHUB_ONNX_CACHE": str(tmp_path),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = ServeSettings.from_env()
    assert settings == ServeSettings(
        models=("org/a", "./b"),
        max_body_bytes=3 * MIB,
        max_pixels=10,
        max_voxels=20,
        max_array_bytes=7 * MIB,
        max_concurrency=4,
        timeout=9,
        token="secret",
        device="cpu",
        fp16=True,
        threads=2,
        runners=5,
        max_batch=6,
        onnx_cache=tmp_path,
    )
    limits = settings.read_limits()
    assert (limits.max_bytes, limits.max_pixels, limits.max_voxels) == (3 * MIB, 10, 20)
    assert limits.max_array_bytes == 7 * MIB


def test_unset_variables_give_the_defaults(monkeypatch):
    for name in ("MEDHUB_MODELS", "MEDHUB_MAX_BATCH", "MEDHUB_RUNNERS", "MEDHUB_API_TOKEN", "MEDHUB_ONNX_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDHUB_THREADS", "")
    settings = ServeSettings.from_env()
    assert (settings.models, settings.max_batch, settings.runners, settings.threads, settings.token) == (
        (),
        0,
        0,
        0,
        None,
    )
    assert settings.onnx_cache == Path.home() / ".cache" / "medhub" / "onnx"


def test_a_non_integer_names_the_variable(monkeypatch):
    monkeypatch.setenv("MEDHUB_MAX_BATCH", "two")
    with pytest.raises(ValueError, match=r"MEDHUB_MAX_BATCH='two' must be an integer"):
        ServeSettings.from_env()


def serve_args(*flags: str):
    import argparse

    from serving.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", "--model", "org/a", *flags])


def test_serve_flags_win_only_when_given(monkeypatch):
    from serving.cli import serve_environment

    environ = {
        "MEDHUB_MAX_CONCURRENCY": "2",
        "MEDHUB_MAX_BODY_MB": "1",
        "MEDHUB_TIMEOUT": "7",
        "MEDHUB_DEVICE": "cpu",
        "MEDHUB_FP16": "1",
        "MEDHUB_WORKERS": "3",
    }
    env = serve_environment(serve_args(), environ)
    assert {name: env[name] for name in environ} == environ and env["MEDHUB_MODELS"] == "org/a"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = ServeSettings.from_env()
    assert (settings.max_concurrency, settings.max_body_bytes, settings.timeout, settings.device) == (2, MIB, 7, "cpu")
    flags = ("--max-concurrency", "5", "--timeout", "10", "--device", "auto", "--max-array-mb", "9")
    env = serve_environment(serve_args(*flags), environ)
    assert (env["MEDHUB_MAX_CONCURRENCY"], env["MEDHUB_TIMEOUT"], env["MEDHUB_DEVICE"]) == ("5", "10", "auto")
    assert env["MEDHUB_MAX_ARRAY_MB"] == "9"
    assert env["MEDHUB_MAX_BODY_MB"] == "1"
    env = serve_environment(serve_args(), {})
    assert not {"MEDHUB_MAX_CONCURRENCY", "MEDHUB_MAX_BODY_MB", "MEDHUB_TIMEOUT", "MEDHUB_FP16"} & set(env)
