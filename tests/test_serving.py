"""The HTTP service, as a real `bentoml serve` process on 127.0.0.1, called over HTTP."""

import concurrent.futures
import io
import os
from pathlib import Path

import numpy as np
import psutil
import pydicom
import pytest
import SimpleITK as sitk
import torch
from embed_fixtures import tiny_encoder_repo
from io_fixtures import MNI_T1, dicom_file
from live_server import live_server
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from hub.catalogue import get_variant
from hub.export import Provenance, export_variant
from hub.io import read_image
from hub.models.macl import MaclForSemanticSegmentation
from hub.models.muscle import (
    MuscleForImageClassification,
    MuscleForSemanticSegmentation,
)

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx")
TOKEN = "s3cret-token"
ENCODERS_2D = ("umedpt-tiny", "medcoss-tiny", "macl-tiny")  # one per 2D family besides the MUSCLE classifier
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ARBITER_RSS_BOUND = 300 * 1024**2


def tiny_head_repo(out: Path, head_class, labels: list[str], variant_id: str = "muscle-resnet18-tiny") -> Path:
    variant = get_variant(variant_id)
    config = variant.build_config(
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)}
    )
    torch.manual_seed(0)
    return export_variant(head_class(config), out, variant, Provenance("trained", "test"))


def served_repos(root: Path) -> dict[str, Path]:
    """The tiny models the service tests serve, built into `root`."""
    return {
        **{variant: tiny_encoder_repo(root / variant, variant) for variant in ENCODERS_2D},
        "classifier": tiny_head_repo(root / "classifier", MuscleForImageClassification, ["normal", "nodule"]),
        "segmenter": tiny_head_repo(root / "segmenter", MuscleForSemanticSegmentation, ["background", "lung"]),
        "volume": tiny_head_repo(
            root / "volume", MaclForSemanticSegmentation, ["background", "liver"], "macl-unet3d-tiny"
        ),
    }


def shared_repos(built_once) -> dict[str, Path]:
    """`served_repos`, built once for the modules that serve them (this one, DICOM SEG, privacy, fuzz, deadline)."""
    return built_once("served-repos", served_repos)


def shared_onnx_cache(built_once) -> Path:
    """The ONNX cache of the servers of `served_repos`: the first server to load a model exports its graphs."""
    return built_once("served-onnx-cache", lambda folder: folder)


@pytest.fixture(scope="module")
def repos(built_once) -> dict[str, Path]:
    return shared_repos(built_once)


@pytest.fixture(scope="module")
def server(repos, built_once, tmp_path_factory, request):
    """One server for the module: token on, 12 MiB body limit, at most 2 requests in flight. The modules that use
    it share one ONNX cache, so the graphs are exported by the first server only."""
    root = tmp_path_factory.mktemp("server")
    env = {
        "MEDHUB_ONNX_CACHE": str(shared_onnx_cache(built_once)),
        "MEDHUB_API_TOKEN": TOKEN,
        "MEDHUB_MAX_BODY_MB": "12",
        "MEDHUB_MAX_CONCURRENCY": "2",
        "MEDHUB_THREADS": "1",
    }
    (root / "tmp").mkdir()
    if getattr(request.module, "OWN_TEMP_DIRS", False):  # the privacy tests read the request temp dirs and home
        env.update(TMPDIR=str(root / "tmp"), BENTOML_HOME=str(root / "bentoml"))
    with live_server(list(repos.values()), root / "server.log", env) as live:
        yield {
            "url": live.url,
            "log": live.log,
            "repos": repos,
            "tmp": root / "tmp",
            "home": root / "bentoml",
            "pid": live.process.pid,
        }


def post(server, route: str, data: bytes, model: str, headers=AUTH, **fields) -> "httpx.Response":
    files = {"file": ("upload.bin", data, "application/octet-stream")}
    return httpx.post(
        f"{server['url']}/{route}", files=files, data={"model": model, **fields}, headers=headers, timeout=60
    )


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def radiograph() -> bytes:
    rng = np.random.default_rng(0)
    return png_bytes((rng.random((90, 110)) * 65535).astype(np.uint16))


def in_process_embedding(repo: Path, source) -> np.ndarray:
    processor = AutoImageProcessor.from_pretrained(repo)
    model = AutoModel.from_pretrained(repo).eval()
    with torch.no_grad():
        return model(**processor(source)).pooler_output[0].numpy()


def test_readyz_reports_provider_and_models_lists_both(server):
    ready = httpx.get(f"{server['url']}/readyz")
    assert ready.status_code == 200 and ready.headers["x-medhub-provider"] == "CPUExecutionProvider"
    models = httpx.get(f"{server['url']}/models", headers=AUTH).json()["models"]
    by_id = {model["id"]: model for model in models}
    classifier = by_id[str(server["repos"]["classifier"])]
    assert classifier["family"] == "muscle" and classifier["tasks"] == ["classification", "features"]
    assert classifier["labels"] == ["normal", "nodule"] and classifier["input"]["size"] == [64, 64]


