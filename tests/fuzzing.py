"""A seeded mutation fuzzer for the service's readers, and a harness that runs it against a real server process.

Each format starts from real files (PNG and JPEG written by Pillow, DICOM files from pydicom and pydicom-data
that take both the pydicom and the GDCM decode path, NIfTI from nilearn's MNI template as .nii and .nii.gz) and
applies one or two mutations drawn from: bit flips, byte inserts, range deletes, truncations, header-field edits
(zero, negative, huge, NaN/inf, wrong types and VRs, deep sequences) and compressed bombs. The same seed gives the
same inputs, so a failing case can be replayed with `case(format, seed, index)`.
Used by tests/test_serving_fuzz.py and benchmarks/fuzz_serving.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import io
import os
import random
import struct
import subprocess
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import psutil
import pydicom
import pydicom.config
from io_fixtures import MNI_T1, PYDICOM_TEST_FILES, dicom_file
from live_server import REPO_ROOT, live_server
from PIL import Image

FORMATS = ("png", "jpeg", "dicom", "nifti")

# DICOM seeds: uncompressed greyscale single frames (pydicom decodes them) and compressed or colour files (GDCM).
PYDICOM_PATH_SEEDS = ("CT_small.dcm", "MR_small.dcm")
GDCM_PATH_SEEDS = ("MR_small_RLE.dcm", "JPEG-LL.dcm", "OBXXXX1A_rle.dcm", "SC_rgb.dcm")

INT_EDITS = (0, -1, 1, 65535, 2**31 - 1, -(2**31), 50_000_000)
FLOAT_EDITS = (0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 1e-38)
TEXT_EDITS = ("", "NaN", "inf", "-inf", "1e308", "-1", "0", "1\\2\\3", "abc", "9" * 64)


# ---- seeds -------------------------------------------------------------------------------------------------


def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    """``array`` written by Pillow in ``fmt``."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@cache
def seeds(fmt: str) -> tuple[bytes, ...]:
    rng = np.random.default_rng(0)
    if fmt == "png":
        return (
            encode((rng.random((64, 80)) * 255).astype(np.uint8), "PNG"),
            encode((rng.random((90, 110)) * 65535).astype(np.uint16), "PNG"),
            encode((rng.random((48, 48, 3)) * 255).astype(np.uint8), "PNG"),
        )
    if fmt == "jpeg":
        return (
            encode((rng.random((64, 64)) * 255).astype(np.uint8), "JPEG", quality=90),
            encode((rng.random((64, 80, 3)) * 255).astype(np.uint8), "JPEG", quality=75, progressive=True),
        )
    if fmt == "dicom":
        paths = [PYDICOM_TEST_FILES / name for name in PYDICOM_PATH_SEEDS]
        paths += [PYDICOM_TEST_FILES / "MR_small_RLE.dcm"] + [dicom_file(name) for name in GDCM_PATH_SEEDS[1:]]
        return tuple(path.read_bytes() for path in paths)
    if fmt == "nifti":
        small = _small_mni()
        return (
            nib.Nifti1Image(small, np.diag([6.0, 6.0, 6.0, 1.0])).to_bytes(),
            _gz(nib.Nifti1Image(small.astype(np.int16) * 40 - 1000, np.diag([6.0, 6.0, 6.0, 1.0])).to_bytes()),
            _gz(_small_mni_with_its_header()),
        )
    raise ValueError(f"unknown format {fmt!r}")


def _small_mni() -> np.ndarray:
    """Every 6th voxel of the MNI template (33 x 39 x 32, uint8): fast enough for hundreds of 3D requests."""
    return np.asarray(nib.load(MNI_T1).dataobj)[::6, ::6, ::6].copy()


def _small_mni_with_its_header() -> bytes:
    """The small template under the real file's own header (its qform/sform, codes, description), its affine
    scaled to the 6 mm grid: the full 1 mm template is 1,848 tiles for the 3D model, 10-20 s per request on CPU."""
    template = nib.load(MNI_T1)
    affine = template.affine @ np.diag([6.0, 6.0, 6.0, 1.0])
    return nib.Nifti1Image(_small_mni(), affine, header=template.header).to_bytes()


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


