"""`medhub embed`: a dataset's embeddings on ONNX Runtime (the service's export and sessions), locally or on Ray.

The job itself (sources, batching, Parquet shards, resume, errors) is `hub.embed`; this module adds the ONNX
Runtime backend and the Ray Data engine, whose actors each hold one session and run the same per-batch
function as the local engine, so both engines write the same dataset.
"""

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hub.embed import (
    Backend,
    EmbeddedBatch,
    EmbedError,
    EmbedSource,
    Runner,
    backend_names,
    embed_batches,
    embed_dataset,
    get_backend,
)
from hub.errors import MedhubError
from hub.export.resolve import repo_revision, resolve_repo

from .models import pixels_runner, task_graph
from .runtime import active_provider, create_session, default_threads
from .settings import ServeSettings


class OnnxBackend:
    """The repo's `features` graph on ONNX Runtime, exported and cached exactly as `medhub serve` does; with
    `int8`, the gated int8 graph of `medhub serve --int8` (a graph below the gate raises its one-sentence error)."""

    def __init__(
        self, device: str = "auto", threads: int | None = None, onnx_cache: Path | None = None, int8: bool = False
    ) -> None:
        self.device, self.threads, self.int8 = device, threads, int8
        self.name = "onnx-int8" if int8 else "onnx"
        self.onnx_cache = onnx_cache or ServeSettings.from_env().onnx_cache
        self.provider = ""

    def open(self, repo_dir: Path, repo_id: str, revision: str) -> Runner:
        graph = task_graph(repo_dir, repo_id, revision, "features", self.onnx_cache, int8=self.int8)
        session = create_session(graph, self.threads, self.device)
        self.provider = active_provider(session)
        return pixels_runner(session)

    def describe(self) -> str:
        return self.provider


def int8_backend(device: str = "auto", threads: int | None = None, onnx_cache: Path | None = None) -> OnnxBackend:
    """The `onnx-int8` entry point of `hub.embed.get_backend` (`onnx` is `OnnxBackend` itself)."""
    return OnnxBackend(device, threads, onnx_cache, int8=True)


def _backend(name: str, device: str, threads: int | None) -> Backend:
    """The backend `name` from `hub.embed`'s registry: torch, a registered one, or a `medhub.embed_backends` entry
    point (this package's onnx and onnx-int8); every factory takes `device` and `threads`."""
    return get_backend(name, device=device, threads=threads)


class _EmbedActor:
    """A Ray actor: one opened backend; embeds a batch of sources with `hub.embed.embed_batches`."""

    def __init__(self, repo: str, backend: str, device: str, threads: int, batch_size: int, layers: list[int]):
        self.repo_dir = resolve_repo(repo)
        self.runner = _backend(backend, device, threads).open(self.repo_dir, repo, repo_revision(self.repo_dir))
        self.batch_size, self.layers = batch_size, layers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sources = [EmbedSource(str(i), Path(p)) for i, p in zip(batch["id"], batch["path"])]
        done: dict[str, dict[str, bytes]] = {}
        errors: dict[str, EmbedError] = {}
        for out in embed_batches(
            self.repo_dir, sources, batch_size=self.batch_size, layers=self.layers, runner=self.runner
        ):
            errors.update((e.id, e) for e in out.errors)
            for k, source_id in enumerate(out.ids):
                done[source_id] = {
                    "embedding": out.embeddings[k].tobytes(),
                    **{f"layer_{n}": v[k].tobytes() for n, v in out.layers.items()},
                }
        columns = ["embedding"] + [f"layer_{n}" for n in self.layers]
        ids = [s.id for s in sources]
        return {
            "id": np.array(ids, dtype=object),
            **{c: np.array([done.get(i, {}).get(c, b"") for i in ids], dtype=object) for c in columns},
            "error_class": np.array([errors[i].error_class if i in errors else "" for i in ids], dtype=object),
            "message": np.array([errors[i].message if i in errors else "" for i in ids], dtype=object),
        }


