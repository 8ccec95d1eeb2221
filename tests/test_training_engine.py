"""The engine: exact resume, atomic checkpoints, schedules, sample streams and recipe configuration files."""

import json
import math

import pytest
import torch
from training_fixtures import MICRO_MUSCLE, write_config, xray_manifest

from training import checkpoint
from training.config import load_recipe_config
from training.data import IndexStream
from training.engine import warmup_cosine
from training.errors import CheckpointError, TrainingConfigError
from training.launch import train
from training.recipes.muscle import MuscleSettings


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return xray_manifest(tmp_path_factory.mktemp("phantoms"))


def _network(run_dir):
    return checkpoint.load(run_dir / "checkpoint.pt")["network"]


@pytest.mark.slow
def test_stopped_and_resumed_runs_end_with_the_uninterrupted_weights(tmp_path, manifest):
    config = write_config(tmp_path / "micro.yaml", MICRO_MUSCLE)
    full = train("muscle", [manifest], tmp_path / "full", config_file=config)
    assert full.completed and full.global_step == 3 + 2 * 2 * 2
    expected = _network(tmp_path / "full")
    # stop inside MoCo, then again inside a task visit (L2-SP anchor and queue must survive), then finish
    run = tmp_path / "resumed"
    assert not train("muscle", [manifest], run, config_file=config, stop_after=2).completed
    # what a kill -9 after step 2's checkpoint leaves: records of steps past it, a cut record, a partial checkpoint
    with open(run / "metrics.jsonl", "a") as stream:
        stream.write("".join(json.dumps({"stage": "moco", "step": s, "global_step": s}) + "\n" for s in (3, 4)))
        stream.write('{"stage": "moco", "st')
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"partial")
    assert not train("muscle", [manifest], run, config_file=config, resume=True, stop_after=4).completed
    assert checkpoint.load(run / "checkpoint.pt")["step"] == 3  # continual step 3 = second step of a visit
    assert train("muscle", [manifest], run, config_file=config, resume=True).completed
    resumed = _network(run)
    assert resumed.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert different == []
    assert (run / "repos" / "encoder" / "model.safetensors").is_file()
    # the stopped, killed and resumed run logged every step exactly once, and no partial checkpoint stayed
    assert not list(run.glob(".checkpoint.pt.*.tmp"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == list(range(1, 12))


def test_a_fresh_run_refuses_a_folder_with_a_checkpoint_and_resume_needs_one(tmp_path, manifest):
    checkpoint.save_atomic({"x": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(TrainingConfigError, match="already holds a checkpoint"):
        train("muscle", [manifest], tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train("muscle", [manifest], tmp_path / "empty", resume=True)


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_halfway(state, stream):
        real_save(state, stream)
        stream.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_damaged_checkpoint_is_reported_not_loaded(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load(path)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    state = checkpoint.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.save_atomic({"rng": state}, tmp_path / "c.pt")
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_warmup_then_cosine_schedule_values():
    factor = warmup_cosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [factor(0), factor(1)] == [0.5, 1.0]
    assert factor(2) == pytest.approx(1.0)
    assert factor(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(10) == pytest.approx(0.1)


def test_index_stream_reads_each_sample_once_per_epoch_and_splits_the_global_batch_across_ranks():
    single = IndexStream([5, 7], batch_size=4, seed=3)
    epoch0 = [i for step in range(3) for i, epoch in single.global_batch(step) if epoch == 0]
    assert sorted(epoch0) == list(range(12))
    assert [i for i, _ in single.global_batch(0)] == torch.randperm(12, generator=torch.Generator().manual_seed(3))[
        :4
    ].tolist()
    ranks = [IndexStream([5, 7], batch_size=2, seed=3, rank=r, world=2) for r in (0, 1)]
    for step in range(4):
        assert ranks[0].batch(step) + ranks[1].batch(step) == single.global_batch(step)


def test_weighted_streams_follow_the_dataset_weights():
    stream = IndexStream([4, 4], batch_size=64, seed=0, weights=[1.0, 0.0])
    assert all(i < 4 for i, _ in stream.global_batch(5))
    stream = IndexStream([2, 8], batch_size=2000, seed=0, weights=[1.0, 1.0])
    share_first = sum(i < 2 for i, _ in stream.global_batch(0)) / 2000
    assert share_first == pytest.approx(0.5, abs=0.05)
    with pytest.raises(TrainingConfigError, match="weights"):
        IndexStream([2, 8], batch_size=2, seed=0, weights=[1.0])


def test_presets_load_and_user_files_override_them(tmp_path):
    tiny = load_recipe_config(MuscleSettings, "muscle", "tiny")
    paper = load_recipe_config(MuscleSettings, "muscle", "paper")
    assert tiny.variant == "muscle-resnet18-tiny" and paper.variant == "muscle-resnet50"
    assert paper.moco.queue_size == 65536 and paper.continual.rounds == 10
    assert tiny.moco.optim.optimizer == "sgd" and tiny.moco.optim.batch_size == 4  # nested merge keeps defaults
    override = write_config(tmp_path / "o.yaml", {"continual": {"alpha": 0.5}})
    assert load_recipe_config(MuscleSettings, "muscle", "tiny", override).continual.alpha == 0.5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"moco": {"queue_sise": 3}}, r"moco: unknown key\(s\) \['queue_sise'\]"),
        ({"continual": {"rounds": "ten"}}, "continual.rounds must be int"),
        ({"moco": {"optim": {"optimizer": "lion"}}}, "optimizer 'lion'"),
    ],
)
def test_bad_configuration_keys_are_named(tmp_path, settings, message):
    path = write_config(tmp_path / "bad.yaml", settings)
    with pytest.raises(TrainingConfigError, match=message):
        load_recipe_config(MuscleSettings, "muscle", "tiny", path)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(TrainingConfigError, match="no preset 'huge'"):
        load_recipe_config(MuscleSettings, "muscle", "huge")
