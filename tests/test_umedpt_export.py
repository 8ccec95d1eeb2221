"""Every UMedPT variant exports, publishes to the cache and loads by id offline, with and without medhub."""

import pytest

VARIANTS = ("umedpt-tiny", "umedpt-swinv2-t")

CHECK = """
import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from transformers import AutoModel
for repo_id in {ids!r}:
    model = AutoModel.from_pretrained(repo_id{extra}).eval()
    golden = load_file(snapshot_download(repo_id) + "/golden.safetensors")
    with torch.no_grad():
        out = model(pixel_values=golden["pixel_values"]).pooler_output
    assert torch.allclose(out, golden["expected.pooler_output"], atol=1e-5), (repo_id, (out - golden["expected.pooler_output"]).abs().max())
    print(repo_id, type(model).__module__, tuple(golden["pixel_values"].shape))
"""


@pytest.mark.slow
def test_every_variant_loads_by_id_offline_with_and_without_medhub(tmp_path, hf_cache, cli, run_python):
    ids = [f"org/{variant}" for variant in VARIANTS]
    for variant, repo_id in zip(VARIANTS, ids):
        assert cli("init", variant, "--out", tmp_path / variant, "--repo-id", repo_id).code == 0
        assert cli("publish", tmp_path / variant, "--repo-id", repo_id, "--cache").code == 0
    with_medhub = run_python("import hub\n" + CHECK.format(ids=ids, extra=""))
    assert with_medhub.returncode == 0, with_medhub.stderr
    assert with_medhub.stdout.count("hub.models.umedpt.modeling_umedpt") == 2
    assert "org/umedpt-swinv2-t hub.models.umedpt.modeling_umedpt (1, 3, 256, 256)" in with_medhub.stdout
    blocked = "import sys\nsys.modules['hub'] = None\n" + CHECK.format(ids=ids, extra=", trust_remote_code=True")
    without_medhub = run_python(blocked, env={"HF_MODULES_CACHE": str(hf_cache.parent / "modules")})
    assert without_medhub.returncode == 0, without_medhub.stderr
    assert without_medhub.stdout.count(" transformers_modules.") == 2
