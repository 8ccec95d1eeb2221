"""What a converted repo records about its source: the upstream file, its sha256 and the licence terms."""

from pathlib import Path

from hub.export.checksums import sha256_file
from hub.export.repo import Provenance


def converted_provenance(
    checkpoint: Path,
    converter: str,
    *,
    license: str,
    training_data: str,
    base_model: str | None,
    licence_note: str | None = None,
    **details: str,
) -> Provenance:
    """The provenance of a repo that `medhub convert <converter>` wrote from `checkpoint`: `licence_note` (the
    upstream licence terms) ends the description; `details` follow the file name and its sha256."""
    digest = sha256_file(checkpoint)
    description = f"converted from `{checkpoint.name}` (sha256 `{digest}`) with `medhub convert {converter}`"
    if licence_note:
        description += f"; upstream licence: {licence_note}"
    return Provenance(
        kind="converted",
        description=description,
        license=license,
        training_data=training_data,
        base_model=base_model,
        details={"file": checkpoint.name, "sha256": digest, **details},
    )
