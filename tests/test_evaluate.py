"""`medhub evaluate`: a 2-backbone x 1-task x 2-protocol x 3-run study on the phantoms end to end (rows, the
t-test against scipy by hand, report, summary, figure data), a killed study resumed without repeating a unit,
and the statistics helpers."""

import dataclasses
import os
import subprocess
import time

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from scipy import stats
from training_fixtures import MEDHUB, REPO_ROOT, result_row, write_config, xray_manifest

from hub.data.manifest import load_manifest, write_manifest
from training.evaluate.report import efficiency_plot, format_p, task_plot, write_report, write_summary_csv
from training.evaluate.runner import read_results
from training.evaluate.stats import holm, summarise
from training.evaluate.study import load_study

QUICK = {"progress": False, "classification": {"epochs": 2, "optim": {"batch_size": 4}}}


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    """16 X-rays: 8 train, 4 val, 4 test (two of each label in val and test); a random and a seeded-init repo."""
    from hub.cli.main import main

    folder = tmp_path_factory.mktemp("evaluate")
    rows = load_manifest(xray_manifest(folder / "phantoms", n_xray=16))
    splits = ["train"] * 8 + ["val"] * 4 + ["test"] * 4
    write_manifest([dataclasses.replace(r, split=s) for r, s in zip(rows, splits)], folder / "phantoms" / "task.jsonl")
    assert main(["init", "muscle-resnet18-tiny", "--seed", "7", "--out", str(folder / "seeded")]) == 0
    write_config(folder / "quick.yaml", QUICK)
    study = {
        "backbones": {"random": "random:muscle-resnet18-tiny", "seeded": str(folder / "seeded")},
        "baseline": "random",
        "tasks": {"nodule": {"manifest": "phantoms/task.jsonl", "label": "nodule"}},
        "protocols": ["finetune", "frozen-head"],
        "runs": 3,
        "seed": 0,
        "config": "quick.yaml",
    }
    return write_config(folder / "study.yaml", study)


def test_example_study_parses(cli, tmp_path):
    result = cli("evaluate", "--example")
    assert result.code == 0
    (tmp_path / "s.yaml").write_text(result.out)
    study = load_study(tmp_path / "s.yaml")
    assert study.baseline == "random" and study.runs == 10
    assert len(study.units()) == 2 * 1 * 2 * 1 * 10


def test_holm_matches_the_step_down_rule():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.01, float("nan"), 0.03])  # an undefined p-value neither counts nor gets adjusted
    assert adjusted[0] == pytest.approx(0.02) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.03)


def test_p_value_is_undefined_without_spread_or_runs_and_shown_as_n_a(tmp_path):
    rows = [result_row("base", "linear", r, 0.7) for r in range(3)]  # both linear arms constant
    rows += [result_row("other", "linear", r, 0.9) for r in range(3)]
    rows += [result_row("base", "finetune", r, v) for r, v in enumerate([0.6, 0.7, 0.65])]
    rows += [result_row("other", "finetune", 0, 0.8), result_row("single", "finetune", 0, 0.9)]  # n = 1 arms
    rows += [result_row("spread", "finetune", r, v) for r, v in enumerate([0.8, 0.85, 0.9])]
    summaries = {(s.protocol, s.backbone): s for s in summarise(rows, "base")}
    constant = summaries["linear", "other"]
    assert constant.identical and constant.std == 0 and np.isnan(constant.p_student) and np.isnan(constant.p_welch)
    assert np.isnan(constant.p_holm) and summaries["linear", "base"].identical
    for name in ("other", "single"):
        assert np.isnan(summaries["finetune", name].p_student) and not summaries["finetune", name].identical
    spread = summaries["finetune", "spread"]
    student = stats.ttest_ind([0.8, 0.85, 0.9], [0.6, 0.7, 0.65]).pvalue
    assert spread.p_student == pytest.approx(student) and spread.p_holm == pytest.approx(student)  # the only test
    report = write_report(list(summaries.values()), "base", tmp_path).read_text()
    assert "0.900 +- 0.000 (n=3, identical runs, p n/a)" in report and "<1e-4" not in report
    csv_lines = write_summary_csv(list(summaries.values()), tmp_path).read_text().splitlines()
    constant_line = next(line for line in csv_lines if line.startswith("nodule,linear,1.0,other,"))
    assert constant_line.endswith(",n/a,n/a,n/a,True") and "nan" not in "".join(csv_lines)


