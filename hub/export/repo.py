"""The one exporter: writes a model as a medhub repo (docs/architecture.md, "The repo format"), whatever made it."""

import copy
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.image_processing_base import ImageProcessingMixin

from hub import __version__
from hub.errors import RepoError
from hub.models import get_family
from hub.models.variant import Variant

from .card import CardFacts, render_card
from .checksums import write_checksums
from .golden import write_golden

WEIGHTS_NAME = "model.safetensors"
PROCESSOR_SOURCE = Path(__file__).resolve().parents[1] / "processing" / "image_processing_medhub.py"
"""The processor as remote code: `AutoImageProcessor` with `trust_remote_code=True` where medhub is not installed."""
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": f"{PROCESSOR_SOURCE.stem}.MedicalImageProcessor"}


@dataclass
class Provenance:
    """Where the weights came from; recorded in the safetensors metadata and in the card.

    kind: `random-init`, `trained` or `converted`; details: flat facts (seed, run dir, source file and sha256).
    """

    kind: str
    description: str
    license: str = "apache-2.0"
    training_data: str = "None: the weights are randomly initialised."
    base_model: str | None = None
    details: dict[str, str] = field(default_factory=dict)


def prepare_output_dir(out_dir: Path, overwrite: bool) -> Path:
    """Create `out_dir`; refuse a non-empty one unless `overwrite`, which empties it first."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RepoError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise RepoError(f"output folder {out_dir} is not empty; pass --overwrite to replace its contents")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def export_repo(
    model: PreTrainedModel,
    out_dir: Path,
    *,
    variant: str,
    provenance: Provenance,
    processor: ImageProcessingMixin,
    modality: str,
    repo_id: str | None = None,
    eval_results: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write config, weights with provenance metadata, preprocessing, card, remote code, golden and checksums."""
    family = get_family(model.config.model_type)
    out_dir = prepare_output_dir(out_dir, overwrite)
    model.config.auto_map = family.auto_map()
    model.save_pretrained(out_dir)
    _add_weights_metadata(
        out_dir / WEIGHTS_NAME,
        {
            "family": family.model_type,
            "variant": variant,
            "source": json.dumps(asdict(provenance), sort_keys=True),
            "medhub_version": __version__,
        },
    )
    for source_file in family.source_files:
        shutil.copy2(source_file, out_dir / source_file.name)
    shutil.copy2(PROCESSOR_SOURCE, out_dir / PROCESSOR_SOURCE.name)
    saved = copy.deepcopy(processor)
    saved.auto_map = PROCESSOR_AUTO_MAP
    saved.save_pretrained(out_dir)
    encoder = family.load_encoder(out_dir)
    write_golden(encoder, family, out_dir)
    facts = CardFacts(
        variant=variant,
        repo_id=repo_id or f"org/{variant}",
        modality=modality,
        license=provenance.license,
        source_text=provenance.description,
        training_data=provenance.training_data,
        base_model=provenance.base_model,
        eval_results=eval_results or [],
    )
    card = render_card(family, facts, encoder.config, processor.to_dict(), encoder.num_parameters())
    (out_dir / "README.md").write_text(card)
    write_checksums(out_dir)
    _make_readable(out_dir)
    return out_dir


def export_variant(
    model: PreTrainedModel, out_dir: Path, variant: Variant, provenance: Provenance, **options: Any
) -> Path:
    """`export_repo` of a catalogue variant's model with the variant's processor and modality; `options` are
    `export_repo`'s other keywords (`repo_id`, `eval_results`, `overwrite`)."""
    return export_repo(
        model,
        out_dir,
        variant=variant.id,
        provenance=provenance,
        processor=variant.build_processor(),
        modality=variant.modality,
        **options,
    )


def random_init(variant: Variant, seed: int) -> tuple[PreTrainedModel, Provenance]:
    """The variant's encoder initialised under `torch.manual_seed(seed)`, and the provenance that says so."""
    torch.manual_seed(seed)
    model = get_family(variant.family).encoder_class(variant.build_config())
    provenance = Provenance(
        kind="random-init", description=f"random initialisation (seed {seed})", details={"seed": str(seed)}
    )
    return model, provenance


def _make_readable(out_dir: Path) -> None:
    """Repos are shared: every file 0644 (safetensors writes its files 0600)."""
    for path in out_dir.rglob("*"):
        if path.is_file():
            path.chmod(0o644)


def weights_metadata(weights_path: Path) -> dict[str, str]:
    with safe_open(weights_path, framework="pt") as handle:
        return dict(handle.metadata() or {})


def _add_weights_metadata(weights_path: Path, extra: dict[str, str]) -> None:
    metadata = {**weights_metadata(weights_path), **extra}
    save_file(load_file(weights_path), weights_path, metadata=metadata)
