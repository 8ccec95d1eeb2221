"""Publishing a repo folder: into the local Hugging Face cache (offline) or to the Hub (upload)."""

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from hub.errors import RepoError

from .checksums import repo_files, sha256_file, verify_checksums
from .resolve import validate_repo_id


@dataclass
class Published:
    repo_id: str
    revision: str
    commit: str
    location: str


def install_in_cache(repo_dir: Path, repo_id: str, cache_dir: Path | None = None, revision: str = "main") -> Published:
    """Lay the repo out as `huggingface_hub` caches a download, as a new commit on `revision`.

    Files go to `blobs/<sha256>`, the commit's tree to `snapshots/<commit>/` (relative symlinks, copies where the
    file system has none) and `refs/<revision>` points at the commit. The commit id chains the previous one, so
    publishing again makes a new revision and older ones stay loadable by their sha.
    """
    validate_repo_id(repo_id)
    verify_checksums(repo_dir)
    org, name = repo_id.split("/")
    # huggingface_hub resolves HF_HUB_CACHE / HF_HOME once, at import; read the same value it will.
    root = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{org}--{name}"
    ref_path = root / "refs" / revision
    parent = ref_path.read_text().strip() if ref_path.is_file() else ""
    files = {relative: sha256_file(repo_dir / relative) for relative in repo_files(repo_dir)}
    files[Path("checksums.sha256")] = sha256_file(repo_dir / "checksums.sha256")
    manifest = "\n".join(f"{digest} {path.as_posix()}" for path, digest in sorted(files.items()))
    commit = hashlib.sha1(f"medhub-commit\nparent {parent}\n{manifest}\n".encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    for relative, digest in files.items():
        blob = root / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(repo_dir / relative, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:
            shutil.copyfile(blob, link)
    ref_path.parent.mkdir(parents=True, exist_ok=True)
    ref_path.write_text(commit)
    return Published(repo_id, revision, commit, str(snapshot))


def upload_plan(repo_dir: Path) -> list[tuple[str, int]]:
    """The files an upload would send, with their sizes in bytes."""
    files = repo_files(repo_dir) + [Path("checksums.sha256")]
    return [(path.as_posix(), (repo_dir / path).stat().st_size) for path in sorted(files)]


def upload_to_hub(
    repo_dir: Path, repo_id: str, *, revision: str = "main", private: bool = False, token: str | None = None
) -> Published:
    """Create the Hub repo if needed and upload the folder as one commit (needs a token and network)."""
    validate_repo_id(repo_id)
    verify_checksums(repo_dir)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(repo_dir),
            revision=revision,
            commit_message=f"Upload {repo_dir.name} with medhub",
        )
    except LocalTokenNotFoundError:
        raise RepoError("uploading to the Hub needs a token: run `hf auth login` or set HF_TOKEN") from None
    except (HfHubHTTPError, OSError) as error:
        raise RepoError(f"upload of {repo_dir} to {repo_id} failed: {error}") from None
    return Published(repo_id, revision, info.oid, info.commit_url)
