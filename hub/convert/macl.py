"""The authors' MACL checkpoints (`MACL_CHD.pth`, `MACL_BraTS.pth`, `MACL_KiTS.pth`) -> a `macl` repo.

The files hold `{"net": state_dict}` of `UNet2D_classification_MACL`: `share_encoder.*` becomes the encoder
(`encoder.*`), `online_decoder.*` the decoder (`decoder.*`); the three projectors keep their names. `--task
pretraining` (default) keeps everything, so `AutoModelForSemanticSegmentation` gets the pre-trained decoder too;
`--task encoder` writes the encoder only. Every key must be mapped and every model key filled, or the conversion
fails naming the key.

BraTS policy: its first convolution takes 4 channels (the MRI sequences). `--in-channels keep` (default) keeps
them and declares `in_channels: 4` with the `repeat` channel policy, which is how the authors fine-tune it on
single-channel data. `--in-channels 1` sums the first convolution's weights over the input channels: for a grey
image repeated 4 times the output is the same, and the repo takes 1 channel.
"""

import argparse
from pathlib import Path

import torch

from hub.catalogue import get_variant
from hub.errors import ConversionError
from hub.export.repo import export_repo
from hub.models.macl import MaclForPreTraining, MaclModel
from hub.processing.processor import MedicalImageProcessor

from .checkpoint import check_shapes, load_checkpoint, unwrap_state_dict
from .provenance import converted_provenance
from .registry import Converter

WRAPPERS = ("net", "state_dict", "model")
RENAMES = {"share_encoder.": "macl.encoder.", "online_decoder.": "decoder."}
PROJECTORS = ("target_instance_projector.", "online_instance_projector.", "target_pixel_projector.")
FIRST_CONV = "share_encoder.contr_1_1.0.weight"
TASKS = ("pretraining", "encoder")
UPSTREAM_LICENSE = (
    "none published (no LICENSE file upstream: all rights reserved; ask the authors before redistributing)"
)


def upstream_to_medhub(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Rename upstream keys to `MaclForPreTraining` keys; refuse any key outside the known modules."""
    state = {}
    for key, value in tensors.items():
        key = key.removeprefix("module.")
        old = next((prefix for prefix in RENAMES if key.startswith(prefix)), None)
        if old is not None:
            state[RENAMES[old] + key.removeprefix(old)] = value
        elif key.startswith(PROJECTORS):
            state[key] = value
        else:
            raise ConversionError(
                f"checkpoint {path} has key {key}, which is not part of the MACL U-Net or its projectors"
            )
    return state


def _collapse_first_conv(state: dict[str, torch.Tensor]) -> None:
    key = RENAMES["share_encoder."] + FIRST_CONV.removeprefix("share_encoder.")
    state[key] = state[key].sum(dim=1, keepdim=True)


def convert_macl(
    checkpoint: Path,
    out_dir: Path,
    *,
    task: str = "pretraining",
    in_channels: str = "keep",
    repo_id: str | None = None,
    license: str = "other",
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    checkpoint = Path(checkpoint)
    if task not in TASKS:
        raise ConversionError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    tensors = unwrap_state_dict(load_checkpoint(checkpoint), checkpoint, WRAPPERS)
    first = tensors.get(FIRST_CONV, tensors.get("module." + FIRST_CONV))
    if first is None or first.ndim not in (4, 5):
        raise ConversionError(
            f"checkpoint {checkpoint} has no MACL encoder (key {FIRST_CONV} with a 2D or 3D conv weight)"
        )
    state = upstream_to_medhub(tensors, checkpoint)
    source_channels = int(first.shape[1])
    if in_channels == "1" and source_channels > 1:
        _collapse_first_conv(state)
    elif in_channels not in ("keep", "1"):
        raise ConversionError(f"--in-channels {in_channels!r} is not one of keep, 1")
    spatial_dims = first.ndim - 2
    variant = get_variant("macl-unet2d" if spatial_dims == 2 else "macl-unet3d")
    num_channels = 1 if in_channels == "1" else source_channels
    config = variant.build_config(num_channels=num_channels, base_filters=int(first.shape[0]))
    model = _load(MaclForPreTraining(config), state, checkpoint)
    if task == "encoder":
        model = _load(
            MaclModel(config),
            {k.removeprefix("macl."): v for k, v in state.items() if k.startswith("macl.")},
            checkpoint,
        )
    modality = "mri" if source_channels == 4 else variant.modality
    processor = MedicalImageProcessor(**{**variant.processor_spec(), "modality": modality, "in_channels": num_channels})
    provenance = converted_provenance(
        checkpoint,
        "macl",
        licence_note=UPSTREAM_LICENSE,
        license=license,
        training_data=(
            "The authors' MACL pre-training on unlabelled slices: CHD (cardiac CT, 17,525 slices), BraTS 2018 "
            "(brain MRI, 39,064 slices, 4 sequences as channels) or KiTS 2019 (kidney CT, 32,332 slices), "
            "depending on the converted file. medhub did not train these weights."
        ),
        base_model=base_model,
        upstream_license=UPSTREAM_LICENSE,
        task=task,
        source_in_channels=str(source_channels),
        in_channels_policy=in_channels,
    )
    return export_repo(
        model,
        out_dir,
        variant=variant.id,
        provenance=provenance,
        processor=processor,
        modality=modality,
        repo_id=repo_id,
        overwrite=overwrite,
    )


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise ConversionError(f"checkpoint {path} has no tensor for {missing[0]} ({len(missing)} missing)")
    check_shapes(state, expected, path)
    model.load_state_dict({key: state[key] for key in expected}, strict=True)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="pretraining",
        help="pretraining: encoder, decoder and projectors (default); encoder: the encoder only",
    )
    parser.add_argument(
        "--in-channels",
        choices=("keep", "1"),
        default="keep",
        help="keep the checkpoint's input channels (default), or sum a 4-channel first conv into 1",
    )


CONVERTER = Converter(
    name="macl",
    help="the authors' MACL U-Net checkpoints ({'net': state_dict}: CHD, BraTS, KiTS)",
    default_license="other",
    convert=convert_macl,
    add_arguments=add_arguments,
    options=("task", "in_channels"),
)
