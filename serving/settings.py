"""Service settings, read from the environment once per process (`medhub serve` sets them from its flags).

Light to import (no hub, torch or ONNX Runtime): BentoML's arbiter process reads the service's configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hub.io import ReadLimits

MIB = 1024 * 1024


def default_threads() -> int:
    """Intra-op threads per session: the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


@dataclass(frozen=True)
class ServeSettings:
    """`MEDHUB_MODELS`: comma-separated repo ids or folders. Limits: `MEDHUB_MAX_BODY_MB` (413 above it),
    `MEDHUB_MAX_PIXELS` / `MEDHUB_MAX_VOXELS` (reader budgets), `MEDHUB_MAX_ARRAY_MB` (one array that processing
    builds, such as a volume's float32 copy or its sliding-window tiles; 413 above it), `MEDHUB_MAX_CONCURRENCY`
    (429 above it),
    `MEDHUB_TIMEOUT` (seconds), `MEDHUB_API_TOKEN` (bearer token; unset = open), `MEDHUB_DEVICE`
    (auto|cpu|cuda), `MEDHUB_FP16` (1 = float16 ONNX graphs), `MEDHUB_RUNNERS` (2D batches in flight per model
    and task; 0 = cores + 1 on CPU, 1 on CUDA), `MEDHUB_MAX_BATCH` (images per 2D run; 0 = 2 on CPU, 8 on
    CUDA), `MEDHUB_THREADS` (ORT intra-op threads per run; 0 = cores / runners for 2D, all cores for 3D),
    `MEDHUB_INT8` (1 = int8 graphs, calibrated and gated at export), `MEDHUB_WORKERS` (service worker processes,
    sharing the cores and the ONNX cache; 0 = one per 8 cores, at least 1), `MEDHUB_ONNX_CACHE`,
    `MEDHUB_DICOMWEB_URL` (comma-separated DICOMweb roots a `dicomweb` field may read from, tried in order; results
    are stored to the first) and `MEDHUB_DICOMWEB_TOKEN` (bearer token for them)."""

    models: tuple[str, ...] = ()
    max_body_bytes: int = 64 * MIB
    max_pixels: int = 50_000_000
    max_voxels: int = 512 * 512 * 1024
    max_array_bytes: int = 512 * MIB
    max_concurrency: int = 32
    timeout: int = 120
    token: str | None = None
    device: str = "auto"
    fp16: bool = False
    int8: bool = False
    workers: int = 0
    threads: int = 0
    runners: int = 0
    max_batch: int = 0
    onnx_cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "medhub" / "onnx")
    dicomweb_urls: tuple[str, ...] = ()
    dicomweb_token: str | None = None

    @classmethod
    def from_env(cls) -> ServeSettings:
        models = tuple(item.strip() for item in os.environ.get("MEDHUB_MODELS", "").split(",") if item.strip())
        cache = os.environ.get("MEDHUB_ONNX_CACHE")
        return cls(
            models=models,
            max_body_bytes=_int("MEDHUB_MAX_BODY_MB", 64) * MIB,
            max_pixels=_int("MEDHUB_MAX_PIXELS", cls.max_pixels),
            max_voxels=_int("MEDHUB_MAX_VOXELS", cls.max_voxels),
            max_array_bytes=_int("MEDHUB_MAX_ARRAY_MB", cls.max_array_bytes // MIB) * MIB,
            max_concurrency=_int("MEDHUB_MAX_CONCURRENCY", cls.max_concurrency),
            timeout=_int("MEDHUB_TIMEOUT", cls.timeout),
            token=os.environ.get("MEDHUB_API_TOKEN") or None,
            device=os.environ.get("MEDHUB_DEVICE", "auto"),
            fp16=_int("MEDHUB_FP16", 0) == 1,
            int8=_int("MEDHUB_INT8", 0) == 1,
            workers=_int("MEDHUB_WORKERS", 0),
            threads=_int("MEDHUB_THREADS", 0),
            runners=_int("MEDHUB_RUNNERS", 0),
            max_batch=_int("MEDHUB_MAX_BATCH", 0),
            onnx_cache=Path(cache) if cache else Path.home() / ".cache" / "medhub" / "onnx",
            dicomweb_urls=tuple(
                url.strip() for url in os.environ.get("MEDHUB_DICOMWEB_URL", "").split(",") if url.strip()
            ),
            dicomweb_token=os.environ.get("MEDHUB_DICOMWEB_TOKEN") or None,
        )

    def worker_count(self) -> int:
        """`workers`, or by default one worker process per 8 cores (a 2-core machine: 1; see bench_serving)."""
        return self.workers or max(1, default_threads() // 8)

    def read_limits(self) -> ReadLimits:
        from hub.io import ReadLimits

        return ReadLimits(
            max_bytes=self.max_body_bytes,
            max_pixels=self.max_pixels,
            max_voxels=self.max_voxels,
            max_array_bytes=self.max_array_bytes,
        )
