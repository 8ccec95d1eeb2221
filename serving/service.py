"""The BentoML service: /embed, /classify, /segment (POST, multipart `file` + `model`) and GET /models.

Models, limits and the token come from the environment (see `serving.settings.ServeSettings`); `medhub serve`
sets them from its flags. Preprocessing is each repo's `preprocessor_config.json`, applied by hub's processor.

BentoML's arbiter process imports this module too, only to read the service's configuration: the request path
(torch, ONNX Runtime, hub's readers and models, pydicom) is imported inside the functions that run in the worker,
so that the arbiter stays small: it held 994 MiB RSS with those imports here (tests/test_serving.py bounds it).
"""

import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .memory import release_free_memory, tune_allocator
from .middleware import RequestGuard
from .settings import ServeSettings

if TYPE_CHECKING:
    from hub.errors import MedhubError
    from hub.io import ImageSource

    from .models import ServedModel

logger = logging.getLogger("medhub.serving")
logging.getLogger("medhub").setLevel(logging.INFO)  # BentoML's root handler then shows loads and exports
tune_allocator()
SETTINGS = ServeSettings.from_env()
LOADED: dict[str, "ServedModel"] = {}  # this worker's models, shared with the /models route and the guard
MASK_MEDIA = {"png": "image/png", "nifti": "application/gzip"}
DICOM_MEDIA = "application/dicom"
NO_UPLOAD = Path()  # the `file` default when a `dicomweb` reference replaces it (BentoML rejects `Path | None` uploads)
FORMS = {
    "/embed": {"file", "dicomweb", "model", "layers"},
    "/classify": {"file", "dicomweb", "model", "format"},
    "/segment": {"file", "dicomweb", "model", "format", "store"},
}


