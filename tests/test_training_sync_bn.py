"""Synchronised BatchNorm on any backend: in one process it is nn.BatchNorm; across torchrun ranks (gloo, CPU)
it normalises as one process over the concatenated batch; the MUSCLE supervised stage on two ranks ends with
the weights of one process with the same global batch."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from training_fixtures import MEDHUB, rank_results, torchrun, write_config, xray_manifest

from training.config import load_recipe_config
from training.distributed import DistInfo
from training.launch import seed_everything, train
from training.recipes.muscle import MuscleRecipe, MuscleSettings
from training.sync_batchnorm import AllReduceBatchNorm, convert_sync_batchnorm, set_synchronised

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _affine(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    return layer


def _forward_backward(layer: nn.Module, inputs: torch.Tensor, loss_weights: torch.Tensor):
    layer.zero_grad()
    inputs = inputs.clone().requires_grad_()
    out = layer(inputs)
    (out * loss_weights).sum().backward()
    return out.detach(), inputs.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    "cls, shape",
    [
        (nn.BatchNorm1d, (8, 3)),
        (nn.BatchNorm1d, (4, 3, 6)),
        (nn.BatchNorm2d, (6, 3, 5, 7)),
        (nn.BatchNorm3d, (3, 3, 4, 5, 6)),
    ],
)
def test_one_process_equals_batchnorm_outputs_gradients_and_running_statistics(cls, shape, momentum):
    torch.manual_seed(0)
    reference = _affine(cls(3, momentum=momentum))
    layer = AllReduceBatchNorm(3, momentum=momentum)
    layer.load_state_dict(reference.state_dict())
    for _ in range(3):
        inputs, loss_weights = torch.randn(shape) * 3 + 1, torch.randn(shape)
        for mine, expected in zip(
            _forward_backward(layer, inputs, loss_weights), _forward_backward(reference, inputs, loss_weights)
        ):
            torch.testing.assert_close(mine, expected, **TOLERANCE)
    assert list(layer.state_dict()) == list(reference.state_dict())
    torch.testing.assert_close(layer.running_mean, reference.running_mean, **TOLERANCE)
    torch.testing.assert_close(layer.running_var, reference.running_var, **TOLERANCE)
    assert int(layer.num_batches_tracked) == int(reference.num_batches_tracked) == 3
    layer.load_state_dict(reference.state_dict())
    layer.eval(), reference.eval()
    inputs = torch.randn(shape)
    assert torch.equal(layer(inputs), reference(inputs))  # eval: the running statistics, bit for bit


def test_one_value_per_channel_in_training_is_refused_as_by_batchnorm():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        AllReduceBatchNorm(3)(torch.randn(1, 3))


def test_conversion_keeps_parameters_buffers_keys_and_shared_layers():
    shared = nn.BatchNorm2d(4)
    network = nn.ModuleDict(
        {
            "a": nn.Sequential(nn.Conv2d(3, 4, 1), shared),
            "b": nn.Sequential(shared),
            "c": nn.BatchNorm1d(2, affine=False),
        }
    )
    network.eval()
    keys, tensors = list(network.state_dict()), list(network.state_dict(keep_vars=True).values())
    convert_sync_batchnorm(network)
    assert isinstance(network["a"][1], AllReduceBatchNorm) and network["a"][1] is network["b"][0]
    assert isinstance(network["c"], AllReduceBatchNorm) and network["c"].weight is None
    assert not network["a"][1].training
    assert list(network.state_dict()) == keys
    assert all(a is b for a, b in zip(network.state_dict(keep_vars=True).values(), tensors))
    set_synchronised(network, False)
    assert not network["a"][1].synchronised and not network["c"].synchronised


RANKS_CHECK = r"""
import json, os, sys
import torch
from torch import distributed as dist
from torch import nn
from training import distributed
from training.sync_batchnorm import AllReduceBatchNorm

def largest(difference):
    return float(difference.abs().max()) if difference.numel() else 0.0