def _points(axes):
    return [c.get_offsets() for c in axes.collections if isinstance(c, PathCollection)]


def test_task_figure_shows_every_run_the_p_values_and_chance():
    rows = [result_row("base", "linear", r, v) for r, v in enumerate([0.6, 0.7, 0.8])]
    rows += [result_row("other", "linear", r, 0.9) for r in range(3)]
    summaries = summarise(rows, "base")
    axes = task_plot("nodule", summaries, rows).axes[0]
    points = _points(axes)
    assert [len(p) for p in points] == [3, 3]
    identical = next(p for p in points if np.all(p[:, 1] == 0.9))
    assert len(set(identical[:, 0])) == 3  # three identical runs stay three points, side by side
    other = next(s for s in summaries if s.backbone == "other")
    assert [t.get_text() for t in axes.texts] == [f"p {format_p(other.p_student)}"]  # none above the baseline
    legend = axes.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["chance (AUC 0.5)", "base (baseline), n=3", "other, n=3"]
    assert legend.get_bbox_to_anchor().x0 > axes.get_window_extent().x1  # outside the axes: it hides no bar
    assert [t.get_text() for t in axes.get_xticklabels()] == ["linear\n100% of labels"]
    assert axes.get_ylim()[1] >= 0.9 * 1.12


def test_label_efficiency_figure_has_a_panel_per_task_with_its_metric_and_the_fractions_as_ticks():
    rows = [
        result_row("muscle", protocol, r, value + 0.01 * r, fraction, task=task, metric=metric)
        for task, metric in (("nodule", "roc_auc"), ("lung", "dice"))
        for protocol in ("finetune", "linear")
        for fraction, value in ((0.1, 0.6), (0.5, 0.7), (1.0, 0.8))
        for r in range(2)
    ]
    figure = efficiency_plot("muscle", summarise(rows, "muscle"), rows)
    lung, nodule = figure.axes
    assert (lung.get_title(), lung.get_ylabel()) == ("lung", "test Dice")
    assert (nodule.get_title(), nodule.get_ylabel()) == ("nodule", "test ROC AUC")
    assert [t.get_text() for t in nodule.get_xticklabels()] == ["10%", "50%", "100%"]
    assert [len(p) for p in _points(nodule)] == [2] * 6
    lines = [np.asarray(c.lines[0].get_xdata(), dtype=float) for c in nodule.containers]
    assert len(lines) == 2 and np.all(lines[0] < lines[1])  # the protocols nudged apart, no overlapping error bars


@pytest.mark.slow
def test_study_runs_resumes_and_reports(study_file, tmp_path, cli):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [MEDHUB, "evaluate", str(study_file), "--out", str(out), "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while len(read_results(out)) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.kill()
    process.wait()
    before = {row["key"]: row["seconds"] for row in read_results(out)}
    assert 2 <= len(before) < 12
    assert cli("evaluate", study_file, "--out", out).code != 0  # results there and no --resume
    result = cli("evaluate", study_file, "--out", out, "--resume", "--no-progress")
    assert result.code == 0, result.err
    rows = read_results(out)
    keys = [row["key"] for row in rows]
    assert len(keys) == 12 and len(set(keys)) == 12
    assert {k: r["seconds"] for k, r in zip(keys, rows) if k in before} == before  # done units not rerun
    assert all(0 <= row["metrics"]["roc_auc"] <= 1 and row["n_test"] == 4 for row in rows)

    by_hand = {}
    for protocol in ("finetune", "frozen-head"):
        arm = {
            b: [r["metrics"]["roc_auc"] for r in rows if r["backbone"] == b and r["protocol"] == protocol]
            for b in ("random", "seeded")
        }
        by_hand[protocol] = (
            float(np.mean(arm["seeded"])),
            stats.ttest_ind(arm["seeded"], arm["random"]).pvalue,
            stats.ttest_ind(arm["seeded"], arm["random"], equal_var=False).pvalue,
            float(np.std(arm["seeded"], ddof=1)),
        )
    summaries = summarise(rows, "random")
    for s in summaries:
        if s.backbone == "seeded":
            mean, student, welch, std = by_hand[s.protocol]
            assert (s.mean, s.std) == pytest.approx((mean, std))
            if np.isfinite(student):
                assert (s.p_student, s.p_welch, s.p_holm) == pytest.approx((student, welch, student))
        else:
            assert s.p_student is None
    report = (out / "report.md").read_text()
    assert "## nodule (ROC AUC)" in report and "| seeded |" in report and "**" in report
    assert (out / "summary.csv").read_text().count("\n") == 1 + 4
    assert (out / "task_nodule.png").stat().st_size > 1000
    axes = task_plot("nodule", summaries, rows).axes[0]
    assert axes.get_ylabel() == "test ROC AUC"
    assert [t.get_text() for t in axes.get_xticklabels()] == [
        "finetune\n100% of labels",
        "frozen-head\n100% of labels",
    ]
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in axes.containers if hasattr(c, "patches")}
    expected = {
        label: [s.mean for s in summaries if s.backbone == b]
        for b, label in (("random", "random (baseline), n=3"), ("seeded", "seeded, n=3"))
    }
    assert bars.keys() == expected.keys()
    for label, heights in bars.items():
        assert heights == pytest.approx(expected[label])