class JSONResponse(Response):
    """JSON that takes numpy arrays as they are: float32 values in their shortest exact form (half the bytes of
    float64 text) and about 30x faster to write than `json.dumps` of `.tolist()` for a 2048-float embedding."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def status_for(error: "MedhubError") -> int:
    """The HTTP status of a user error; the message is safe to return (no file names, no header values)."""
    from hub.errors import CorruptFileError, LimitExceededError, UnsupportedFormatError

    from .batching import ServiceOverloaded
    from .dicomweb import DicomwebNotFoundError, DicomwebUnavailableError
    from .models import DeadlinePassedError, DimensionalityError, TaskNotAvailableError, UnknownModelError

    if isinstance(error, (UnknownModelError, DicomwebNotFoundError)):
        return 404
    if isinstance(error, DicomwebUnavailableError):
        return 502
    if isinstance(error, DeadlinePassedError):
        return 504
    if isinstance(error, LimitExceededError):
        return 413
    if isinstance(error, ServiceOverloaded):
        return 503
    if isinstance(error, UnsupportedFormatError):
        return 415
    if isinstance(error, (CorruptFileError, DimensionalityError, TaskNotAvailableError)):
        return 422
    return 400


def error_response(error: "MedhubError") -> JSONResponse:
    status = status_for(error)
    logger.info("request refused with %d (%s)", status, type(error).__name__)
    return JSONResponse({"error": str(error)}, status_code=status)


def providers() -> str:
    return ",".join(sorted({model.provider for model in LOADED.values()})) or "none"


async def list_models(request: Request) -> JSONResponse:
    # the worker's pid tells clients (and the workers test) which of the service's processes answered
    return JSONResponse(
        {"models": [model.describe() for model in LOADED.values()]}, headers={"x-medhub-worker": str(os.getpid())}
    )


models_app = Starlette(routes=[Route("/models", list_models, methods=["GET"])])


@bentoml.service(
    name="medhub",
    workers=SETTINGS.worker_count(),  # processes; each loads every model and shares the ONNX cache
    threads=SETTINGS.max_concurrency,  # request threads mostly wait on the micro-batcher
    traffic={"timeout": SETTINGS.timeout, "max_concurrency": SETTINGS.max_concurrency},
)
class MedhubService:
    """Feature extraction, classification and segmentation of PNG, JPEG, DICOM and NIfTI uploads."""

    def __init__(self) -> None:
        if not SETTINGS.models:
            raise RuntimeError("no models to serve: set MEDHUB_MODELS or pass --model to `medhub serve`")
        import torch

        from .models import load_served_model

        # Request threads preprocess in parallel; torch's own thread pool (used for resizing) would fight ONNX
        # Runtime's.
        torch.set_num_threads(1)
        for model_id in SETTINGS.models:
            LOADED[model_id] = load_served_model(
                model_id,
                SETTINGS.onnx_cache,
                SETTINGS.device,
                SETTINGS.threads or None,
                SETTINGS.fp16,
                SETTINGS.runners or None,
                SETTINGS.max_batch or None,
                SETTINGS.int8,
                SETTINGS.worker_count(),
            )
            logger.info("serving %s on %s", model_id, LOADED[model_id].provider)

    def __is_ready__(self) -> bool:
        return len(LOADED) == len(SETTINGS.models)

    @bentoml.api(route="/embed")
    def embed(self, file: Path = NO_UPLOAD, dicomweb: str = "", model: str = "", layers: str | int = "") -> dict:
        """Pooled embedding (`pooler_output`) of the upload; `layers` = comma-separated hidden-state indices
        (BentoML json-decodes form text, so a single index arrives as an int)."""

        def run(served: "ServedModel", data: "ImageSource") -> Response:
            text = str(layers)
            wanted = [int(item) for item in text.split(",") if item.strip()] if text else None
            result = served.embed(data, SETTINGS.read_limits(), wanted)
            return JSONResponse({"model": served.id, **result, "provider": served.provider})

        return _handle(file, dicomweb, model, run)

    @bentoml.api(route="/classify")
    def classify(self, file: Path = NO_UPLOAD, dicomweb: str = "", model: str = "", format: str = "") -> dict:
        """Label probabilities (softmax, or per-label sigmoid for multi-label models), most likely first;
        `format=dicom-sr`: the same as a DICOM Comprehensive SR (DICOM inputs)."""

        def run(served: "ServedModel", data: "ImageSource") -> Response:
            from hub.errors import InputError

            if format == "dicom-sr":
                return Response(served.classification_sr(data, SETTINGS.read_limits()), media_type=DICOM_MEDIA)
            if format not in ("", "json"):
                raise InputError(f"format {format!r} is unknown; expected json or dicom-sr")
            labels = served.classify(data, SETTINGS.read_limits())
            return JSONResponse({"model": served.id, "labels": labels, "provider": served.provider})

        return _handle(file, dicomweb, model, run)

    @bentoml.api(route="/segment")
    def segment(
        self, file: Path = NO_UPLOAD, dicomweb: str = "", model: str = "", format: str = "", store: bool = False
    ) -> dict:
        """A label mask in the input's geometry: `png` (2D), `nifti` (3D, .nii.gz), a `json` summary or a
        `dicom-seg` DICOM Segmentation (DICOM inputs). `store=true` (with `dicomweb`) stores the SEG on the
        first configured DICOMweb server instead and answers its UIDs as JSON."""

        deadline = time.monotonic() + SETTINGS.timeout  # BentoML answers 504 then; the tile loop stops too

        def run(served: "ServedModel", data: "ImageSource") -> Response:
            from hub.errors import InputError
            from hub.io import encode_mask

            from .dicomweb import store_result

            if store:
                if not dicomweb:
                    raise InputError(
                        "field 'store' needs a 'dicomweb' reference; an uploaded file has no server to store to"
                    )
                seg = served.segmentation_dicom(data, SETTINGS.read_limits(), deadline)
                uids = store_result(seg, SETTINGS.dicomweb_urls, SETTINGS.dicomweb_token)
                return JSONResponse({"model": served.id, "stored": uids})
            if format == "dicom-seg":
                return Response(
                    served.segmentation_dicom(data, SETTINGS.read_limits(), deadline), media_type=DICOM_MEDIA
                )
            mask, image = served.segment(data, SETTINGS.read_limits(), deadline)
            wanted = format or ("png" if image.spatial_dims == 2 else "nifti")
            if wanted == "json":
                return JSONResponse(served.mask_summary(mask, image))
            if wanted not in MASK_MEDIA:
                raise InputError(f"format {wanted!r} is unknown; expected png, nifti, json or dicom-seg")
            return Response(encode_mask(mask, image, wanted), media_type=MASK_MEDIA[wanted])

        return _handle(file, dicomweb, model, run)


def _handle(file: Path, dicomweb: str, model: str, run: "Callable[[ServedModel, ImageSource], Response]") -> Response:
    from hub.errors import InputError, MedhubError

    from .dicomweb import fetch
    from .models import UnknownModelError

    try:
        if not dicomweb and (
            not isinstance(file, Path) or file == NO_UPLOAD
        ):  # the guard admits only multipart uploads; never open a client string
            raise InputError("field 'file' must be a multipart upload of a PNG, JPEG, DICOM or NIfTI file")
        if not model:
            raise InputError(f"missing field 'model'; this service has {', '.join(LOADED)}")
        if model not in LOADED:
            raise UnknownModelError(f"model {model!r} is not loaded; this service has {', '.join(LOADED)}")
        if dicomweb:  # UIDs on a configured server, checked against the limits before any pixel data
            return run(
                LOADED[model], fetch(dicomweb, SETTINGS.dicomweb_urls, SETTINGS.dicomweb_token, SETTINGS.read_limits())
            )
        try:
            data = file.read_bytes()
        finally:  # BentoML removes its request temp dirs only at shutdown; the bytes are all the handler needs
            file.unlink(missing_ok=True)
        if not data:
            raise InputError("the uploaded file is empty")
        return run(LOADED[model], data)
    except MedhubError as error:
        return error_response(error)
    except ValueError as error:  # malformed form values, e.g. a non-integer layer index
        return error_response(InputError(f"bad request field: {error}"))
    except Exception as error:  # a defect to fix: one line naming its type and place, never its message or values
        where = traceback.extract_tb(error.__traceback__)[-1]
        logger.error(
            "unexpected %s at %s:%d in %s; answered 500",
            type(error).__name__,
            Path(where.filename).name,
            where.lineno,
            where.name,
        )
        return JSONResponse({"error": "internal error; the service logged its type and place"}, status_code=500)
    finally:
        release_free_memory()


MedhubService.mount_asgi_app(models_app, path="/")  # BentoML mounts match only their own routes
MedhubService.add_asgi_middleware(
    RequestGuard, max_body_bytes=SETTINGS.max_body_bytes, token=SETTINGS.token, provider=providers, forms=FORMS
)
