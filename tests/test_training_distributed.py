"""torchrun (gloo, CPU): the tiny MUSCLE, MACL and MedCoSS recipes end to end, and MoCo's cross-process parts."""

import json

import pytest
from training_fixtures import MICRO_MUSCLE, rank_results, train_on_two_ranks, write_config, xray_manifest

from hub.data.phantoms import generate
from hub.export import verify_repo
from training import checkpoint

QUEUE_CHECK = r"""
import json, os, sys
from types import SimpleNamespace
import torch
from torch import nn
from training import distributed
from training.moco import Moco


class Encoder(nn.Module):  # conv + BatchNorm + pooling: what shuffled BN is about, without importing transformers
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64)

    def forward(self, pixel_values):
        return SimpleNamespace(pooler_output=self.bn(self.conv(pixel_values)).mean(dim=(2, 3)))


info = distributed.init_distributed()
torch.manual_seed(0)  # same initial weights and queue on every rank
moco = Moco(Encoder(), 64, 32, 16, queue_size=16, momentum=0.99, temperature=0.2)
with torch.no_grad():  # non-trivial running statistics
    moco.encoder_k.bn.running_mean.uniform_(-1, 1)
    moco.encoder_k.bn.running_var.uniform_(0.5, 2)
generator = torch.Generator().manual_seed(100 + info.rank)  # each rank its own images
images = torch.randn(3, 3, 16, 16, generator=generator)
moco.eval()  # running statistics: keys then do not depend on which rank's batch the sample was shuffled into
local, gathered = moco.keys(images, shuffle_bn=True)
direct = moco._key(images)
moco.enqueue(gathered)
result = {
    "rank": info.rank,
    "local_matches_direct": bool(torch.allclose(local, direct, atol=1e-6)),
    "local": local.tolist(),
    "queue": moco.queue[:, :6].T.tolist(),
    "pointer": int(moco.queue_pointer),
}
"""


@pytest.mark.slow
def test_keys_from_every_rank_enter_the_queue_once_and_identically(tmp_path):
    ranks = rank_results(tmp_path, QUEUE_CHECK)
    assert all(r["local_matches_direct"] for r in ranks)  # shuffled-BN keys come back to their own samples
    assert ranks[0]["queue"] == ranks[1]["queue"] and ranks[0]["pointer"] == ranks[1]["pointer"] == 6
    import torch

    queue = torch.tensor(ranks[0]["queue"])
    expected = torch.tensor(ranks[0]["local"] + ranks[1]["local"])  # rank order, each key once
    torch.testing.assert_close(queue, expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_torchrun_with_two_processes_trains_and_exports_the_tiny_recipe(tmp_path):
    manifest = xray_manifest(tmp_path / "phantoms")
    config = write_config(tmp_path / "micro.yaml", MICRO_MUSCLE)
    run = tmp_path / "run"
    done = train_on_two_ranks("muscle", manifest, run, "--config", str(config))
    assert done.stdout.count(f"exported {run / 'repos' / 'encoder'}") == 1  # rank 0 exports, once
    assert {p.name for p in (run / "repos").iterdir()} == {"encoder", "nodule", "lungs"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == list(range(1, 12))
    assert records[0]["samples_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, phantoms, repo",
    [
        ("macl", {"n_xray": 0, "n_ct": 2}, "macl"),
        ("medcoss", {"n_xray": 8, "n_ct": 0}, "medcoss"),
    ],
)
def test_torchrun_with_two_processes_trains_and_exports_the_tiny_macl_and_medcoss_recipes(
    tmp_path, recipe, phantoms, repo
):
    manifest = generate(tmp_path / "phantoms", seed=0, n_mri=0, n_pathology=0, progress=False, **phantoms)
    run = tmp_path / "run"
    done = train_on_two_ranks(recipe, manifest, run)
    assert done.stdout.count(f"exported {run / 'repos' / repo}") == 1  # rank 0 exports, once
    verify_repo(run / "repos" / repo)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["global_step"] == checkpoint.load(run / "checkpoint.pt")["global_step"] > 1
