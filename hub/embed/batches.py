"""``embed_batches``: decode and preprocess in worker processes (bounded queue), run the model in batches."""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hub.errors import InputError, MedhubError
from hub.export.resolve import repo_revision, resolve_repo
from hub.io import ReadLimits
from hub.processing import MedicalImageProcessor

from .backends import Backend, Runner, TorchBackend
from .inputs import model_inputs, pool_tiles
from .sources import EmbedSource


@dataclass(frozen=True)
class EmbedError:
    id: str
    error_class: str
    message: str


@dataclass
class EmbeddedBatch:
    ids: list[str]
    embeddings: np.ndarray
    """(B, D) float32, row i for ``ids[i]``."""
    layers: dict[int, np.ndarray] = field(default_factory=dict)
    """Requested hidden-state index -> (B, D_layer) float32, pooled."""
    errors: list[EmbedError] = field(default_factory=list)
    """Sources of this stretch of the input that could not be embedded, in input order."""


_processor: MedicalImageProcessor | None = None
_limits: ReadLimits | None = None


def _init_worker(repo_dir: Path, limits: ReadLimits | None, single_thread: bool = False) -> None:
    global _processor, _limits
    if single_thread:  # a decoding process is one thread: the parallelism is the number of processes
        torch.set_num_threads(1)
    _processor, _limits = MedicalImageProcessor.from_pretrained(repo_dir), limits


def _decode(source: EmbedSource) -> np.ndarray | EmbedError:
    """The model inputs of one source, or its error (a decoder never raises for a bad file)."""
    try:
        return model_inputs(_processor, source.path, _limits)
    except MedhubError as exc:
        return EmbedError(source.id, type(exc).__name__, str(exc))
    except (OSError, ValueError, RuntimeError) as exc:  # a decoder library's own failure on a bad file
        return EmbedError(source.id, "CorruptFileError", f"file {source.id!r} cannot be decoded ({exc})")


def _decoded(
    sources: list[EmbedSource], repo_dir: Path, limits: ReadLimits | None, workers: int, ahead: int
) -> Iterator[tuple[EmbedSource, np.ndarray | EmbedError]]:
    """Decoded sources in input order.

    ``workers`` > 0: in that many processes, at most 4 per process ahead of the model. 0: ``ahead`` sources
    (a model batch of 2D images: the thread decodes the next batch while the model runs this one) in one thread
    of this process, which overlaps decoding with the model (ONNX Runtime and torch release the GIL) without
    starting processes (each one re-imports torch) or pickling tensors; on a machine with few cores this is the
    fastest (benchmarks/bench_embed.py measures it)."""
    if workers == 0:
        _init_worker(repo_dir, limits)
        yield from _threaded(sources, ahead if _processor.spatial_dims == 2 else 2)
        return
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(repo_dir, limits, True)) as pool:
        pending: deque[tuple[EmbedSource, Future]] = deque()
        items = iter(sources)
        for source in items:
            pending.append((source, pool.submit(_decode, source)))
            if len(pending) >= 4 * workers:
                break
        while pending:
            source, future = pending.popleft()
            nxt = next(items, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_decode, nxt)))
            yield source, future.result()


def _threaded(sources: list[EmbedSource], ahead: int) -> Iterator[tuple[EmbedSource, np.ndarray | EmbedError]]:
    """``_decode`` of each source in a background thread, ``ahead`` at most; stops it when the consumer stops."""
    ready: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def decode_all() -> None:
        try:
            for source in sources:
                if not offer((source, _decode(source))):
                    return
            offer(None)
        except BaseException as exc:
            offer(exc)

    thread = threading.Thread(target=decode_all, name="medhub-embed-decode", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _embed(run: Runner, inputs: list[np.ndarray], batch_size: int, layers: list[int]) -> list[np.ndarray]:
    """Each wanted output (embedding, then ``layers``) for every input, its tiles run in batches and pooled."""
    tiles = np.concatenate(inputs)
    chunks = [run(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]
    hidden = len(chunks[0]) - 1
    for layer in layers:
        if not -hidden <= layer < hidden:
            raise InputError(f"layer {layer} does not exist; the model has layers 0..{hidden - 1}")
    wanted = [0] + [1 + (layer % hidden) for layer in layers]
    bounds = np.cumsum([0] + [len(x) for x in inputs])
    outputs = []
    for index in wanted:
        values = np.concatenate([chunk[index] for chunk in chunks]).astype(np.float32, copy=False)
        outputs.append(np.stack([pool_tiles(values[a:b]) for a, b in itertools.pairwise(bounds)]))
    return outputs


def embed_batches(
    repo: str | Path,
    sources: Iterable[EmbedSource],
    backend: Backend | None = None,
    batch_size: int = 16,
    layers: list[int] | None = None,
    workers: int = 0,
    limits: ReadLimits | None = None,
    runner: Runner | None = None,
) -> Iterator[EmbeddedBatch]:
    """Embed ``sources`` with the repo's processor and encoder, ``batch_size`` model inputs per run.

    Yields batches in input order; a source that cannot be read is reported in its batch's ``errors`` and the
    job goes on. ``workers`` decoding processes (0: a decoding thread in this process). ``runner`` (an opened
    backend) skips loading the model again.
    """
    repo_dir = resolve_repo(repo)
    layers = list(layers or [])
    if runner is None:
        runner = (backend or TorchBackend()).open(repo_dir, str(repo), repo_revision(repo_dir))
    ids: list[str] = []
    inputs: list[np.ndarray] = []
    errors: list[EmbedError] = []

    def flush() -> EmbeddedBatch:
        outputs = _embed(runner, inputs, batch_size, layers) if inputs else None
        batch = EmbeddedBatch(
            list(ids),
            outputs[0] if outputs else np.zeros((0, 0), np.float32),
            dict(zip(layers, outputs[1:])) if outputs else {},
            list(errors),
        )
        ids.clear(), inputs.clear(), errors.clear()
        return batch

    for source, decoded in _decoded(list(sources), repo_dir, limits, workers, batch_size):
        if isinstance(decoded, EmbedError):
            errors.append(decoded)
            continue
        ids.append(source.id)
        inputs.append(decoded)
        if sum(len(x) for x in inputs) >= batch_size:
            yield flush()
    if ids or errors:
        yield flush()
