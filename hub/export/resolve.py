"""Turning what a user typed (a folder or `org/name`) into a local repo folder."""

import hashlib
import json
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from hub.errors import RepoError

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID_PATTERN = re.compile(rf"^{_NAME}/{_NAME}$")


def validate_repo_id(repo_id: str) -> str:
    """Accept `org/name` (letters, digits, `.`, `_`, `-`; no `..` or `--`), else raise RepoError."""
    if not REPO_ID_PATTERN.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise RepoError(f"repo id {repo_id!r} is malformed; expected ORG/NAME such as org/muscle-resnet18")
    return repo_id


def resolve_repo(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local folder holding `config.json`: the folder itself, or the snapshot of a repo id (cache or Hub)."""
    candidate = Path(path_or_id)
    if candidate.is_dir():
        repo_dir = candidate
    elif candidate.exists() or str(path_or_id).startswith((".", "/")) or str(path_or_id).count("/") != 1:
        raise RepoError(f"{path_or_id} is neither a repo folder nor an ORG/NAME repo id")
    else:
        repo_id = validate_repo_id(str(path_or_id))
        try:
            repo_dir = Path(snapshot_download(repo_id, revision=revision))
        except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as error:
            raise RepoError(
                f"repo {repo_id} is not in the local cache and could not be downloaded ({error.__class__.__name__})"
            ) from None
    if not (repo_dir / "config.json").is_file():
        raise RepoError(f"repo folder {repo_dir} has no config.json")
    return repo_dir


def read_config(repo_dir: Path) -> dict:
    try:
        return json.loads((repo_dir / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise RepoError(f"config.json in {repo_dir} is not valid JSON ({error.msg} at line {error.lineno})") from None


def repo_revision(repo_dir: Path) -> str:
    """The cache commit sha for a snapshot; else a digest of the repo's checksum list (same content, same id)."""
    if repo_dir.parent.name == "snapshots" and len(repo_dir.name) == 40:
        return repo_dir.name
    return hashlib.sha256((repo_dir / "checksums.sha256").read_bytes()).hexdigest()[:40]