def test_the_arbiter_stays_small_and_only_workers_load_torch(server):
    """BentoML's arbiter (the `bentoml serve` process `medhub serve` becomes) imports the service only for its
    configuration; it held 994 MiB RSS while the service module imported torch."""
    arbiter = psutil.Process(server["pid"])
    workers = arbiter.children(recursive=True)

    def loads_torch(process: psutil.Process) -> bool:
        return any("libtorch" in Path(region.path).name for region in process.memory_maps())

    assert workers and all(loads_torch(worker) for worker in workers)  # what the arbiter's check looks for is there
    assert not loads_torch(arbiter)
    assert arbiter.memory_info().rss < ARBITER_RSS_BOUND, f"arbiter RSS {arbiter.memory_info().rss >> 20} MiB"


def test_embed_png_with_layers(server, radiograph):
    repo = server["repos"]["classifier"]
    response = post(server, "embed", radiograph, str(repo), layers="0,4")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == 64 and body["provider"] == "CPUExecutionProvider"
    assert len(body["layers"]["0"]) == 8 and len(body["layers"]["4"]) == 64
    single = post(server, "embed", radiograph, str(repo), layers="4")  # BentoML decodes "4" to the int 4
    assert single.status_code == 200, single.text
    assert list(single.json()["layers"]) == ["4"] and single.json()["layers"]["4"] == body["layers"]["4"]
    out_of_range = post(server, "embed", radiograph, str(repo), layers="9")
    assert out_of_range.status_code == 400 and "9" in out_of_range.json()["error"], out_of_range.text


@pytest.mark.parametrize("name", ["classifier", *ENCODERS_2D])
def test_embed_png_equals_in_process_model_for_each_2d_family(server, radiograph, name):
    repo = server["repos"][name]
    response = post(server, "embed", radiograph, str(repo))
    assert response.status_code == 200, response.text
    expected = in_process_embedding(repo, radiograph)
    assert np.abs(np.array(response.json()["embedding"]) - expected).max() <= 1e-4


def test_embed_dicom_equals_in_process_model(server):
    repo = server["repos"]["classifier"]
    data = dicom_file("RG1_UNCI.dcm").read_bytes()
    response = post(server, "embed", data, str(repo))
    assert response.status_code == 200, response.text
    expected = in_process_embedding(repo, dicom_file("RG1_UNCI.dcm"))
    assert np.abs(np.array(response.json()["embedding"]) - expected).max() <= 1e-4


def test_classify_probabilities_sum_to_one(server, radiograph):
    response = post(server, "classify", radiograph, str(server["repos"]["classifier"]))
    assert response.status_code == 200, response.text
    labels = response.json()["labels"]
    assert {item["label"] for item in labels} == {"normal", "nodule"}
    assert abs(sum(item["probability"] for item in labels) - 1.0) < 1e-9
    assert labels[0]["probability"] >= labels[1]["probability"]


def test_segment_returns_png_mask_of_input_size_and_json_summary(server, radiograph):
    repo = str(server["repos"]["segmenter"])
    response = post(server, "segment", radiograph, repo)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(response.content))
    assert png.mode == "P" and png.getpalette()[:6] == [0, 0, 0, 230, 25, 75]
    mask = np.array(png)
    assert mask.shape == (90, 110) and set(np.unique(mask)) <= {0, 1}
    summary = post(server, "segment", radiograph, repo, format="json").json()
    spacing = read_image(radiograph).spacing[::-1]
    assert (summary["axes"], summary["shape"], summary["spacing"]) == ("yx", [90, 110], list(spacing))
    assert [label["area_mm2"] for label in summary["labels"]] == pytest.approx(
        [label["voxels"] * spacing[0] * spacing[1] for label in summary["labels"]]
    )
    assert sum(label["voxels"] for label in summary["labels"]) == 90 * 110
    assert [label["voxels"] for label in summary["labels"]] == [int((mask == 0).sum()), int((mask == 1).sum())]


def ct_volume(path: Path) -> Path:
    """A 20x40x36 int16 volume with non-trivial spacing, origin and direction."""
    rng = np.random.default_rng(2)
    image = sitk.GetImageFromArray((rng.random((20, 40, 36)) * 2000 - 1000).astype(np.int16))
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((-12.5, 30.0, 7.25))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return path


def test_embed_nifti_equals_in_process_model(server):
    repo = server["repos"]["volume"]
    response = post(server, "embed", MNI_T1.read_bytes(), str(repo))
    assert response.status_code == 200, response.text
    # a 3D repo without a resize embeds a volume as the mean of its sliding-window tiles' pooled features
    processor = AutoImageProcessor.from_pretrained(repo)
    model = AutoModel.from_pretrained(repo).eval()
    with torch.no_grad():
        tiles = model(pixel_values=torch.from_numpy(processor.tile(MNI_T1).tiles)).pooler_output
    expected = tiles.double().mean(dim=0).numpy()
    assert len(tiles) > 1
    assert np.abs(np.array(response.json()["embedding"]) - expected).max() <= 1e-4


