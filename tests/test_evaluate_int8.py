"""`medhub evaluate` with the `linear-int8` protocol: the hub.embed backend registry (built-in torch, explicit
registration, serving's entry points declared in pyproject), a [linear, linear-int8] x 3-run study on the phantoms
end to end with the int8 - fp32 difference and its paired t-test checked against scipy by hand, and the layering
rule that training never imports serving."""

import ast
import csv
import dataclasses
import importlib
import math
import tomllib

import numpy as np
import pytest
from scipy import stats
from training_fixtures import REPO_ROOT, result_row, write_config, xray_manifest

from hub.data.manifest import load_manifest, write_manifest
from hub.embed import TorchBackend, UnknownBackendError, backends, get_backend, register_backend
from training.evaluate.report import format_p
from training.evaluate.runner import read_results
from training.evaluate.stats import int8_differences


@pytest.fixture
def serving_backends(monkeypatch, tmp_path):
    """serving's factories registered by hand (the shared venv's metadata predates the entry points), an empty
    ONNX cache; the registry restored afterwards."""
    from serving.embed import OnnxBackend, int8_backend

    monkeypatch.setattr(backends, "_FACTORIES", dict(backends._FACTORIES))
    monkeypatch.setenv("MEDHUB_ONNX_CACHE", str(tmp_path / "onnx"))
    register_backend("onnx", OnnxBackend)
    register_backend("onnx-int8", int8_backend)


def test_registry_builds_torch_and_names_the_known_backends(monkeypatch):
    monkeypatch.setattr(backends, "_FACTORIES", dict(backends._FACTORIES))
    backend = get_backend("torch", device="cpu")
    assert isinstance(backend, TorchBackend) and backend.describe() == "torch:cpu"
    register_backend("echo", lambda **options: options)
    assert get_backend("echo", device="cpu") == {"device": "cpu"}
    with pytest.raises(UnknownBackendError) as error:
        get_backend("tpu")
    message = str(error.value)
    assert "'tpu'" in message and "echo" in message and "torch" in message and message.count(".") <= 2


def test_declared_entry_points_import_and_are_callable():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"][backends.ENTRY_POINT_GROUP]
    assert set(declared) == {"onnx", "onnx-int8"}
    for name, target in declared.items():
        module, _, attribute = target.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
        assert callable(factory)
        assert factory(device="cpu", onnx_cache=REPO_ROOT / "unused").name == name


def _imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("package, forbidden", [("training", "serving"), ("hub", "serving"), ("hub", "training")])
def test_layering(package, forbidden):
    offenders = [
        f"{path.relative_to(REPO_ROOT)}: {module}"
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        for module in _imported_modules(path)
        if module.split(".")[0] == forbidden
    ]
    assert not offenders, f"{package} must not import {forbidden} (not even lazily): {offenders}"


def test_int8_difference_is_paired_by_run():
    fp32, int8 = [0.70, 0.80, 0.75, 0.90], [0.69, 0.78, 0.75, 0.87]
    rows = [
        result_row("b", p, r, v)
        for p, values in (("linear", fp32), ("linear-int8", int8))
        for r, v in enumerate(values)
    ]
    rows += [result_row("b", "finetune", r, 0.5) for r in range(4)] + [result_row("fp32-only", "linear", 0, 0.7)]
    (d,) = int8_differences(rows[::-1])  # the order of results.jsonl does not matter: pairs go by run
    difference = np.subtract(int8, fp32)
    assert (d.backbone, d.pairs, d.metric) == ("b", 4, "roc_auc")
    assert (d.mean, d.std) == pytest.approx((difference.mean(), difference.std(ddof=1)))
    assert d.p_paired == pytest.approx(stats.ttest_rel(int8, fp32).pvalue)
    assert d.p_student == pytest.approx(stats.ttest_ind(int8, fp32).pvalue)
    assert d.p_paired < d.p_student  # pairing removes the between-run spread
    same = int8_differences(
        [result_row("b", protocol, r, v) for protocol in ("linear", "linear-int8") for r, v in enumerate(fp32)]
    )
    assert same[0].mean == 0 and math.isnan(same[0].p_paired)  # no spread in the differences: undefined


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    """24 X-rays: 12 train, 4 val, 8 test; one seeded tiny backbone folder (a `random:` one would be initialised
    per run, so exported and quantized three times); linear and linear-int8 on half the labels."""
    from hub.cli.main import main

    folder = tmp_path_factory.mktemp("int8study")
    assert main(["init", "muscle-resnet18-tiny", "--seed", "7", "--out", str(folder / "seeded")]) == 0
    rows = load_manifest(xray_manifest(folder / "phantoms", n_xray=24))
    splits = ["train"] * 12 + ["val"] * 4 + ["test"] * 8
    write_manifest([dataclasses.replace(r, split=s) for r, s in zip(rows, splits)], folder / "phantoms" / "task.jsonl")
    study = {
        "backbones": {"seeded": str(folder / "seeded")},
        "baseline": "seeded",
        "tasks": {"nodule": {"manifest": "phantoms/task.jsonl", "label": "nodule"}},
        "protocols": ["linear", "linear-int8"],
        "label_fractions": [0.5],
        "runs": 3,
        "seed": 0,
    }
    return write_config(folder / "study.yaml", study)


