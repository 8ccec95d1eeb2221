"""``embed_dataset``: a resumable Parquet dataset of embeddings, written shard by shard, each atomically.

Layout of ``out``: ``data/{split}-{k:05d}.parquet`` (rows grouped by split, ``train`` for a folder, so
``datasets.load_dataset("parquet", data_dir=out)`` finds the splits), ``.shards/{name}.json`` (the shard's ids and
errors, written last: a shard is done once it exists), ``errors.parquet`` and ``embedding_info.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from hub import __version__
from hub.errors import InputError
from hub.export.resolve import repo_revision, resolve_repo
from hub.io import ReadLimits
from hub.processing import MedicalImageProcessor

from .backends import Backend, TorchBackend
from .batches import EmbeddedBatch, EmbedError, embed_batches
from .sources import EmbedSource, list_sources

INFO = "embedding_info.json"
ERRORS = "errors.parquet"
BatchRunner = Callable[[list[EmbedSource]], Iterator[EmbeddedBatch]]


class EmbedDirError(InputError):
    """An output folder that holds a different job's results."""


@dataclass
class EmbedResult:
    out: Path
    count: int
    """Rows embedded (all shards, earlier runs included)."""
    errors: int
    dim: int
    skipped_shards: int
    """Shards a previous run had finished."""


def spec_digest(processor: MedicalImageProcessor) -> str:
    return hashlib.sha256(json.dumps(processor.to_dict(), sort_keys=True).encode()).hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2)))


def _shards(sources: list[EmbedSource], shard_size: int) -> list[tuple[str, list[EmbedSource]]]:
    """A stable plan: sources grouped by split (``train`` when none), ``shard_size`` per shard, in id order."""
    by_split: dict[str, list[EmbedSource]] = {}
    for source in sources:
        by_split.setdefault(source.split or "train", []).append(source)
    return [
        (f"{split}-{k // shard_size:05d}", group[k : k + shard_size])
        for split, group in sorted(by_split.items())
        for k in range(0, len(group), shard_size)
    ]


def _table(
    rows: list[tuple[EmbedSource, np.ndarray, dict[int, np.ndarray]]],
    layers: list[int],
    label_names: list[str],
    dims: dict[str, int],
) -> pa.Table:
    def vectors(values: list[np.ndarray], dim: int) -> pa.Array:
        flat = np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)

    columns: dict[str, pa.Array] = {
        "id": pa.array([s.id for s, _, _ in rows], pa.string()),
        "split": pa.array([s.split for s, _, _ in rows], pa.string()),
    }
    for name in label_names:
        columns[f"label_{name}"] = pa.array([s.labels.get(name) for s, _, _ in rows], pa.float64())
    columns["embedding"] = vectors([e for _, e, _ in rows], dims["embedding"])
    for layer in layers:
        columns[f"layer_{layer}"] = vectors([h[layer] for _, _, h in rows], dims[f"layer_{layer}"])
    return pa.table(columns)


def _clean_temp_files(out: Path) -> None:
    for folder in (out, out / "data", out / ".shards"):
        for path in folder.glob(".tmp-*") if folder.is_dir() else ():
            path.unlink()


def _check_info(out: Path, info: dict[str, Any], resume: bool) -> None:
    path = out / INFO
    if not path.is_file():
        if resume:
            raise EmbedDirError(f"--resume was given but {out} holds no earlier run ({INFO} is missing)")
        if (out / "data").exists():
            raise EmbedDirError(f"{out} holds a data folder but no {INFO}; expected an empty or medhub embed folder")
        return
    earlier = json.loads(path.read_text())
    for key in ("revision", "spec_digest", "layers", "shard_size", "data"):
        if earlier.get(key) != info[key]:
            raise EmbedDirError(
                f"{out} holds embeddings made with {key} {earlier.get(key)!r}, not {info[key]!r}; "
                "use a new --out folder"
            )


