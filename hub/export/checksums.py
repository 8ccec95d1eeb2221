"""`checksums.sha256`: the sha256 of every file of a repo, in `sha256sum` format."""

import hashlib
from pathlib import Path

from hub.errors import RepoError

CHECKSUMS_NAME = "checksums.sha256"


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def repo_files(repo_dir: Path) -> list[Path]:
    """Every regular file of the repo except the checksum list itself, sorted, as relative paths."""
    return sorted(
        path.relative_to(repo_dir)
        for path in repo_dir.rglob("*")
        if path.is_file() and path.name != CHECKSUMS_NAME and ".cache" not in path.relative_to(repo_dir).parts
    )


def write_checksums(repo_dir: Path) -> Path:
    lines = [f"{sha256_file(repo_dir / name)}  {name.as_posix()}" for name in repo_files(repo_dir)]
    target = repo_dir / CHECKSUMS_NAME
    target.write_text("\n".join(lines) + "\n")
    return target


def verify_checksums(repo_dir: Path) -> int:
    """Recompute every listed checksum; raise RepoError naming the first file that differs. Returns the count."""
    listing = repo_dir / CHECKSUMS_NAME
    if not listing.is_file():
        raise RepoError(f"{repo_dir} has no {CHECKSUMS_NAME}; it was not exported by medhub")
    count = 0
    for line in listing.read_text().splitlines():
        expected, name = line.split("  ", 1)
        path = repo_dir / name
        if not path.is_file():
            raise RepoError(f"{name} is listed in {CHECKSUMS_NAME} but missing from {repo_dir}")
        if sha256_file(path) != expected:
            raise RepoError(f"{name} in {repo_dir} does not match its sha256 in {CHECKSUMS_NAME}")
        count += 1
    return count