# ---- generic byte mutations ----------------------------------------------------------------------------------


def bit_flips(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        position = rng.randrange(len(out))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def insert(data: bytes, rng: random.Random) -> bytes:
    position = rng.randrange(len(data) + 1)
    chunk = rng.choice([os.urandom(rng.randint(1, 64)), b"\x00" * rng.randint(1, 4096), b"\xff" * rng.randint(1, 64)])
    return data[:position] + chunk + data[position:]


def delete(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, max(1, len(data) // 8)) :]


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, len(data))]


BYTE_MUTATIONS: tuple[Callable[[bytes, random.Random], bytes], ...] = (bit_flips, insert, delete, truncate)


# ---- format-aware header edits ---------------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_edit(data: bytes, rng: random.Random) -> bytes:
    """IHDR width/height/bit depth/colour type set to edge values; the CRC is fixed half of the time."""
    out = bytearray(data)
    field_ = rng.choice(["size", "width", "height", "depth", "colour"])
    if field_ == "size":
        width, height = rng.choice([(1, 50_000_000), (50_000_000, 1), (40000, 40000), (0, 0), (2**31 - 1, 2**31 - 1)])
        out[16:24] = struct.pack(">II", width, height)
    elif field_ in ("width", "height"):
        offset = 16 if field_ == "width" else 20
        out[offset : offset + 4] = struct.pack(">I", rng.choice(INT_EDITS) & 0xFFFFFFFF)
    elif field_ == "depth":
        out[24] = rng.choice([0, 3, 7, 32, 255])
    else:
        out[25] = rng.choice([1, 5, 7, 255])
    if rng.random() < 0.5:
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    return bytes(out)


@cache
def png_bomb(width: int, height: int, depth: int) -> bytes:
    """A greyscale PNG of zeros: a few hundred KB that decode to width x height x depth/8 bytes."""
    row = b"\x00" + b"\x00" * (width * depth // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def png_bombs(_: bytes, rng: random.Random) -> bytes:
    return png_bomb(*rng.choice([(12000, 12000, 8), (7000, 7000, 16), (1, 2_000_000, 8), (2_000_000, 1, 16)]))


def jpeg_header_edit(data: bytes, rng: random.Random) -> bytes:
    """The frame header (SOFn): precision, height, width or component count set to edge values."""
    out = bytearray(data)
    start = next((i for i in range(2, len(out) - 10) if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2)), None)
    if start is None:
        return bit_flips(data, rng)
    field_ = rng.choice(["precision", "height", "width", "components"])
    if field_ == "precision":
        out[start + 4] = rng.choice([0, 1, 12, 16, 255])
    elif field_ == "components":
        out[start + 9] = rng.choice([0, 2, 4, 255])
    else:
        offset = start + (5 if field_ == "height" else 7)
        out[offset : offset + 2] = struct.pack(">H", rng.choice([0, 1, 65535, 65500]))
    return bytes(out)


@cache
def jpeg_bomb() -> bytes:
    """A 7000 x 7000 greyscale JPEG of zeros (49 M pixels, just inside the default pixel budget)."""
    return encode(np.zeros((7000, 7000), dtype=np.uint8), "JPEG", quality=50)


def jpeg_bombs(_: bytes, rng: random.Random) -> bytes:
    return jpeg_bomb()


DICOM_US = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "SamplesPerPixel",
    "PixelRepresentation",
    "PlanarConfiguration",
)
DICOM_TEXT = (
    "RescaleSlope",
    "RescaleIntercept",
    "PixelSpacing",
    "SliceThickness",
    "WindowCenter",
    "WindowWidth",
    "NumberOfFrames",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PhotometricInterpretation",
)


