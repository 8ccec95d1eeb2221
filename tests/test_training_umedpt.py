"""The UMedPT recipe: encoder gradients summed over the tasks of a step, heads stepped by their own task only,
the gradient relay, configuration errors, and a tiny run that resumes exactly and exports verifiable repos."""

from dataclasses import replace

import pytest
import torch
from training_fixtures import write_config, xray_manifest
from transformers import AutoModelForSemanticSegmentation

from hub.export import verify_repo
from training import checkpoint
from training.config import build, load_recipe_config
from training.distributed import DistInfo
from training.engine import Engine, make_optimizer, warmup_cosine
from training.errors import TrainingConfigError
from training.launch import train
from training.recipes.umedpt import UmedptRecipe, UmedptSettings, relay_gradients
from training.tasks import TaskSettings

CPU = DistInfo(0, 1, torch.device("cpu"), None)
MICRO = {
    "steps": 3,
    "lr_factor_tasks": 2.0,
    "engine": {"checkpoint_every": 100, "log_every": 1, "progress": False},
    "optim": {"batch_size": 2},
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return xray_manifest(tmp_path_factory.mktemp("phantoms"), n_xray=6)


@pytest.fixture
def micro(tmp_path):
    return load_recipe_config(UmedptSettings, "umedpt", "tiny", write_config(tmp_path / "micro.yaml", MICRO))


SEGMENTATION = {"kind": "segmentation", "class_names": ["background", "lung", "nodule"]}
TWO_SEGMENTATION_TASKS = [
    {"name": "lungs", **SEGMENTATION},
    {"name": "lungs-again", **SEGMENTATION},  # its own head conv (another init) on the shared decoder
    {"name": "nodule", "kind": "classification", "label": "nodule", "class_names": ["no nodule", "nodule"]},
]


def _flat(gradients, parameters):
    """One vector of a parameter list's gradients, zeros where a parameter got none."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gradients, parameters)])


@pytest.mark.parametrize(
    ("tasks", "loss_scale"),
    [(None, None), (None, 4096.0), (TWO_SEGMENTATION_TASKS, None)],
    ids=["one-task-per-kind", "loss-scaled", "two-tasks-share-the-decoder"],
)
def test_one_step_sums_the_shared_gradients_of_all_tasks_and_steps_each_head_on_its_own_task(
    micro, manifest, tmp_path, monkeypatch, tasks, loss_scale
):
    if loss_scale is not None:  # the GPU path's arithmetic on CPU: the stage's and the engine's scalers both scale
        real = torch.amp.GradScaler
        monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real("cpu", init_scale=loss_scale))
    if tasks is not None:
        micro = replace(micro, tasks=[build(TaskSettings, t) for t in tasks])
    recipe = UmedptRecipe(micro, [manifest], CPU)
    stage = recipe.stages()[0]
    shared, heads = stage.parameters(), stage.head_parameters
    assert len(heads) == 3 and all(heads)
    if tasks is not None:  # the two segmentation tasks share one decoder, which the shared optimiser steps
        assert recipe.tasks[0].model.decoder is recipe.tasks[1].model.decoder
        assert {id(p) for p in recipe.tasks[0].model.decoder.parameters()} <= {id(p) for p in shared}
    start = [[p.detach().clone() for p in head] for head in heads]
    # each task's gradients computed separately, in the order (and RNG draws) of the step
    torch.manual_seed(0)
    per_task_shared, per_task_head = [], []
    for index in range(3):
        recipe.network.zero_grad(set_to_none=True)
        stage.task_loss(index, 0).backward()
        per_task_shared.append([None if p.grad is None else p.grad.clone() for p in shared])
        per_task_head.append([p.grad.clone() for p in heads[index]])
        others = [p for other, head in enumerate(heads) if other != index for p in head]
        assert all(p.grad is None for p in others)  # a task's loss never reaches another task's head
    recipe.network.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    result = Engine(tmp_path / "run", micro.engine, CPU).run(recipe, stop_after=1)
    assert result.global_step == 1 and not result.completed
    if loss_scale is not None:
        assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["scaler"]["scale"] == loss_scale

    worst = 0.0
    for position, parameter in enumerate(shared):
        grads = [g[position] for g in per_task_shared if g[position] is not None]
        if not grads:
            assert parameter.grad is None  # Swin's final norm is kept but unused
            continue
        worst = max(worst, float((parameter.grad - sum(grads)).abs().max()))
    assert worst <= 1e-6
    summed = _flat([p.grad for p in shared], shared)
    for single in per_task_shared:  # the sum really mixes the three tasks
        assert float((summed - _flat(single, shared)).abs().max()) > 1e-4

    head_optim = replace(micro.optim, lr=micro.optim.lr * micro.lr_factor_tasks)
    for head, initial, gradients in zip(heads, start, per_task_head):
        expected = [torch.nn.Parameter(p.clone()) for p in initial]
        for parameter, gradient in zip(expected, gradients):
            parameter.grad = gradient
        optimizer = make_optimizer(expected, head_optim)
        torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(micro.steps, micro.optim.warmup_steps, 0.0))
        optimizer.step()
        for parameter, want in zip(head, expected):
            torch.testing.assert_close(parameter.detach(), want.detach(), rtol=0, atol=1e-7)
        assert any(not torch.equal(p.detach(), b) for p, b in zip(head, initial))
        assert all(p.grad is None for p in head)  # dropped right after the head's own step


def test_the_relay_hands_each_parameter_its_unscaled_gradient_times_the_incoming_one():
    first, second, idle = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    first.grad, second.grad = torch.full((3,), 8.0), torch.tensor([4.0, -2.0, 0.5])
    out = relay_gradients(torch.tensor(1.5), [first, second, idle], scale=4.0)
    assert out.item() == 1.5 and first.grad is None and second.grad is None
    (out * 2.0).backward()
    assert first.grad.tolist() == [4.0] * 3 and second.grad.tolist() == [2.0, -1.0, 0.25] and idle.grad is None


def test_bad_task_settings_fail_before_training(micro, manifest):
    micro.tasks[0].label = None
    with pytest.raises(TrainingConfigError, match="'nodule-classification': classification needs `label`"):
        UmedptRecipe(micro, [manifest], CPU)
    micro.tasks[0].label, micro.tasks[2].kind = "nodule", "keypoints"
    with pytest.raises(TrainingConfigError, match="kind 'keypoints' is not one of"):
        UmedptRecipe(micro, [manifest], CPU)
    micro.tasks[2].kind, micro.tasks[2].name = "detection", "lung-segmentation"
    with pytest.raises(TrainingConfigError, match="task names must be unique"):
        UmedptRecipe(micro, [manifest], CPU)
    micro.tasks[2] = build(
        TaskSettings, {"name": "narrow", **SEGMENTATION, "head": {"decoder_channels": [16, 16, 8, 8]}}
    )
    with pytest.raises(
        TrainingConfigError, match="task 'narrow': block 'decoder' differs in shape from task 'lung-segmentation'"
    ):
        UmedptRecipe(micro, [manifest], CPU)
    micro.tasks[2].head = {}
    micro.shared_blocks = {"segmentation": ["decoder.stem"]}
    with pytest.raises(
        TrainingConfigError, match="model has no block 'decoder.stem' to share; fix shared_blocks.segmentation"
    ):
        UmedptRecipe(micro, [manifest], CPU)
    micro.shared_blocks = {"keypoints": []}
    with pytest.raises(TrainingConfigError, match=r"shared_blocks: unknown task kind\(s\) \['keypoints'\]"):
        UmedptRecipe(micro, [manifest], CPU)


def test_presets_follow_the_authors_optimiser_defaults():
    paper = load_recipe_config(UmedptSettings, "umedpt", "paper")
    tiny = load_recipe_config(UmedptSettings, "umedpt", "tiny")
    assert paper.variant == "umedpt-swinv2-t" and tiny.variant == "umedpt-tiny"
    assert (paper.optim.optimizer, paper.optim.lr, paper.optim.weight_decay, paper.lr_factor_tasks) == (
        "adamw",
        1e-4,
        1e-2,
        1.0,
    )
    assert [t.kind for t in tiny.tasks] == ["classification", "segmentation", "detection"]
    assert tiny.shared_blocks == {"segmentation": ["decoder"], "detection": ["fpn", "head.cls_tower", "head.reg_tower"]}


@pytest.mark.slow
def test_a_stopped_and_resumed_run_ends_with_the_uninterrupted_weights_and_exports_verifiable_repos(manifest, tmp_path):
    config = write_config(tmp_path / "micro.yaml", MICRO)
    full = train("umedpt", [manifest], tmp_path / "full", config_file=config)
    assert full.completed and full.global_step == 3
    run = tmp_path / "resumed"
    assert not train("umedpt", [manifest], run, config_file=config, stop_after=1).completed
    assert not train("umedpt", [manifest], run, config_file=config, resume=True, stop_after=1).completed
    resumed = train("umedpt", [manifest], run, config_file=config, resume=True)
    assert resumed.completed
    expected, actual = (checkpoint.load(r / "checkpoint.pt") for r in (tmp_path / "full", run))
    assert [k for k in expected["network"] if not torch.equal(expected["network"][k], actual["network"][k])] == []
    assert actual["stage_state"]["head_optimizers"][0]["state"][0]["step"] == 3
    names = ["encoder", "nodule-classification", "lung-segmentation", "nodule-detection"]
    assert [p.name for p in resumed.exported] == names
    for repo in resumed.exported:
        verify_repo(repo)
    segmenter = AutoModelForSemanticSegmentation.from_pretrained(run / "repos" / "lung-segmentation")
    assert segmenter.config.id2label == {0: "background", 1: "lung", 2: "nodule"}
    trained = {k.removeprefix("encoder."): v for k, v in actual["network"].items() if k.startswith("encoder.")}
    assert all(torch.equal(v, trained[k]) for k, v in segmenter.umedpt.state_dict().items())