info = distributed.init_distributed()
cases = {  # per-rank batch sizes: unequal, one sample on a rank, no sample on a rank
    "1d": (nn.BatchNorm1d, (1, 2), (), 0.1),
    "2d": (nn.BatchNorm2d, (2, 3), (5, 4), None),
    "3d": (nn.BatchNorm3d, (0, 2), (3, 4, 2), 0.1),
}
worst = {}
for name, (cls, sizes, tail, momentum) in cases.items():
    torch.manual_seed(0)  # the same full batches, weights and loss weights on every rank
    reference = cls(3, momentum=momentum)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2.0)
        reference.bias.uniform_(-1.0, 1.0)
    layer = AllReduceBatchNorm(3, momentum=momentum)
    layer.load_state_dict(reference.state_dict())
    mine = slice(sum(sizes[: info.rank]), sum(sizes[: info.rank + 1]))
    diffs = []
    for step in range(2):
        full, loss_weights = torch.randn(sum(sizes), 3, *tail) * 2 + 1, torch.randn(sum(sizes), 3, *tail)
        results = []
        for module, inputs in ((layer, full[mine]), (reference, full)):
            module.zero_grad()
            inputs = inputs.clone().requires_grad_()
            out = module(inputs)
            (out * loss_weights[mine] if module is layer else out * loss_weights).sum().backward()
            results.append((out.detach(), inputs.grad, module.weight.grad.clone(), module.bias.grad.clone()))
        (out, grad_in, grad_w, grad_b), (ref_out, ref_grad_in, ref_grad_w, ref_grad_b) = results
        dist.all_reduce(grad_w)  # a sum loss: the gradient over all samples is the sum over ranks
        dist.all_reduce(grad_b)
        diffs += [out - ref_out[mine], grad_in - ref_grad_in[mine], grad_w - ref_grad_w, grad_b - ref_grad_b]
    diffs += [layer.running_mean - reference.running_mean, layer.running_var - reference.running_var]
    worst[name] = max(largest(d) for d in diffs)
local, reference = AllReduceBatchNorm(3), nn.BatchNorm1d(3)
local.synchronised = False  # a stage with per-rank statistics (MoCo's shuffled BatchNorm)
inputs = torch.randn(4, 3) + info.rank
worst["per-rank"] = largest(local(inputs) - reference(inputs))
"""


@pytest.mark.slow
def test_two_ranks_with_unequal_batches_normalise_as_one_process_over_the_concatenated_batch(tmp_path):
    for worst in rank_results(tmp_path, RANKS_CHECK, result="worst"):
        assert set(worst) == {"1d", "2d", "3d", "per-rank"} and max(worst.values()) < 1e-5, worst


def _supervised_only(batch_size: int) -> dict:
    """No MoCo; 3 steps of one classification task (no dropout, a per-sample mean loss), default augmentation."""
    return {
        "engine": {"checkpoint_every": 100, "log_every": 1, "progress": False, "sync_bn": True},
        "moco": {"steps": 0},
        "continual": {
            "rounds": 1,
            "steps_per_task": 3,
            "optim": {"batch_size": batch_size},
            "tasks": [
                {"name": "nodule", "kind": "classification", "label": "nodule", "class_names": ["no nodule", "nodule"]}
            ],
        },
    }


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], parameters_only: bool = False) -> float:
    keys = [k for k in a if not (parameters_only and ("running_" in k or "num_batches_tracked" in k))]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


@pytest.mark.slow
def test_supervised_stage_on_two_ranks_ends_with_the_weights_of_one_process_with_the_same_global_batch(tmp_path):
    manifest = xray_manifest(tmp_path / "phantoms")  # 6 training images: 3 steps of 4 cross an epoch
    ranks_config = write_config(tmp_path / "ranks.yaml", _supervised_only(batch_size=2))
    done = torchrun(
        [
            "--no-python",
            MEDHUB,
            "train",
            "muscle",
            "--preset",
            "tiny",
            "--config",
            str(ranks_config),
            "--data",
            str(manifest),
            "--out",
            str(tmp_path / "ranks"),
            "--no-progress",
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]

    single_config = write_config(tmp_path / "single.yaml", _supervised_only(batch_size=4))
    settings = load_recipe_config(MuscleSettings, "muscle", "tiny", single_config)
    seed_everything(settings.seed)  # as `train` does: the initial weights of both runs
    initial = MuscleRecipe(settings, [manifest], DistInfo(0, 1, torch.device("cpu"), None)).encoder.state_dict()
    result = train("muscle", [manifest], tmp_path / "single", config_file=single_config, progress=False)
    assert result.completed and result.global_step == 3

    for repo in ("encoder", "nodule"):
        single = load_file(tmp_path / "single" / "repos" / repo / "model.safetensors")
        ranks = load_file(tmp_path / "ranks" / "repos" / repo / "model.safetensors")
        assert set(single) == set(ranks)
        assert _max_difference(single, ranks) <= 1e-5  # parameters and running statistics
    encoder = load_file(tmp_path / "single" / "repos" / "encoder" / "model.safetensors")
    assert set(encoder) == set(initial)
    assert _max_difference(encoder, initial, parameters_only=True) > 1e-4  # the runs did train
