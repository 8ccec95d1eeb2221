"""Writing, checking and publishing medhub repos."""

from .checksums import verify_checksums, write_checksums
from .golden import check_golden, write_golden
from .publish import install_in_cache, upload_to_hub
from .repo import Provenance, export_repo, export_variant, prepare_output_dir, random_init, weights_metadata
from .resolve import resolve_repo, validate_repo_id
from .verify import verify_repo

__all__ = [
    "Provenance",
    "check_golden",
    "export_repo",
    "export_variant",
    "install_in_cache",
    "prepare_output_dir",
    "random_init",
    "resolve_repo",
    "upload_to_hub",
    "validate_repo_id",
    "verify_checksums",
    "verify_repo",
    "weights_metadata",
    "write_checksums",
    "write_golden",
]
