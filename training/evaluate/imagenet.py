"""ImageNet study backbones, read offline and converted once into a `muscle` repo:
- `torchvision:resnet50[=FILE]`: the supervised ImageNet baseline of the benchmarking study (torchvision's original
  ImageNet-1k weights, as its torchvision 0.9 loaded them) from torch's hub cache or FILE, as `muscle-resnet50`;
- `timm:<name>[=FILE]`: a timm ResNet with torchvision's layout (a 7x7 stem, basic or bottleneck blocks; e.g.
  `resnet50.a1_in1k`) from timm's Hugging Face cache (`timm/<name>`), its torch hub file, or FILE, keeping the
  timm model's depths, widths, normalisation and input size."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import constants, try_to_load_from_cache
from safetensors.torch import load_file

from hub.catalogue import get_variant
from hub.convert.checkpoint import load_checkpoint, unwrap_state_dict
from hub.convert.resnet_ssl import convert_resnet50_ssl
from hub.export import Provenance, export_repo
from hub.export.checksums import sha256_file
from hub.models.muscle import MuscleConfig, MuscleModel
from hub.processing.processor import MedicalImageProcessor
from training.errors import TrainingConfigError

PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
# the weights file torchvision downloads for resnet50(weights="IMAGENET1K_V1") (the study's pretrained=True)
WEIGHTS_FILES = {"resnet50": "resnet50-0676ba61.pth"}
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a `timm/<name>` Hub repo
TIMM_BLOCKS = {"BasicBlock": "basic", "Bottleneck": "bottleneck"}


def imagenet_checkpoint(source: str) -> Path:
    """The local weights file of a `torchvision:<name>[=FILE]` backbone; a one-sentence error when it is absent."""
    name, _, file = source.removeprefix(PREFIX).partition("=")
    if name not in WEIGHTS_FILES:
        raise TrainingConfigError(
            f"backbone {source!r}: only {', '.join(PREFIX + n for n in WEIGHTS_FILES)} converts "
            "to a medhub encoder (muscle-resnet50)"
        )
    path = Path(file) if file else Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILES[name]
    if not path.is_file():
        raise TrainingConfigError(
            f"backbone {source!r}: no ImageNet weights at {path} (offline); fetch them once with "
            f"torchvision.models.{name}(weights='IMAGENET1K_V1') or name a file as "
            f"{PREFIX}{name}=FILE"
        )
    return path


def _write_once(folder: Path, write: Callable[[Path], Path]) -> Path:
    """`folder` holding a repo that `write(partial_folder)` exports, written once (atomically renamed)."""
    if not (folder / "config.json").is_file():
        partial = folder.with_name(f"{folder.name}.{os.getpid()}")
        write(partial)
        os.replace(partial, folder)
    return folder


def imagenet_repo(source: str, folder: Path) -> Path:
    """`folder` holding the converted repo of a `torchvision:` backbone, written once."""
    return _write_once(
        folder,
        lambda partial: convert_resnet50_ssl(
            imagenet_checkpoint(source), partial, license="bsd-3-clause", overwrite=True
        ),
    )


def _timm(source: str):
    """The timm module (the `timm` extra), or a one-sentence error naming the extra to install."""
    try:
        import timm
    except ImportError:
        raise TrainingConfigError(f"backbone {source!r} needs timm: pip install 'medhub[timm]'") from None
    return timm


def timm_checkpoint(source: str) -> Path:
    """The local weights file of a `timm:<name>[=FILE]` backbone: FILE, else the `timm/<name>` repo's weights in
    the Hugging Face cache, else the file timm's pretrained config downloads into torch's hub cache; a
    one-sentence error naming the file expected when none is there (nothing is downloaded)."""
    timm = _timm(source)

    name, _, file = source.removeprefix(TIMM_PREFIX).partition("=")
    if not timm.is_model(name):
        raise TrainingConfigError(f"backbone {source!r}: timm {timm.__version__} has no model named {name!r}")
    if file:
        if not Path(file).is_file():
            raise TrainingConfigError(f"backbone {source!r}: no timm weights file at {file}")
        return Path(file)
    config = timm.models.get_pretrained_cfg(name)
    hub_id = config.hf_hub_id if config else None
    for filename in TIMM_FILES if hub_id else ():
        cached = try_to_load_from_cache(hub_id, filename)
        if isinstance(cached, str):
            return Path(cached)
    url_file = (
        Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(config.url) if config and config.url else None
    )
    if url_file is not None and url_file.is_file():
        return url_file
    if hub_id:
        expected = (
            Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "snapshots" / "*" / TIMM_FILES[0]
        )
    elif url_file is not None:
        expected = url_file
    else:
        raise TrainingConfigError(
            f"backbone {source!r}: timm names no pretrained weights for {name!r}; name a file "
            f"as {TIMM_PREFIX}{name}=FILE"
        )
    raise TrainingConfigError(
        f"backbone {source!r}: no timm weights (offline) at {expected}; fetch them once with "
        f"timm.create_model({name!r}, pretrained=True) or name a file as {TIMM_PREFIX}{name}=FILE"
    )


def _timm_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return unwrap_state_dict(load_checkpoint(path), path, ("state_dict", "model"))


def muscle_config_of(network: torch.nn.Module, source: str, image_size: int) -> MuscleConfig:
    """The `muscle` config with a timm ResNet's layout; a one-sentence error for other timm architectures."""
    from timm.models.resnet import ResNet

    block = type(network.layer1[0]).__name__ if isinstance(network, ResNet) else None
    if block not in TIMM_BLOCKS or not isinstance(network.conv1, torch.nn.Conv2d):
        raise TrainingConfigError(
            f"backbone {source!r}: medhub converts timm ResNets with torchvision's layout (a 7x7 stem, basic or "
            f"bottleneck blocks), not a {type(network).__name__}"
        )
    stages = [getattr(network, f"layer{i}") for i in range(1, 5)]
    return MuscleConfig(
        stem_width=network.conv1.out_channels,
        hidden_sizes=[stage[0].conv1.out_channels for stage in stages],
        depths=[len(stage) for stage in stages],
        block_type=TIMM_BLOCKS[block],
        image_size=image_size,
    )