@pytest.mark.slow
def test_linear_int8_study_reports_the_paired_difference(study_file, tmp_path, cli, serving_backends):
    out = tmp_path / "out"
    result = cli("evaluate", study_file, "--out", out, "--no-progress")
    assert result.code == 0, result.err
    rows = read_results(out)
    expected = [(protocol, run) for protocol in ("linear", "linear-int8") for run in range(3)]
    assert sorted((r["protocol"], r["run"]) for r in rows) == expected
    assert all(r["n_test"] == 8 and 0 <= r["metrics"]["roc_auc"] <= 1 for r in rows)
    assert (out / "features" / "seeded_nodule_onnx-int8.npz").is_file()

    arm = {
        p: [next(r["metrics"]["roc_auc"] for r in rows if r["protocol"] == p and r["run"] == k) for k in range(3)]
        for p in ("linear", "linear-int8")
    }
    difference = np.subtract(arm["linear-int8"], arm["linear"])
    spread = np.ptp(difference) > 0
    paired = stats.ttest_rel(arm["linear-int8"], arm["linear"]).pvalue if spread else math.nan
    student = (
        stats.ttest_ind(arm["linear-int8"], arm["linear"]).pvalue
        if np.ptp(arm["linear"]) or np.ptp(arm["linear-int8"])
        else math.nan
    )
    with open(out / "summary.csv", encoding="utf-8") as stream:
        line = next(r for r in csv.DictReader(stream) if r["protocol"] == "linear-int8 - linear")
    assert (line["backbone"], line["fraction"], line["runs"]) == ("seeded", "0.5", "3")
    assert float(line["mean"]) == pytest.approx(difference.mean(), abs=1e-12)
    assert float(line["std"]) == pytest.approx(difference.std(ddof=1), abs=1e-12)
    for column, expected in (("p_paired", paired), ("p_student", student)):
        assert line[column] == "n/a" if math.isnan(expected) else float(line[column]) == pytest.approx(expected)
    report = (out / "report.md").read_text()
    assert "## int8 vs fp32 (linear probe)" in report
    cell = f"{difference.mean():+.4f} +- {difference.std(ddof=1):.4f}"
    assert f"| nodule | seeded | 50% | ROC AUC | 3 | {cell} |" in report
    assert f"| {format_p(paired)} | {format_p(student)} |" in report

    # linear's torch fp32 features are the served fp32 ONNX graph's up to float error, so int8 - linear is the
    # quantization's effect; the int8 graph passed the service's gate (cosine >= 0.995) and is close as well
    torch_features = np.load(out / "features" / "seeded_nodule.npz")["embeddings"]
    int8_features = np.load(out / "features" / "seeded_nodule_onnx-int8.npz")["embeddings"]
    from training.evaluate.units import dataset_features

    onnx_features = dataset_features(
        study_file.parent / "seeded", study_file.parent / "phantoms" / "task.jsonl", tmp_path / "f.npz", "onnx"
    )
    onnx_features = onnx_features["embeddings"]
    assert np.abs(onnx_features - torch_features).max() < 1e-4 * np.abs(torch_features).max()
    cosine = (
        (int8_features * torch_features).sum(1)
        / np.linalg.norm(int8_features, axis=1)
        / np.linalg.norm(torch_features, axis=1)
    )
    assert cosine.min() > 0.99 and np.abs(int8_features - torch_features).max() > 0  # int8, not fp32 again