def test_segment_nifti_mask_has_the_input_geometry(server, tmp_path):
    volume = ct_volume(tmp_path / "ct.nii.gz")
    response = post(server, "segment", volume.read_bytes(), str(server["repos"]["volume"]))
    assert response.status_code == 200, response.text
    (tmp_path / "mask.nii.gz").write_bytes(response.content)
    mask, source = sitk.ReadImage(str(tmp_path / "mask.nii.gz")), sitk.ReadImage(str(volume))
    assert mask.GetSize() == source.GetSize() == (36, 40, 20)
    np.testing.assert_allclose(mask.GetSpacing(), source.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(mask.GetDirection(), source.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    summary = post(server, "segment", volume.read_bytes(), str(server["repos"]["volume"]), format="json").json()
    assert (summary["axes"], summary["shape"]) == ("zyx", [20, 40, 36])
    assert summary["spacing"] == pytest.approx([2.5, 0.7, 0.8])
    assert [label["volume_ml"] for label in summary["labels"]] == pytest.approx(
        [label["voxels"] * 2.5 * 0.7 * 0.8 / 1000 for label in summary["labels"]]
    )


def nifti_bytes(tmp_path: Path) -> bytes:
    return ct_volume(tmp_path / "v.nii.gz").read_bytes()


def bomb_png() -> bytes:
    data = bytearray(png_bytes(np.zeros((4, 4), dtype=np.uint8)))
    data[16:24] = (40000).to_bytes(4, "big") * 2  # IHDR width and height; the CRC no longer matters to the check
    return bytes(data)


@pytest.mark.parametrize(
    ("case", "status", "fragment"),
    [
        ("unknown model", 404, "is not loaded"),
        ("corrupt file", 422, ""),
        ("empty file", 400, "empty"),
        ("png bomb", 413, "40000"),
        ("volume to 2D model", 422, "3D image"),
        ("image to 3D model", 422, "takes 3D input"),
        ("wrong field", 400, "unknown form field"),
        ("json body", 415, "multipart"),
        ("oversize body", 413, "over the limit"),
        ("no token", 401, "bearer token"),
        ("wrong token", 401, "bearer token"),
    ],
)
def test_bad_requests_get_a_4xx_json_error(server, radiograph, tmp_path, case, status, fragment):
    model = str(server["repos"]["classifier"])
    url = f"{server['url']}/embed"
    if case == "unknown model":
        response = post(server, "embed", radiograph, "org/not-served")
    elif case == "corrupt file":
        response = post(server, "embed", radiograph[:40] + b"\x00" * 200, model)
    elif case == "empty file":
        response = post(server, "embed", b"", model)
    elif case == "png bomb":
        response = post(server, "embed", bomb_png(), model)
    elif case == "volume to 2D model":
        response = post(server, "embed", nifti_bytes(tmp_path), model)
    elif case == "image to 3D model":
        response = post(server, "embed", radiograph, str(server["repos"]["volume"]))
    elif case == "wrong field":
        response = httpx.post(url, files={"image": ("x.png", radiograph)}, data={"model": model}, headers=AUTH)
    elif case == "json body":
        response = httpx.post(url, json={"file": "/etc/passwd", "model": model}, headers=AUTH)
    elif case == "oversize body":
        response = post(server, "embed", os.urandom(13 * 1024 * 1024), model)
    elif case == "no token":
        response = post(server, "embed", radiograph, model, headers={})
    else:
        response = post(server, "embed", radiograph, model, headers={"Authorization": "Bearer wrong"})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert httpx.get(f"{server['url']}/readyz").status_code == 200


def test_more_concurrent_requests_than_allowed_get_429(server):
    rng = np.random.default_rng(1)
    big = png_bytes((rng.random((1200, 1200)) * 65535).astype(np.uint16))
    model = str(server["repos"]["classifier"])
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        codes = list(pool.map(lambda _: post(server, "embed", big, model).status_code, range(10)))
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    assert httpx.get(f"{server['url']}/readyz").status_code == 200


def test_patient_name_never_reaches_the_log(server, tmp_path):
    dataset = pydicom.dcmread(dicom_file("RG1_UNCI.dcm"))
    dataset.PatientName = "Zebulon^Quixote"
    dataset.PatientID = "MRN-99887766"
    dataset.save_as(tmp_path / "named.dcm")
    data = (tmp_path / "named.dcm").read_bytes()
    assert post(server, "embed", data, str(server["repos"]["classifier"])).status_code == 200
    assert post(server, "embed", data[: len(data) // 3], str(server["repos"]["classifier"])).status_code in (
        413,
        415,
        422,
    )
    log = server["log"].read_text()
    assert "Zebulon" not in log and "Quixote" not in log and "99887766" not in log


def test_printed_segment_curls_save_the_mask_to_a_file(server):
    from serving.cli import curl_examples

    repos = server["repos"]
    lines = curl_examples([str(repos["segmenter"]), str(repos["volume"])], "http://h:1", [])
    segment = [line for line in lines if "h:1/segment" in line]
    assert [line.split()[-2:] for line in segment] == [["-o", "mask.png"], ["-o", "mask.nii.gz"]]
    assert all(" -o " not in line for line in lines if "h:1/segment" not in line)