def dicom_header_edit(data: bytes, rng: random.Random) -> bytes:
    """A pixel-module or rescale element set to an edge value, a wrong VR, or a string where a number belongs
    (bit flips instead where an earlier mutation left a file pydicom cannot write back)."""
    try:
        return _dicom_header_edit(data, rng)
    except Exception:  # pydicom may raise anything on an already-mutated file
        return bit_flips(data, rng)


def _dicom_header_edit(data: bytes, rng: random.Random) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    keyword = rng.choice(DICOM_US + DICOM_TEXT)
    tag = pydicom.datadict.tag_for_keyword(keyword)
    kind = rng.choice(["value", "wrong type", "delete"])
    if kind == "delete":
        if keyword in dataset:
            del dataset[keyword]
    elif keyword in DICOM_US and kind == "value":
        dataset.add_new(tag, "US", rng.choice([0, 1, 1024, 65535, 17, 33]))
    elif keyword in DICOM_US and rng.random() < 0.5:
        dataset.add_new(tag, "SS", -1)
    else:
        vr = rng.choice(["DS", "IS", "LO", "CS"] if keyword in DICOM_TEXT else ["LO", "DS"])
        element = pydicom.DataElement(tag, "LO", rng.choice(TEXT_EDITS))  # a raw string, not validated
        element.VR = vr
        dataset[tag] = element
    return _save_dicom(dataset)


