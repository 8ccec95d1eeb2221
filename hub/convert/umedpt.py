"""The authors' UMedPT release (`encoder-1.0.4.pt.zip`, a zip of pickled modules) -> a `umedpt` repo.

The zip is read with medhub's restricted unpickler (no import of the authors' package, no foreign code run). The
`encoder` member holds torchvision's Swin V2 under a wrapper prefix (likely `model.wrapped_model.`); its tensors map
onto `features.*` / `norm.*` by name. The `squeezer` member's 1x1 conv and GroupNorm are found by shape, since
their attribute names in the release are unknown. The Swin size, squeezer width and conv bias are read from the
tensors. Task heads and other members are listed in the metadata but not converted.

The weights are under the Fraunhofer non-commercial research licence (no redistribution; EPO patent application
23209015.9): the converter runs only with `--accept-license`, and the repo must stay private.
"""

import argparse
import re
from pathlib import Path

import torch

from hub.catalogue import get_variant
from hub.errors import ConversionError
from hub.export.repo import export_variant
from hub.models.umedpt import UmedptModel

from .checkpoint import check_shapes
from .pickled_modules import read_module_zip
from .provenance import converted_provenance
from .registry import Converter

VARIANT = "umedpt-swinv2-t"
STEM = "features.0.0.weight"
UPSTREAM_LICENSE = (
    "Fraunhofer MedicalMultitaskModeling licence for scientific non-commercial research purposes "
    "(no redistribution; patent applied for at the EPO, file number 23209015.9)"
)


def encoder_tensors(tensors: dict[str, torch.Tensor], label: str) -> tuple[dict[str, torch.Tensor], str]:
    """The Swin tensors with torchvision names: strip the wrapper prefix found before `features.0.0.weight`."""
    stems = [key for key in tensors if key.endswith(STEM)]
    if len(stems) != 1:
        raise ConversionError(f"{label} has {len(stems)} Swin stems ({STEM}); expected exactly one")
    prefix = stems[0][: -len(STEM)]
    outside = sorted(key for key in tensors if not key.startswith(prefix))
    if outside:
        raise ConversionError(f"{label} has tensor {outside[0]} outside the Swin backbone ({prefix!r})")
    state = {key.removeprefix(prefix): value for key, value in tensors.items()}
    return {key: value for key, value in state.items() if not key.startswith("head.")}, prefix


def squeezer_tensors(tensors: dict[str, torch.Tensor], width: int, label: str) -> dict[str, torch.Tensor]:
    """Map the squeezer's optional 1x1 conv and its GroupNorm onto `conv.*` / `norm.*` by shape."""
    state, rest = {}, dict(tensors)
    convs = [key for key, value in rest.items() if value.ndim == 4 and value.shape[1:] == (width, 1, 1)]
    if len(convs) > 1:
        raise ConversionError(f"{label} has {len(convs)} 1x1 convolutions; expected at most one")
    if convs:
        module = convs[0].rsplit(".", 1)[0]
        state["conv.weight"] = rest.pop(convs[0])
        if f"{module}.bias" in rest:
            state["conv.bias"] = rest.pop(f"{module}.bias")
    norms = sorted({key.rsplit(".", 1)[0] for key in rest if key.endswith(".weight")})
    if len(norms) != 1 or set(rest) != {f"{norms[0]}.weight", f"{norms[0]}.bias"}:
        raise ConversionError(
            f"{label} holds {sorted(rest)} besides the conv; medhub models only a GroupNorm (weight and bias) there"
        )
    state["norm.weight"], state["norm.bias"] = rest[f"{norms[0]}.weight"], rest[f"{norms[0]}.bias"]
    return state


def config_overrides(encoder: dict[str, torch.Tensor], squeezer: dict[str, torch.Tensor]) -> dict[str, object]:
    """The Swin size and squeezer settings that the tensors imply."""
    stem = encoder[STEM]
    stage_layers = (1, 3, 5, 7)
    depths = [
        len({m.group(1) for key in encoder if (m := re.match(rf"features\.{layer}\.(\d+)\.", key))})
        for layer in stage_layers
    ]
    heads = [int(encoder[f"features.{layer}.0.attn.logit_scale"].shape[0]) for layer in stage_layers]
    window = (int(encoder["features.1.0.attn.relative_coords_table"].shape[1]) + 1) // 2  # (1, 2w-1, 2w-1, 2)
    conv = squeezer.get("conv.weight")
    return {
        "num_channels": int(stem.shape[1]),
        "patch_size": int(stem.shape[2]),
        "embed_dim": int(stem.shape[0]),
        "depths": depths,
        "num_heads": heads,
        "window_size": window,
        "squeezer_channels": int(conv.shape[0]) if conv is not None else None,
        "squeezer_bias": "conv.bias" in squeezer,
    }


def convert_umedpt(
    checkpoint: Path,
    out_dir: Path,
    *,
    accept_license: bool = False,
    repo_id: str | None = None,
    license: str = "other",
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    checkpoint = Path(checkpoint)
    if not accept_license:
        raise ConversionError(
            f"the UMedPT weights are under the {UPSTREAM_LICENSE}; pass --accept-license to convert them"
        )
    modules = read_module_zip(checkpoint)
    for required in ("encoder", "squeezer"):
        if required not in modules:
            raise ConversionError(
                f"checkpoint {checkpoint} has no {required}.pt (members: {', '.join(sorted(modules))})"
            )
    encoder, prefix = encoder_tensors(modules["encoder"], f"{checkpoint.name}:encoder.pt")
    if not {STEM, "features.1.0.attn.logit_scale", "features.1.0.attn.relative_coords_table"} <= encoder.keys():
        raise ConversionError(f"checkpoint {checkpoint} encoder is not a Swin V2 backbone")
    last_width = int(encoder[STEM].shape[0]) * 8
    squeezer = squeezer_tensors(modules["squeezer"], last_width, f"{checkpoint.name}:squeezer.pt")
    variant = get_variant(VARIANT)
    model = UmedptModel(variant.build_config(**config_overrides(encoder, squeezer)))
    state = {**encoder, **{f"squeezer.{key}": value for key, value in squeezer.items()}}
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise ConversionError(
            f"checkpoint {checkpoint} does not match Swin V2 + squeezer: "
            f"{'missing' if missing else 'unexpected'} key {key}"
        )
    check_shapes(state, expected, checkpoint)
    model.load_state_dict(state, strict=True)
    skipped = sorted(set(modules) - {"encoder", "squeezer"})
    provenance = converted_provenance(
        checkpoint,
        "umedpt",
        licence_note=UPSTREAM_LICENSE,
        license=license,
        training_data=(
            "The authors' multi-task pre-training on biomedical classification, segmentation and detection tasks "
            "(including an ImageNet-1k classification task, whose head ships in the release); the exact task list "
            "is not published in a form we could read. medhub did not train these weights."
        ),
        base_model=base_model,
        upstream_license=UPSTREAM_LICENSE,
        encoder_prefix=prefix,
        skipped_modules=", ".join(skipped),
    )
    return export_variant(model, out_dir, variant, provenance, repo_id=repo_id, overwrite=overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accept-license",
        action="store_true",
        help="accept the Fraunhofer non-commercial research licence of the UMedPT weights",
    )


CONVERTER = Converter(
    name="umedpt",
    help="the authors' UMedPT zip of pickled modules (encoder-1.0.4.pt.zip), read without their package",
    default_license="other",
    convert=convert_umedpt,
    add_arguments=add_arguments,
    options=("accept_license",),
)