def ray_batches(repo: str, backend: str, device: str, batch_size: int, layers: list[int], actors: int):
    """A `hub.embed` batch runner on Ray Data: read the file list, `map_batches` on an actor pool, in order."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            num_cpus=None if os.environ.get("RAY_ADDRESS") else actors,
            include_dashboard=False,
            log_to_driver=False,
        )
    gpus = 1 if device != "cpu" and (ray.cluster_resources().get("GPU", 0) > 0) else 0

    def run(sources: list[EmbedSource]) -> Iterator[EmbeddedBatch]:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        items = ray.data.from_items([{"id": s.id, "path": str(s.path)} for s in sources])
        embedded = items.map_batches(
            _EmbedActor,
            fn_constructor_args=(repo, backend, device, 1, batch_size, layers),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            num_gpus=gpus,
            batch_format="numpy",
        )
        for batch in embedded.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield _from_columns(batch, layers)

    return run


def _from_columns(batch: dict[str, np.ndarray], layers: list[int]) -> EmbeddedBatch:
    ok = [i for i, cls in enumerate(batch["error_class"]) if not cls]
    vectors = lambda column: np.stack([np.frombuffer(batch[column][i], np.float32) for i in ok])  # noqa: E731
    errors = [
        EmbedError(str(batch["id"][i]), str(batch["error_class"][i]), str(batch["message"][i]))
        for i in range(len(batch["id"]))
        if batch["error_class"][i]
    ]
    if not ok:
        return EmbeddedBatch([], np.zeros((0, 0), np.float32), {}, errors)
    return EmbeddedBatch(
        [str(batch["id"][i]) for i in ok], vectors("embedding"), {n: vectors(f"layer_{n}") for n in layers}, errors
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    embed = subparsers.add_parser("embed", help="embed a whole dataset (manifest or folder) into Parquet")
    embed.add_argument("model", help="repo folder or ORG/NAME")
    embed.add_argument("--data", type=Path, required=True, help="manifest (.jsonl/.csv) or folder walked recursively")
    embed.add_argument("--out", type=Path, required=True, help="output folder (a Parquet dataset)")
    embed.add_argument("--layers", default="", help="hidden-state indices to add as columns, e.g. 0,4")
    embed.add_argument("--batch-size", type=int, default=16)
    embed.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    embed.add_argument(
        "--backend",
        default="onnx",
        help=f"embedding backend: {', '.join(backend_names())} or one registered through hub.embed (default: onnx)",
    )
    embed.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes (local engine; 0: a decoding thread in this process; default: "
        "cores // 4) or actors (ray engine; default: cores)",
    )
    embed.add_argument("--engine", choices=["local", "ray"], default="local")
    embed.add_argument("--shard-size", type=int, default=1024, help="rows per Parquet shard")
    embed.add_argument("--resume", action="store_true", help="continue the earlier run in --out")
    embed.add_argument("--strict", action="store_true", help="stop at the first file that cannot be embedded")
    embed.add_argument("--no-progress", action="store_true")
    embed.set_defaults(handler=cmd_embed)


def _threads(device: str) -> int | None:
    """ONNX Runtime threads on CPU: every core. The decoders stop once the bounded queue is full, so while the
    model runs they only refill what it takes."""
    return None if device == "cuda" else default_threads()


def default_workers(engine: str) -> int:
    """Ray: one single-threaded actor per core. Local: decoding costs ResNet-50 about a quarter of the model's
    time per image (224 px PNG + 1k px DICOM: 7.5 ms against 29 ms on 2 cores), so cores // 4 processes keep up;
    below 4 cores a decoding thread in this process (no process start-up, ~5 s each) is fastest."""
    return default_threads() if engine == "ray" else default_threads() // 4


def cmd_embed(args: argparse.Namespace) -> int:
    try:
        layers = [int(v) for v in args.layers.split(",") if v.strip()]
    except ValueError:
        raise MedhubError(f"--layers {args.layers!r} must be comma-separated integers, e.g. 0,4") from None
    common = dict(
        resume=args.resume,
        strict=args.strict,
        batch_size=args.batch_size,
        layers=layers,
        shard_size=args.shard_size,
        progress=not args.no_progress,
    )
    workers = default_workers(args.engine) if args.workers is None else args.workers
    if args.engine == "ray":
        _backend(args.backend, args.device, 1)  # an unknown name fails here, in one line, not in every actor
        batches = ray_batches(args.model, args.backend, args.device, args.batch_size, layers, max(1, workers))
        result = embed_dataset(args.model, args.data, args.out, batches=batches, **common)
        where = f"ray ({max(1, workers)} actors)"
    else:
        backend = _backend(args.backend, args.device, _threads(args.device))
        result = embed_dataset(args.model, args.data, args.out, backend=backend, workers=workers, **common)
        where = backend.describe()
    print(
        f"wrote {result.count} embeddings (dim {result.dim}) to {result.out} on {where}; "
        f"{result.errors} file(s) in errors.parquet"
        + (f"; {result.skipped_shards} shard(s) kept from the earlier run" if result.skipped_shards else "")
    )
    return 0