@pytest.mark.slow
def test_linear_protocol_auc_equals_logistic_regression_on_the_embed_output(study_file, tmp_path):
    import pyarrow.dataset as ds
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from hub.embed import embed_dataset
    from training.evaluate.runner import run_study

    study = load_study(study_file)
    study.backbones, study.protocols, study.runs = {"seeded": study.backbones["seeded"]}, ["linear"], 2
    study.baseline = "seeded"
    rows = run_study(study, tmp_path / "out", progress=False)
    assert [r["run"] for r in rows] == [0, 1] and all(r["n_train"] == 8 for r in rows)
    # all labels + a deterministic solver: the runs repeat one value, and the report says so instead of a p-value
    assert rows[0]["metrics"]["roc_auc"] == rows[1]["metrics"]["roc_auc"]
    assert [s.identical for s in summarise(rows, "seeded")] == [True]

    manifest = study.tasks["nodule"].manifest
    out = embed_dataset(study.backbones["seeded"], manifest, tmp_path / "emb").out
    shards = [str(p) for p in sorted(out.rglob("*.parquet")) if p.name != "errors.parquet"]
    table = ds.dataset(shards, format="parquet").to_table().to_pandas()
    x, y = np.stack(table["embedding"].to_numpy()), table["label_nodule"].to_numpy().astype(int)
    train, test = (table["split"] == "train").to_numpy(), (table["split"] == "test").to_numpy()
    for row in rows:
        model = LogisticRegression(max_iter=5000, random_state=row["seed"]).fit(x[train], y[train])
        assert row["metrics"]["roc_auc"] == pytest.approx(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))


