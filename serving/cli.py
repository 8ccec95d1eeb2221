"""`medhub onnx`, `medhub serve` and `medhub embed` (contributed to the hub's CLI through the `medhub.commands`
entry point)."""

import argparse
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from hub.errors import MedhubError
from hub.export.resolve import resolve_repo
from hub.io import read_image
from hub.processing import MedicalImageProcessor

from . import embed
from .onnx_export import (
    FP16_PARITY_RTOL,
    PARITY_ATOL,
    TASKS,
    available_tasks,
    export_onnx,
)
from .quantize import DEFAULT_CALIBRATION_SIZE, Gate, export_int8
from .runtime import active_provider, create_session
from .settings import ServeSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    onnx = subparsers.add_parser("onnx", help="export a repo's task graph to ONNX and check parity with torch")
    onnx.add_argument("model", help="repo folder or ORG/NAME")
    onnx.add_argument("--task", choices=sorted(TASKS), default="features")
    onnx.add_argument("--out", type=Path, required=True, help="output folder (model.onnx is written there)")
    onnx.add_argument(
        "--fp16",
        action="store_true",
        help="float16 weights and compute (inputs and outputs stay float32); parity limit "
        f"{FP16_PARITY_RTOL:g} x max(1, output scale) instead of {PARITY_ATOL:g}",
    )
    onnx.add_argument(
        "--int8",
        action="store_true",
        help="int8 graph (ONNX Runtime static QDQ quantization), refused below the gate's thresholds",
    )
    onnx.add_argument(
        "--calibration",
        type=Path,
        help="a manifest or folder of images to calibrate int8 on "
        "(default: the repo's golden input and phantoms of its modality)",
    )
    onnx.add_argument("--calibration-size", type=int, default=DEFAULT_CALIBRATION_SIZE, help="calibration inputs")
    onnx.add_argument("--min-cosine", type=float, default=Gate.min_cosine, help="int8 gate: pooled-feature cosine")
    onnx.add_argument("--min-agreement", type=float, default=Gate.min_agreement, help="int8 gate: top-1 agreement")
    onnx.add_argument("--min-dice", type=float, default=Gate.min_dice, help="int8 gate: Dice to the fp32 mask")
    onnx.add_argument("--no-progress", action="store_true", help="no progress bar")
    onnx.set_defaults(handler=cmd_onnx)

    serve = subparsers.add_parser("serve", help="serve models over HTTP (BentoML + ONNX Runtime)")
    serve.add_argument("--model", action="append", required=True, help="repo folder or ORG/NAME; repeat for several")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: MEDHUB_DEVICE, else auto")
    serve.add_argument("--fp16", action="store_true", help="serve float16 ONNX graphs (for GPUs; slower on CPU)")
    serve.add_argument("--int8", action="store_true", help="serve int8 ONNX graphs (calibrated and gated at export)")
    serve.add_argument(
        "--workers", type=int, help="worker processes (0: one per 8 cores, at least 1); default: MEDHUB_WORKERS, else 0"
    )
    serve.add_argument(
        "--max-body-mb",
        type=int,
        help=f"default: MEDHUB_MAX_BODY_MB, else {ServeSettings.max_body_bytes // (1024 * 1024)}",
    )
    serve.add_argument(
        "--max-array-mb",
        type=int,
        help="MiB of one array built from an input (a volume's float32 copy, its sliding-window tiles); "
        f"default: MEDHUB_MAX_ARRAY_MB, else {ServeSettings.max_array_bytes // (1024 * 1024)}",
    )
    serve.add_argument(
        "--max-concurrency", type=int, help=f"default: MEDHUB_MAX_CONCURRENCY, else {ServeSettings.max_concurrency}"
    )
    serve.add_argument(
        "--timeout", type=int, help=f"seconds per request; default: MEDHUB_TIMEOUT, else {ServeSettings.timeout}"
    )
    serve.add_argument(
        "--example",
        action="append",
        type=Path,
        default=[],
        help="an image or volume to use in the printed curl examples (2D and 3D picked by content)",
    )
    serve.set_defaults(handler=cmd_serve)

    embed.register(subparsers)