def _save_dicom(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    previous = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset.save_as(buffer, enforce_file_format=False)
    finally:
        pydicom.config.settings.writing_validation_mode = previous
    return buffer.getvalue()


def _explicit_little(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:  # an earlier mutation broke the header
        return False
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    return syntax is not None and not syntax.is_implicit_VR and syntax.is_little_endian


def dicom_structure_edit(data: bytes, rng: random.Random) -> bytes:
    """Raw edits pydicom would refuse to write: an unknown VR, a huge element length, or deeply nested sequences
    (undefined lengths) placed before the pixel data."""
    pixel_tag = b"\xe0\x7f\x10\x00"
    position = data.rfind(pixel_tag)
    if position < 0 or not _explicit_little(data):
        return bit_flips(data, rng)
    kind = rng.choice(["vr", "length", "nesting"])
    if kind == "vr":
        rows = data.find(b"\x28\x00\x10\x00US")
        target = rows if rows >= 0 else position
        return data[: target + 4] + rng.choice([b"ZZ", b"\x00\x00", b"UN", b"SQ"]) + data[target + 6 :]
    if kind == "length":
        rows = data.find(b"\x28\x00\x10\x00US")
        if rows < 0:
            return truncate(data, rng)
        return data[: rows + 6] + struct.pack("<H", rng.choice([0, 1, 3, 0xFFFF])) + data[rows + 8 :]
    depth = rng.choice([50, 1200, 5000])
    open_ = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return data[:position] + open_ * depth + close * depth + data[position:]


NIFTI_INT16 = {"dim": 40, "datatype": 70, "bitpix": 72, "qform_code": 252, "sform_code": 254}
NIFTI_FLOAT32 = {
    "pixdim": 76,
    "vox_offset": 108,
    "scl_slope": 112,
    "scl_inter": 116,
    "quatern_b": 256,
    "qoffset_x": 268,
    "srow_x": 280,
}


def nifti_header_edit(data: bytes, rng: random.Random) -> bytes:
    """A NIfTI-1 header field (dims, datatype, spacing, offset, scaling, orientation) set to an edge value; .nii.gz
    inputs are edited inside the stream and compressed again."""
    compressed = data[:2] == b"\x1f\x8b"
    try:
        raw = bytearray(zlib.decompressobj(31).decompress(data) if compressed else data)
    except zlib.error:  # an earlier mutation broke the stream
        return bit_flips(data, rng)
    if len(raw) < 348:
        return bit_flips(data, rng)
    if rng.random() < 0.5:
        name = rng.choice(list(NIFTI_INT16))
        offset = NIFTI_INT16[name] + (2 * rng.randrange(8) if name == "dim" else 0)
        value = rng.choice([0, -1, 1, 7, 8, 32767, -32768, 2, 16, 128, 1792, 2304, 9999])
        raw[offset : offset + 2] = struct.pack("<h", value)
    else:
        name = rng.choice(list(NIFTI_FLOAT32))
        offset = NIFTI_FLOAT32[name] + (4 * rng.randrange(4) if name in ("pixdim", "srow_x") else 0)
        raw[offset : offset + 4] = struct.pack("<f", rng.choice(FLOAT_EDITS))
    return _gz(bytes(raw)) if compressed else bytes(raw)


@cache
def nifti_bomb(shape: tuple[int, int, int]) -> bytes:
    """A .nii.gz of int16 zeros: well under a megabyte on the wire, shape x 2 bytes once decompressed."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\x00" * 4
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\x00" * (1 << 22)
    size = int(np.prod(shape)) * 2
    body = [compressor.compress(raw)] + [
        compressor.compress(chunk[: min(len(chunk), size - i)]) for i in range(0, min(size, 1 << 28), len(chunk))
    ]
    return b"".join(body) + compressor.flush()


def nifti_bombs(_: bytes, rng: random.Random) -> bytes:
    """Inside the default voxel budget (512 x 512 x 400) and far over it (2048^3 and a 1 x 32767^2 sliver, data cut
    at 256 MiB)."""
    return nifti_bomb(rng.choice([(512, 512, 400), (2048, 2048, 2048), (1, 32767, 32767)]))


HEADER_EDITS: dict[str, tuple[Callable[[bytes, random.Random], bytes], ...]] = {
    "png": (png_header_edit,),
    "jpeg": (jpeg_header_edit,),
    "dicom": (dicom_header_edit, dicom_structure_edit),
    "nifti": (nifti_header_edit,),
}
BOMBS = {"png": png_bombs, "jpeg": jpeg_bombs, "nifti": nifti_bombs}
BOMB_RATE = 0.01  # bombs are few: each costs the server real work within the budgets


def case(fmt: str, seed: int, index: int) -> tuple[str, bytes]:
    """The index-th input of a campaign: (what was done, bytes). Deterministic in (fmt, seed, index)."""
    rng = random.Random(f"{fmt}:{seed}:{index}")
    data = rng.choice(seeds(fmt))
    if fmt in BOMBS and rng.random() < BOMB_RATE:
        return "bomb", BOMBS[fmt](data, rng)
    steps = []
    for _ in range(rng.choice([1, 1, 2])):
        mutation = rng.choice(HEADER_EDITS[fmt] * 2 + BYTE_MUTATIONS)
        data = mutation(data, rng) or data[:1]
        steps.append(mutation.__name__)
    return "+".join(steps), data


# ---- the server ---------------------------------------------------------------------------------------------------


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (BentoML's arbiter, its workers and runners)."""
    return sum(process_memory(process).values())


def process_memory(process: psutil.Process, unique: bool = False) -> dict[int, int]:
    """Resident bytes (`unique`: unique set size, slower) of a process and of each descendant, by pid."""
    memory = {}
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            memory[member.pid] = member.memory_full_info().uss if unique else member.memory_info().rss
    return memory


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    rss_start: int = 0
    rss_peak: int = 0
    pids: set[int] = field(default_factory=set)
    restarts: int = 0
    killed_for_memory: bool = False
    process_peaks: dict[int, int] = field(default_factory=dict)  # pid -> peak RSS seen by `watch`

    def rss(self) -> int:
        return tree_rss(psutil.Process(self.process.pid))

    def memory(self, unique: bool = False) -> dict[int, int]:
        """RSS (or USS) by pid: the arbiter (the `bentoml serve` process) first, then its workers."""
        return process_memory(psutil.Process(self.process.pid), unique)

    def watch(self, stop: threading.Event, kill_above: int) -> None:
        """Sample RSS and worker processes every 0.2 s; kill the server if it takes more than ``kill_above`` bytes
        (the machine is shared: a memory bomb must fail the run, not the neighbours)."""
        while not stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(self.process.pid)
                pids = {child.pid for child in parent.children(recursive=True)}
                self.restarts += len(pids - self.pids) if self.pids else 0
                self.pids |= pids
                memory = process_memory(parent)
                for pid, resident in memory.items():
                    self.process_peaks[pid] = max(self.process_peaks.get(pid, 0), resident)
                rss = sum(memory.values())
                self.rss_peak = max(self.rss_peak, rss)
                if rss > kill_above:
                    self.killed_for_memory = True
                    for child in parent.children(recursive=True):
                        child.kill()
                    parent.kill()


@contextlib.contextmanager
def serve(models: list[Path], root: Path, kill_above: int = 8 * 1024**3, **env: str) -> Iterator[Server]:
    """`bentoml serve` the service with ``models`` and the default limits (``env`` overrides), on a free port."""
    environment = {"MEDHUB_ONNX_CACHE": str(root / "onnx"), "PYTHONPATH": str(REPO_ROOT), **env}
    with live_server(models, root / "server.log", environment) as live:
        server = Server(live.url, live.process, live.log)
        server.rss_start = server.rss_peak = server.rss()
        server.pids = {child.pid for child in psutil.Process(live.process.pid).children(recursive=True)}
        stop = threading.Event()
        watcher = threading.Thread(target=server.watch, args=(stop, kill_above), daemon=True)
        watcher.start()
        try:
            yield server
        finally:
            stop.set()
            watcher.join()


def ready_status(server: Server) -> int:
    """/readyz's status code, 0 when the server no longer answers."""
    try:
        return httpx.get(f"{server.url}/readyz", timeout=10).status_code
    except httpx.TransportError:
        return 0


# ---- campaigns -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    fmt: str
    index: int
    mutation: str
    status: int  # 0: no answer (connection dropped or client timeout)
    seconds: float
    body: str


def send(client: httpx.Client, url: str, route: str, model: str, data: bytes, timeout: float) -> tuple[int, str]:
    try:
        response = client.post(
            f"{url}/{route}",
            files={"file": ("upload.bin", data, "application/octet-stream")},
            data={"model": model},
            timeout=timeout,
        )
    except httpx.HTTPError as error:
        return 0, type(error).__name__
    return response.status_code, response.text[:300]


def send_case(
    client: httpx.Client, server: Server, models: dict[str, str], fmt: str, index: int, seed: int, timeout: float
) -> Outcome:
    """The index-th input of `fmt` posted to the server and timed: 2D formats go to ``models["2d"]`` (alternating
    /embed and /classify), NIfTI to ``models["3d"]`` (/embed)."""
    mutation, data = case(fmt, seed, index)
    model = models["3d"] if fmt == "nifti" else models["2d"]
    route = "classify" if fmt != "nifti" and index % 2 else "embed"
    start = time.perf_counter()
    status, body = send(client, server.url, route, model, data, timeout)
    return Outcome(fmt, index, mutation, status, time.perf_counter() - start, body)


def campaign(
    server: Server,
    models: dict[str, str],
    per_format: int,
    seed: int = 0,
    clients: int = 2,
    timeout: float = 30.0,
    progress: Callable[[], None] | None = None,
) -> list[Outcome]:
    """``per_format`` inputs of each format (`send_case`), sent by ``clients`` keep-alive clients."""
    jobs = [(fmt, index) for index in range(per_format) for fmt in FORMATS]
    local = threading.local()

    def run(job: tuple[str, int]) -> Outcome:
        if not hasattr(local, "client"):
            local.client = httpx.Client()
        outcome = send_case(local.client, server, models, *job, seed, timeout)
        if progress is not None:
            progress()
        return outcome

    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(run, jobs))


def server_exceptions(log: Path) -> dict[str, int]:
    """Exception class names in the server log's tracebacks (the last line of each), with their counts."""
    counts: dict[str, int] = {}
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            for follow in lines[i + 1 :]:
                if follow and not follow.startswith((" ", "\t", "Traceback", "During handling", "The above")):
                    name = follow.split(":", 1)[0].strip()
                    counts[name] = counts.get(name, 0) + 1
                    break
    return counts