@pytest.mark.slow
def test_update_cards_publishes_new_revisions_with_the_summary_in_the_model_index(study_file, tmp_path, hf_cache, cli):
    import csv

    import yaml
    from huggingface_hub import ModelCard
    from transformers import AutoModel

    from hub.export import install_in_cache, verify_checksums, verify_repo

    first = install_in_cache(study_file.parent / "seeded", "org/seeded")
    raw = yaml.safe_load(study_file.read_text())
    raw.update(
        backbones={"random": "random:muscle-resnet18-tiny", "cached": "org/seeded"},
        protocols=["linear"],
        runs=2,
        label_fractions=[0.5],
    )
    study = write_config(study_file.parent / "cards_study.yaml", raw)
    out = tmp_path / "out"
    result = cli("evaluate", study, "--out", out, "--update-cards", "--no-progress")
    assert result.code == 0, result.err
    new = (hf_cache / "models--org--seeded" / "refs" / "main").read_text()
    assert new != first.commit and f"card of cached updated: new cache revision {new}" in result.out
    # rerun: the entries are replaced, not repeated, and each run is one more revision
    result = cli("evaluate", study, "--out", out, "--resume", "--update-cards", "--no-progress")
    assert result.code == 0, result.err
    newest = (hf_cache / "models--org--seeded" / "refs" / "main").read_text()
    assert newest not in (new, first.commit)

    summary = {row["backbone"]: row for row in csv.DictReader((out / "summary.csv").open())}
    cards = {"cached": verify_repo("org/seeded").repo_dir, "random": out / "cards" / "random"}
    assert cards["cached"].name == newest
    verify_checksums(cards["random"])
    for backbone, folder in cards.items():
        card = ModelCard.load(folder / "README.md")
        ours = [r for r in card.data.eval_results if r.dataset_type == "medhub-manifest"]
        assert len(ours) == 1
        entry, row = ours[0], summary[backbone]
        assert (entry.task_type, entry.task_name, entry.dataset_name, entry.metric_type) == (
            "image-classification",
            "nodule",
            "task.jsonl",
            "roc_auc",
        )
        assert entry.metric_value == pytest.approx(float(row["mean"]))
        assert "linear @ 0.5 labels (mean of 2 runs" in entry.metric_name
        assert card.text.count("## Transfer evaluation (medhub evaluate)") == 1
        assert f"| nodule | task.jsonl | linear | 0.5 | ROC AUC | {float(row['mean']):.4f} |" in card.text
    old = hf_cache / "models--org--seeded" / "snapshots" / first.commit
    assert "medhub evaluate" not in (old / "README.md").read_text()
    assert AutoModel.from_pretrained("org/seeded", revision=first.commit) is not None
    assert "medhub evaluate" not in (out / "backbones" / "random-muscle-resnet18-tiny" / "README.md").read_text()


def test_imagenet_backbone_without_local_weights_is_one_clear_error(tmp_path, monkeypatch):
    from training.errors import TrainingConfigError
    from training.evaluate.units import backbone_repo

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    with pytest.raises(TrainingConfigError, match=f"no ImageNet weights at {expected} .offline.") as error:
        backbone_repo("torchvision:resnet50", tmp_path / "backbones")
    assert "\n" not in str(error.value) and not (tmp_path / "backbones").exists()
    with pytest.raises(TrainingConfigError, match="only torchvision:resnet50 converts"):
        backbone_repo("torchvision:vit_b_16", tmp_path / "backbones")


@pytest.mark.slow
def test_imagenet_backbone_is_converted_from_torch_hub_cache(tmp_path, monkeypatch):
    import torch
    import torchvision
    from transformers import AutoModel

    from training.evaluate.units import backbone_repo

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(3)
    network = torchvision.models.resnet50().eval()
    checkpoint = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save(network.state_dict(), checkpoint)
    repo = backbone_repo("torchvision:resnet50", tmp_path / "backbones")
    assert repo == tmp_path / "backbones" / "torchvision-resnet50"
    model = AutoModel.from_pretrained(repo).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = torch.nn.Sequential(*list(network.children())[:-1])(x).flatten(1)
        assert torch.allclose(model(pixel_values=x).pooler_output.flatten(1), features, atol=1e-4)
    assert backbone_repo("torchvision:resnet50", tmp_path / "backbones") == repo  # written once


def _linear_study(study_file):
    study = load_study(study_file)
    study.protocols, study.runs, study.label_fractions = ["linear"], 2, [0.5]
    return study


def _metrics_by_key(rows):
    return {row["key"]: row["metrics"] for row in rows}


@pytest.mark.slow
@pytest.mark.parametrize("engine, jobs", [("local", 2), ("ray", 1)])
def test_parallel_and_ray_runs_give_the_sequential_results(study_file, tmp_path, engine, jobs):
    from training.evaluate.runner import run_study

    sequential = run_study(_linear_study(study_file), tmp_path / "sequential", progress=False)
    if engine == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        parallel = run_study(_linear_study(study_file), tmp_path / engine, jobs=jobs, engine=engine, progress=False)
    finally:
        if engine == "ray":
            ray.shutdown()
    assert len(sequential) == 2 * 2  # two backbones x two runs; the random arm has its own init per run
    inits = sorted(p.name for p in (tmp_path / "sequential" / "backbones").iterdir())
    assert inits == ["random-muscle-resnet18-tiny-seed0", "random-muscle-resnet18-tiny-seed1"]
    assert _metrics_by_key(parallel) == _metrics_by_key(sequential)