def cmd_onnx(args: argparse.Namespace) -> int:
    repo_dir = resolve_repo(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.int8:
        if args.fp16:
            raise MedhubError("choose one of --fp16 and --int8")
        gate = Gate(args.min_cosine, args.min_agreement, args.min_dice)
        quantized = export_int8(
            repo_dir,
            args.task,
            args.out / "model.onnx",
            repo_id=args.model,
            revision=repo_dir.name,
            processor=MedicalImageProcessor.from_pretrained(repo_dir),
            calibration=args.calibration,
            calibration_size=args.calibration_size,
            gate=gate,
            progress=not args.no_progress,
        )
        print(
            f"wrote {quantized.path} ({args.task}, int8, {quantized.method} calibration on "
            f"{quantized.calibration_size} inputs from {quantized.calibration}); gate: {quantized.metric} "
            f"{quantized.value:.4f} to float32 (mean cosine {quantized.cosine:.5f})"
        )
        return 0
    result = export_onnx(
        repo_dir, args.task, args.out / "model.onnx", repo_id=args.model, revision=repo_dir.name, fp16=args.fp16
    )
    provider = active_provider(create_session(result.path))
    print(
        f"wrote {result.path} ({args.task}, {result.precision}; outputs {', '.join(result.output_names)}); "
        f"parity with torch: max abs diff {result.max_abs_diff:.2g} (limit {result.parity_limit:.2g}); "
        f"runs on {provider}"
    )
    return 0


ROUTE_TASKS = {"embed": "features", "classify": "classification", "segment": "segmentation"}


def curl_examples(models: list[str], url: str, examples: list[Path]) -> list[str]:
    """Per route, one curl command for each input dimensionality (2D, 3D) that a served model takes for it."""
    by_dims = {read_image(path).spatial_dims: path for path in examples}
    served = []
    for model in models:
        repo_dir = resolve_repo(model)
        served.append((model, MedicalImageProcessor.from_pretrained(repo_dir).spatial_dims, available_tasks(repo_dir)))
    lines = []
    for route, task in ROUTE_TASKS.items():
        shown: set[int] = set()
        for model, dims, tasks in served:
            if task in tasks and dims not in shown:
                shown.add(dims)
                example = by_dims.get(dims, Path("image.png" if dims == 2 else "volume.nii.gz"))
                output = f" -o mask{'.png' if dims == 2 else '.nii.gz'}" if route == "segment" else ""
                lines.append(f"curl -F file=@{example} -F model={model} {url}/{route}{output}")
    return lines + [f"curl {url}/models"]


def serve_environment(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: a flag given on the command line wins, else the variable already set in
    `environ`, else (unset) the service's default; flags left out never overwrite the environment."""
    given = {
        "MEDHUB_DEVICE": args.device,
        "MEDHUB_FP16": "1" if args.fp16 else None,
        "MEDHUB_INT8": "1" if args.int8 else None,
        "MEDHUB_WORKERS": args.workers,
        "MEDHUB_MAX_BODY_MB": args.max_body_mb,
        "MEDHUB_MAX_ARRAY_MB": args.max_array_mb,
        "MEDHUB_MAX_CONCURRENCY": args.max_concurrency,
        "MEDHUB_TIMEOUT": args.timeout,
    }
    flags = {name: str(value) for name, value in given.items() if value is not None}
    return {**environ, "MEDHUB_MODELS": ",".join(args.model), **flags, "BENTOML_DO_NOT_TRACK": "True"}


def cmd_serve(args: argparse.Namespace) -> int:
    if args.fp16 and args.int8:
        raise MedhubError("choose one of --fp16 and --int8")
    for model in args.model:
        resolve_repo(model)  # fail here, in one line, rather than inside the server's worker
    bentoml = shutil.which("bentoml", path=os.path.dirname(sys.executable)) or shutil.which("bentoml")
    if bentoml is None:
        raise MedhubError("the bentoml command is not installed in this environment")
    env = serve_environment(args, os.environ)
    root = Path(__file__).resolve().parents[1]
    command = [
        bentoml,
        "serve",
        "serving.service:MedhubService",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--working-dir",
        str(root),
    ]
    url = f"http://{args.host}:{args.port}"
    print(f"medhub serve: {url} ({', '.join(args.model)}); once /readyz answers 200, try:", flush=True)
    for line in curl_examples(args.model, url, args.example):
        print(f"  {line}", flush=True)
    os.execve(bentoml, command, env)
    return 0
