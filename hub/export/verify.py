"""`medhub verify`: a repo's files match their checksums and its encoder reproduces the golden output."""

from dataclasses import dataclass
from pathlib import Path

from hub.errors import RepoError
from hub.models import get_family

from .checksums import verify_checksums
from .golden import check_golden
from .resolve import read_config, resolve_repo


@dataclass
class VerifyReport:
    repo_dir: Path
    files_checked: int
    golden_max_abs_diff: float


def verify_repo(path_or_id: str | Path, revision: str | None = None) -> VerifyReport:
    repo_dir = resolve_repo(path_or_id, revision)
    files_checked = verify_checksums(repo_dir)
    model_type = read_config(repo_dir).get("model_type")
    if model_type is None:
        raise RepoError(f"config.json in {repo_dir} has no model_type")
    encoder = get_family(model_type).load_encoder(repo_dir)
    return VerifyReport(repo_dir, files_checked, check_golden(encoder, repo_dir))
