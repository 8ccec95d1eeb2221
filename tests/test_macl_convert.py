"""`medhub convert macl`: a checkpoint with the authors' key names converts exactly and reproduces their network."""

import json

import torch
from torch import nn
from transformers import AutoModel

from hub.export import verify_repo, weights_metadata
from hub.models.macl import MaclForPreTraining

F_ = 4  # a narrow network keeps the test fast; the converter reads F from the checkpoint


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU())


class SourceUNet(nn.Module):
    """The authors' released network, with its module names (`{"net": state_dict()}`)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        widths = [F_ * 2**i for i in range(5)]
        self.share_encoder = nn.Module()
        cin = in_channels
        for stage in range(4):
            setattr(self.share_encoder, f"contr_{stage + 1}_1", _block(cin, widths[stage]))
            setattr(self.share_encoder, f"contr_{stage + 1}_2", _block(widths[stage], widths[stage]))
            cin = widths[stage]
        self.share_encoder.center = nn.Sequential(
            nn.Conv2d(widths[3], widths[4], 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(widths[4], widths[4], 3, padding=1),
            nn.ReLU(),
        )
        self.online_decoder = nn.Module()
        for level in (4, 3, 2, 1):
            setattr(
                self.online_decoder,
                f"upscale{level + 1}",
                nn.ConvTranspose2d(widths[level], widths[level - 1], 2, stride=2),
            )
            setattr(self.online_decoder, f"expand_{level}_1", _block(widths[level], widths[level - 1]))
            setattr(self.online_decoder, f"expand_{level}_2", _block(widths[level - 1], widths[level - 1]))
        self.target_instance_projector = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[4], widths[2]), nn.ReLU(), nn.Linear(widths[2], 128)
        )
        self.online_instance_projector = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[2], widths[2]), nn.ReLU(), nn.Linear(widths[2], 128)
        )
        self.target_pixel_projector = nn.Sequential(*_block(widths[4], widths[2]), *_block(widths[2], widths[2]))
        for module in self.modules():  # non-trivial BatchNorm statistics, so eval-mode outputs depend on them
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips, e = [], self.share_encoder
        for stage in range(1, 5):
            x = getattr(e, f"contr_{stage}_2")(getattr(e, f"contr_{stage}_1")(x))
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        return skips + [e.center(x)]

    def decode(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs, x, d = [], maps[-1], self.online_decoder
        for level in (4, 3, 2, 1):
            x = torch.cat([getattr(d, f"upscale{level + 1}")(x), maps[level - 1]], dim=1)
            x = getattr(d, f"expand_{level}_2")(getattr(d, f"expand_{level}_1")(x))
            outputs.append(x)
        return outputs


def _checkpoint(tmp_path, in_channels: int = 1, extra: dict | None = None):
    torch.manual_seed(0)
    source = SourceUNet(in_channels).eval()
    path = tmp_path / "MACL_CHD.pth"
    torch.save({"net": {**source.state_dict(), **(extra or {})}}, path)
    return source, path


def test_converted_repo_loads_every_key_and_reproduces_the_source_network(tmp_path, cli):
    source, path = _checkpoint(tmp_path)
    result = cli("convert", "macl", path, "--out", tmp_path / "repo", "--repo-id", "org/macl-chd")
    assert result.code == 0, result.err
    model, info = MaclForPreTraining.from_pretrained(tmp_path / "repo", output_loading_info=True)
    assert all(not keys for keys in info.values()), info
    model.eval()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_maps = source.encode(x)
        maps = model.macl.encoder(x)
        for got, want in zip(maps + model.decoder(maps), expected_maps + source.decode(expected_maps)):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
        torch.testing.assert_close(
            model.target_pixel_projector(maps[-1]), source.target_pixel_projector(expected_maps[-1])
        )
        torch.testing.assert_close(
            model.target_instance_projector(maps[-1]), source.target_instance_projector(expected_maps[-1])
        )
        stage2 = source.decode(expected_maps)[1]
        torch.testing.assert_close(model.online_instance_projector(stage2), source.online_instance_projector(stage2))
    encoder = AutoModel.from_pretrained(tmp_path / "repo")
    torch.testing.assert_close(encoder(x).pooler_output, expected_maps[-1].mean(dim=(2, 3)), rtol=0, atol=2e-5)
    source_info = json.loads(weights_metadata(tmp_path / "repo" / "model.safetensors")["source"])
    assert (
        len(source_info["details"]["sha256"]) == 64
        and "all rights reserved" in source_info["details"]["upstream_license"]
    )
    card = (tmp_path / "repo" / "README.md").read_text()
    assert source_info["details"]["sha256"] in card and "ask the" in card
    assert verify_repo(tmp_path / "repo").files_checked == 8  # every file but checksums.sha256


def test_brats_weights_keep_four_channels_or_collapse_exactly_to_one(tmp_path, cli):
    source, path = _checkpoint(tmp_path, in_channels=4)
    assert cli("convert", "macl", path, "--out", tmp_path / "keep", "--task", "encoder").code == 0
    kept = AutoModel.from_pretrained(tmp_path / "keep").eval()
    processor = json.loads((tmp_path / "keep" / "preprocessor_config.json").read_text())
    assert kept.config.num_channels == 4 and processor["in_channels"] == 4 and processor["modality"] == "mri"
    assert cli("convert", "macl", path, "--out", tmp_path / "one", "--task", "encoder", "--in-channels", "1").code == 0
    collapsed = AutoModel.from_pretrained(tmp_path / "one").eval()
    grey = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        expected = source.encode(grey.repeat(1, 4, 1, 1))[-1]
        torch.testing.assert_close(kept(grey.repeat(1, 4, 1, 1)).last_hidden_state, expected, rtol=0, atol=2e-5)
        torch.testing.assert_close(collapsed(grey).last_hidden_state, expected, rtol=1e-4, atol=1e-4)


def test_unknown_and_missing_keys_are_refused_naming_the_key(tmp_path, cli):
    _, path = _checkpoint(tmp_path, extra={"momentum_encoder.weight": torch.zeros(1)})
    result = cli("convert", "macl", path, "--out", tmp_path / "a")
    assert result.code != 0 and "momentum_encoder.weight" in result.err
    source = SourceUNet()
    state = {k: v for k, v in source.state_dict().items() if k != "online_decoder.upscale2.bias"}
    torch.save({"net": state}, tmp_path / "partial.pth")
    result = cli("convert", "macl", tmp_path / "partial.pth", "--out", tmp_path / "b")
    assert result.code != 0 and "decoder.upscale2.bias" in result.err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
