"""`medhub convert umedpt`: a zip of modules pickled under the authors' class paths converts without their package;
any other global in the zip is refused before it runs."""

import importlib.util
import io
import json
import os
import sys
import types
import zipfile

import pytest
import torch
from torch import nn
from transformers import AutoModel
from umedpt_fixtures import torchvision_swin_v2

from hub.convert.pickled_modules import read_module_zip
from hub.export import weights_metadata

UPSTREAM_MODULES = ("mmm", "mmm.mtl_modules", "mmm.mtl_modules.shared_blocks", "mmm.neural", "mmm.neural.modules")


def _upstream_classes() -> dict[str, type]:
    """Classes named like the authors' (`mmm.*`); registered in sys.modules only while pickling."""

    class SharedBlockConfig:  # the pydantic `args` object the framework stores on every block
        def __init__(self):
            self.module_name, self.norm_layer = "encoder", "affinelayernorm"

    class TorchVisionSwinformer(nn.Module):
        def __init__(self, swin):
            super().__init__()
            self.wrapped_model = swin

    class PyramidEncoder(nn.Module):
        def __init__(self, swin):
            super().__init__()
            self.args = SharedBlockConfig()
            self.model = TorchVisionSwinformer(swin)
            self.remapper = nn.ModuleDict()

    class Squeezer(nn.Module):
        def __init__(self, width, out):
            super().__init__()
            self.args = SharedBlockConfig()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.squeeze = nn.Sequential(nn.Conv2d(width, out, 1), nn.GroupNorm(1, out), nn.GELU())

    placement = {
        SharedBlockConfig: "mmm.mtl_modules.shared_blocks",
        PyramidEncoder: "mmm.mtl_modules.shared_blocks",
        Squeezer: "mmm.mtl_modules.shared_blocks",
        TorchVisionSwinformer: "mmm.neural.modules.swinformer",
    }
    for cls, module in placement.items():
        cls.__module__, cls.__qualname__ = module, cls.__name__
    return {cls.__name__: cls for cls in placement}


def _pickle(obj, module_names) -> bytes:
    modules = {name: types.ModuleType(name) for name in module_names}
    for cls in obj_classes(obj):
        setattr(modules[cls.__module__], cls.__name__, cls)
    sys.modules.update(modules)
    try:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()
    finally:
        for name in modules:
            del sys.modules[name]


def obj_classes(obj) -> set[type]:
    found = {type(m) for m in obj.modules() if type(m).__module__.startswith("mmm")}
    return found | {type(m.args) for m in obj.modules() if hasattr(m, "args")}


@pytest.fixture
def upstream_zip(tmp_path):
    torch.manual_seed(0)
    classes = _upstream_classes()
    swin = torchvision_swin_v2(embed_dim=16)
    del swin.head
    encoder = classes["PyramidEncoder"](swin).eval()
    squeezer = classes["Squeezer"](128, 32).eval()
    nn.init.normal_(squeezer.squeeze[1].weight)
    names = UPSTREAM_MODULES + ("mmm.neural.modules.swinformer",)
    path = tmp_path / "encoder-1.0.4.pt.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("encoder.pt", _pickle(encoder, names))
        archive.writestr("squeezer.pt", _pickle(squeezer, names))
        archive.writestr("imgnetclf.pt", _pickle(nn.Sequential(nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 10)), names))
    assert importlib.util.find_spec("mmm") is None
    return path, encoder, squeezer


def test_zip_of_pickled_modules_converts_without_the_authors_package(upstream_zip, tmp_path, cli):
    path, encoder, squeezer = upstream_zip
    modules = read_module_zip(path)
    assert "model.wrapped_model.features.0.0.weight" in modules["encoder"] and set(modules) == {
        "encoder",
        "squeezer",
        "imgnetclf",
    }
    result = cli("convert", "umedpt", path, "--out", tmp_path / "repo", "--accept-license")
    assert result.code == 0, result.err
    model = AutoModel.from_pretrained(tmp_path / "repo").eval()
    assert model.config.embed_dim == 16 and model.config.squeezer_channels == 32 and model.config.depths == [1, 1, 2, 1]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        last = encoder.model.wrapped_model.features(x).permute(0, 3, 1, 2)
        expected = squeezer.squeeze(squeezer.pool(last)).flatten(1)
        torch.testing.assert_close(model(x).pooler_output, expected, rtol=1e-5, atol=1e-5)
    details = json.loads(weights_metadata(tmp_path / "repo" / "model.safetensors")["source"])["details"]
    assert details["encoder_prefix"] == "model.wrapped_model." and details["skipped_modules"] == "imgnetclf"
    card = (tmp_path / "repo" / "README.md").read_text()
    assert details["sha256"] in card and "23209015.9" in card and "non-commercial" in card


def test_conversion_needs_the_licence_acknowledgement(upstream_zip, tmp_path, cli):
    result = cli("convert", "umedpt", upstream_zip[0], "--out", tmp_path / "repo")
    assert result.code != 0 and "--accept-license" in result.err and "non-commercial" in result.err


class Payload:
    """Pickles as a call of `function(argument)`: what a malicious checkpoint would run on load."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function", [os.system, eval])
def test_a_zip_with_any_other_global_is_refused_without_running_it(function, tmp_path, cli):
    marker = tmp_path / "executed"
    argument = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w')"
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(1), "payload": Payload(function, argument)}, buffer)
    path = tmp_path / "evil.pt.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("encoder.pt", buffer.getvalue())
    result = cli("convert", "umedpt", path, "--out", tmp_path / "repo", "--accept-license")
    name = "builtins.eval" if function is eval else f"{os.system.__module__}.system"
    assert result.code != 0 and f"global {name} is not allowed" in result.err, result.err
    assert not marker.exists() and not (tmp_path / "repo").exists()


@pytest.mark.parametrize("damage", ["bad crc", "truncated"])
def test_a_damaged_zip_is_one_line_and_exit_1(damage, upstream_zip, tmp_path, cli):
    data = bytearray(upstream_zip[0].read_bytes())
    if damage == "bad crc":
        with zipfile.ZipFile(upstream_zip[0]) as archive:
            info = archive.getinfo("encoder.pt")
        data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF  # inside the stored member's bytes
    else:
        data = data[: len(data) // 2]
    path = tmp_path / "damaged.pt.zip"
    path.write_bytes(bytes(data))
    result = cli("convert", "umedpt", path, "--out", tmp_path / "repo", "--accept-license")
    assert result.code == 1 and "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert str(path) in result.err and not (tmp_path / "repo").exists()