def embed_dataset(
    repo: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    backend: Backend | None = None,
    resume: bool = False,
    strict: bool = False,
    batch_size: int = 16,
    layers: list[int] | None = None,
    workers: int = 0,
    shard_size: int = 1024,
    limits: ReadLimits | None = None,
    progress: bool = False,
    batches: BatchRunner | None = None,
    command: list[str] | None = None,
) -> EmbedResult:
    """Embed every source of ``data`` (manifest or folder) into the Parquet dataset ``out``.

    Shards a previous run into ``out`` finished (same revision, spec, layers) are kept, so a killed run resumes
    where it stopped and never writes a row twice; ``resume=True`` insists that there is such a run. Unreadable
    sources go to ``errors.parquet`` (``strict``: the first one raises). ``batches`` replaces the local
    pipeline (the Ray engine): it gets the sources still to do and yields their batches in input order.
    """
    repo_dir = resolve_repo(repo)
    out = Path(out)
    layers = list(layers or [])
    processor = MedicalImageProcessor.from_pretrained(repo_dir)
    sources = list_sources(data)
    if not sources:
        raise InputError(f"{data} holds no files to embed")
    info: dict[str, Any] = {
        "repo": str(repo),
        "revision": repo_revision(repo_dir),
        "spec_digest": spec_digest(processor),
        "medhub_version": __version__,
        "layers": layers,
        "shard_size": shard_size,
        "data": str(Path(data).resolve()),
        "command": command or sys.argv,
    }
    _check_info(out, info, resume)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / ".shards").mkdir(exist_ok=True)
    _clean_temp_files(out)
    _write_json(out / INFO, {**info, "complete": False})
    plan = _shards(sources, shard_size)
    todo = [(name, group) for name, group in plan if not (out / ".shards" / f"{name}.json").is_file()]
    label_names = sorted({name for s in sources for name in s.labels})
    if batches is None:
        runner = (backend or TorchBackend()).open(repo_dir, str(repo), info["revision"])
        batches = partial(
            embed_batches, repo_dir, batch_size=batch_size, layers=layers, workers=workers, limits=limits, runner=runner
        )
    bar = tqdm(
        total=sum(len(g) for _, g in plan),
        initial=sum(len(g) for _, g in plan) - sum(len(g) for _, g in todo),
        unit="img",
        disable=not progress,
        smoothing=0.1,
    )
    shard_of = {s.id: name for name, group in todo for s in group}
    state = {name: {"group": group, "rows": [], "errors": [], "left": len(group)} for name, group in todo}
    dims: dict[str, int] = {}
    for batch in batches([s for _, group in todo for s in group]):
        if strict and batch.errors:
            raise InputError(f"{batch.errors[0].id}: {batch.errors[0].message}")
        if batch.ids:
            dims = {
                "embedding": batch.embeddings.shape[1],
                **{f"layer_{k}": v.shape[1] for k, v in batch.layers.items()},
            }
        for error in batch.errors:
            _add(state[shard_of[error.id]], error)
        for i, source_id in enumerate(batch.ids):
            _add(
                state[shard_of[source_id]], (source_id, batch.embeddings[i], {k: v[i] for k, v in batch.layers.items()})
            )
        for name in {shard_of[i] for i in batch.ids + [e.id for e in batch.errors]}:
            if state[name]["left"] == 0:
                dims = dims or _dims_from_done(out, layers)
                _write_shard(out, name, state.pop(name), layers, label_names, dims)
        bar.update(len(batch.ids) + len(batch.errors))
    bar.close()
    return _finish(out, info, plan, len(plan) - len(todo))


def _add(shard: dict[str, Any], item: EmbedError | tuple[str, np.ndarray, dict[int, np.ndarray]]) -> None:
    shard["errors" if isinstance(item, EmbedError) else "rows"].append(item)
    shard["left"] -= 1


def _write_shard(
    out: Path, name: str, shard: dict[str, Any], layers: list[int], label_names: list[str], dims: dict[str, int]
) -> None:
    """The shard's Parquet file (when any row embedded anywhere), then its state file, each atomically."""
    by_id = {s.id: s for s in shard["group"]}
    if dims:
        table = _table([(by_id[i], e, h) for i, e, h in shard["rows"]], layers, label_names, dims)
        _atomic_write(out / "data" / f"{name}.parquet", lambda tmp: pq.write_table(table, tmp))
    _write_json(out / ".shards" / f"{name}.json", {"ids": list(by_id), "errors": [e.__dict__ for e in shard["errors"]]})


def _dims_from_done(out: Path, layers: list[int]) -> dict[str, int]:
    for path in sorted((out / "data").glob("*.parquet")):
        schema = pq.read_schema(path)
        return {name: schema.field(name).type.list_size for name in ["embedding"] + [f"layer_{k}" for k in layers]}
    return {}


def _finish(out: Path, info: dict[str, Any], plan: list, skipped: int) -> EmbedResult:
    errors: list[dict[str, str]] = []
    for name, _ in plan:
        errors += json.loads((out / ".shards" / f"{name}.json").read_text())["errors"]
    table = pa.table({key: pa.array([e[key] for e in errors], pa.string()) for key in ("id", "error_class", "message")})
    _atomic_write(out / ERRORS, lambda tmp: pq.write_table(table, tmp))
    files = sorted((out / "data").glob("*.parquet"))
    count = sum(pq.read_metadata(f).num_rows for f in files)
    dim = pq.read_schema(files[0]).field("embedding").type.list_size if files else 0
    _write_json(
        out / INFO,
        {
            **info,
            "complete": True,
            "count": count,
            "errors": len(errors),
            "dim": dim,
            "dtype": "float32",
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return EmbedResult(out, count, len(errors), dim, skipped)
