"""ResNet-50 checkpoints of self-supervised methods and of the transfer-learning benchmark -> a `muscle` repo.

Covers MoCo v1/v2 and PCL (`module.encoder_q.`), SwAV / DeepCluster-v2 / SeLa-v2 (`module.`), InsDis / PIRL /
InfoMin (`module.encoder.`), CMC (`module.encoder1.`), Barlow Twins and the benchmark's ImageNet->X-ray files
(torchvision names, possibly under `module.`). Heads (fc, projection, prototypes, jigsaw, the MoCo key encoder
and queue) are dropped; every encoder key must be matched, or the conversion fails naming the key.
"""

from pathlib import Path

import torch

from hub.catalogue import get_variant
from hub.errors import ConversionError
from hub.export.repo import export_variant
from hub.models.muscle import MuscleModel

from .checkpoint import check_shapes, load_checkpoint, unwrap_state_dict
from .provenance import converted_provenance
from .registry import Converter

WRAPPERS = ("state_dict", "model", "resnet")
PREFIXES = ("module.encoder_q.", "module.encoder1.", "module.encoder.", "module.", "encoder_q.", "encoder.", "")
HEAD_ROOTS = ("fc", "projection", "prototypes", "head", "linear", "jigsaw", "encoder_k", "queue", "classifier")
VARIANT = "muscle-resnet50"


def _is_head(key: str) -> bool:
    """Head parameters live under a top-level module named like a head (`fc.0`, `projection_head`, `queue_ptr`)."""
    return key.split(".", 1)[0].startswith(HEAD_ROOTS)


def encoder_state_dict(
    tensors: dict[str, torch.Tensor], expected: set[str], path: Path
) -> tuple[dict[str, torch.Tensor], str]:
    """Strip the prefix that maps the most keys onto `expected`; drop heads; demand every expected key."""

    def matches(prefix: str) -> int:
        return sum(key.removeprefix(prefix) in expected for key in tensors if key.startswith(prefix))

    best_prefix = max(PREFIXES, key=matches)
    stripped = {key.removeprefix(best_prefix): value for key, value in tensors.items() if key.startswith(best_prefix)}
    state = {key: value for key, value in stripped.items() if not _is_head(key)}
    missing = sorted(expected - state.keys())
    if missing:
        raise ConversionError(
            f"checkpoint {path} has no encoder key {missing[0]} (after "
            f"stripping {best_prefix or 'no prefix'!r}; {len(missing)} missing)"
        )
    unexpected = sorted(state.keys() - expected)
    if unexpected:
        raise ConversionError(
            f"checkpoint {path} has an unrecognised non-head key {unexpected[0]} ({len(unexpected)} in all)"
        )
    return state, best_prefix


def convert_resnet50_ssl(
    checkpoint: Path,
    out_dir: Path,
    *,
    repo_id: str | None = None,
    license: str = "other",
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    checkpoint = Path(checkpoint)
    variant = get_variant(VARIANT)
    model = MuscleModel(variant.build_config())
    expected = set(model.state_dict())
    tensors = unwrap_state_dict(load_checkpoint(checkpoint), checkpoint, WRAPPERS)
    state, prefix = encoder_state_dict(tensors, expected, checkpoint)
    check_shapes(state, model.state_dict(), checkpoint, of="ResNet-50's ")
    model.load_state_dict(state, strict=True)
    provenance = converted_provenance(
        checkpoint,
        "resnet50-ssl",
        license=license,
        training_data="See the upstream release of the converted checkpoint; medhub did not train these weights.",
        base_model=base_model,
        stripped_prefix=prefix,
    )
    return export_variant(model, out_dir, variant, provenance, repo_id=repo_id, overwrite=overwrite)


CONVERTER = Converter(
    name="resnet50-ssl",
    help="ResNet-50 checkpoints of MoCo, PCL, SwAV, DeepCluster, SeLa, InsDis, PIRL, InfoMin, CMC, Barlow Twins, BTL",
    default_license="other",
    convert=convert_resnet50_ssl,
)