def convert_timm(source: str, checkpoint: Path, out_dir: Path) -> Path:
    """Export a timm ResNet's weights (`checkpoint`) as a `muscle` repo whose pooled features are timm's."""
    timm = _timm(source)

    name = source.removeprefix(TIMM_PREFIX).partition("=")[0]
    network = timm.create_model(name, pretrained=False).eval()
    try:
        network.load_state_dict(_timm_state(checkpoint))
    except RuntimeError as error:
        detail = str(error).splitlines()[-1].strip()
        raise TrainingConfigError(
            f"backbone {source!r}: {checkpoint} does not hold timm {name} weights ({detail})"
        ) from None
    timm_config = timm.models.get_pretrained_cfg(name)
    spec = get_variant("muscle-resnet50").processor_spec()  # X-ray handling; timm's normalisation and input size
    if timm_config is not None:
        size = timm_config.input_size[-1]
        spec.update(
            image_mean=list(timm_config.mean),
            image_std=list(timm_config.std),
            size=[size, size],
            resize=[round(size / timm_config.crop_pct)] * 2,
        )
    encoder = MuscleModel(muscle_config_of(network, source, spec["size"][-1])).eval()
    state = {key: value for key, value in network.state_dict().items() if not key.startswith("fc.")}
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    try:
        encoder.load_state_dict(state, strict=True)
        with torch.no_grad():
            same = torch.allclose(
                encoder(pixel_values=probe).pooler_output.flatten(1),
                network.forward_head(network.forward_features(probe), pre_logits=True),
                atol=1e-4,
            )
    except RuntimeError:
        same = False
    if not same:
        raise TrainingConfigError(
            f"backbone {source!r}: timm {name} is not a ResNet with torchvision's layout (its weights or features "
            f"differ from the medhub ResNet built with the same depths and widths)"
        )
    digest = sha256_file(checkpoint)
    provenance = Provenance(
        kind="converted",
        description=f"converted from timm `{name}` weights `{checkpoint.name}` (sha256 `{digest}`)",
        license=(timm_config.license if timm_config is not None and timm_config.license else "other"),
        training_data="See the timm release of these weights; medhub did not train them.",
        details={"timm_model": name, "file": checkpoint.name, "sha256": digest},
    )
    return export_repo(
        encoder,
        out_dir,
        variant=f"timm-{name}",
        provenance=provenance,
        processor=MedicalImageProcessor(**spec),
        modality="xray",
        overwrite=True,
    )


def timm_repo(source: str, folder: Path) -> Path:
    """`folder` holding the converted repo of a `timm:` backbone, written once."""
    return _write_once(folder, lambda partial: convert_timm(source, timm_checkpoint(source), partial))
