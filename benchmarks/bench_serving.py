"""Serving throughput: torch eager vs ONNX Runtime in process vs HTTP /embed with 1, 8 and 32 clients, in float32
and int8, with 1 and 2 service workers.

For muscle-resnet50 and medcoss-vitb (random weights; speed does not depend on them) at 224 px on this machine.
Prints images/s in process at batch 1 and 8, HTTP images/s with p50/p99 latency (compared with ORT at batch 8),
the int8 graph's in-process and HTTP throughput (8 and 32 clients; 1 and 2 workers) with its gate figures
(pooled-feature cosine to float32: minimum and mean over the calibration inputs), and the service's resident
memory, side by side. Throughput on this shared CPU drifts by about 6% from one 8 s run
to the next, so ORT at batch 8 is measured again right before each HTTP run and the mean is the baseline.
Flags run a part (e.g. `--models muscle-resnet50 --clients 32 --int8-clients` for ResNet-50's float32 service at
32 clients only). Goals (issue #8): ORT/eager >= 1.5 for ResNet-50; HTTP with 8+ clients >= 0.85 of ORT in process.
Goals (issue #17): int8 >= 2.5x float32 ORT for ResNet-50 in process, >= 2.2x over HTTP at 8+ clients.
"""

import argparse
import concurrent.futures
import http.client
import io
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from live_server import live_server  # tests/live_server.py: a real service process

import hub  # noqa: F401
from hub.catalogue import VARIANTS, get_variant
from hub.export import Provenance, export_repo
from hub.models import get_family
from hub.processing import MedicalImageProcessor
from serving.models import repo_revision
from serving.onnx_export import export_onnx
from serving.quantize import export_int8
from serving.runtime import create_session

MODELS = [name for name in ("muscle-resnet50", "medcoss-vitb") if name in VARIANTS]
BATCH, CLIENTS, INT8_CLIENTS, WORKERS = 8, (1, 8, 32), (8, 32), (1, 2)
SECONDS = 8.0  # per measurement; --seconds changes it
ROUNDS = 3  # in process, float32 and int8 alternate this many times at each batch size; the medians are printed


def build_repo(variant_id: str, root: Path) -> Path:
    variant = get_variant(variant_id)
    torch.manual_seed(0)
    model = get_family(variant.family).encoder_class(variant.build_config())
    return export_repo(
        model,
        root / variant_id,
        variant=variant_id,
        provenance=Provenance("random-init", "benchmark"),
        processor=variant.build_processor(),
        modality=variant.modality,
    )


def images_per_second(run, batch: int, seconds: float | None = None) -> float:
    run()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < (seconds or SECONDS):
        run()
        count += batch
    return count / (time.perf_counter() - start)


def server_env(cache: Path, int8: bool = False, workers: int = 1) -> dict[str, str]:
    return {
        "MEDHUB_ONNX_CACHE": str(cache),
        "MEDHUB_MAX_CONCURRENCY": "64",
        "BENTOML_DO_NOT_TRACK": "True",
        "MEDHUB_INT8": "1" if int8 else "0",
        "MEDHUB_WORKERS": str(workers),
    }


def http_load(url: str, model: str, png: bytes, clients: int) -> tuple[float, float, float]:
    """Images/s, p50 and p99 latency (ms) with `clients` concurrent clients for SECONDS.

    The clients share this machine's cores with the service, so each sends one multipart body encoded once (by
    httpx, as any client would encode it) over a keep-alive `http.client` connection: about 0.6 ms of CPU per
    request where `httpx.post(files=...)` spends 2-6 ms, CPU the service would otherwise have had."""
    request = httpx.Request(
        "POST", f"{url}/embed", files={"file": ("x.png", png, "application/octet-stream")}, data={"model": model}
    )
    body, headers = request.read(), {"Content-Type": request.headers["content-type"]}
    latencies: list[float] = []
    deadline = time.perf_counter() + SECONDS

    def client() -> None:
        connection = http.client.HTTPConnection(request.url.host, request.url.port, timeout=120)
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                connection.request("POST", "/embed", body, headers)
                response = connection.getresponse()
                content = response.read()
                if response.status != 200:
                    raise RuntimeError(f"/embed answered {response.status}: {content[:200]!r}")
                latencies.append(time.perf_counter() - start)
        finally:
            connection.close()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: client(), range(clients)))
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return len(latencies) / elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def cpu_description() -> str:
    """The CPU's model name and its int8 dot-product instructions: int8 convolutions gain about 2x float32 with AVX2
    alone and more with VNNI (one instruction for what AVX2 does in three), so the int8 ratios depend on them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU: unknown (no /proc/cpuinfo)"
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in info.splitlines())}
    flags = set(fields.get("flags", "").split())
    vnni = ", ".join(sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})) or "no VNNI"
    widest = next((isa for isa in ("avx512f", "avx2") if isa in flags), "no AVX2")
    return f"CPU: {fields.get('model name', '?')}, {widest}, int8 dot product: {vnni}"


def service_rss_mib(process: subprocess.Popen) -> float:
    parent = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--clients", nargs="*", type=int, default=list(CLIENTS), help="float32 HTTP client counts")
    parser.add_argument("--int8-clients", nargs="*", type=int, default=list(INT8_CLIENTS), help="int8 HTTP clients")
    parser.add_argument("--workers", nargs="+", type=int, default=list(WORKERS), help="int8 service worker counts")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="length of each measurement")
    return parser.parse_args()


def in_process(run_fp32, run_int8, batch: int) -> tuple[float, float]:
    """Median images/s of float32 and int8, alternating ROUNDS times (half-length runs), so that drift of the
    shared CPU hits both alike."""
    fp32, int8 = [], []
    for _ in range(ROUNDS):
        fp32.append(images_per_second(run_fp32, batch, SECONDS / 2))
        int8.append(images_per_second(run_int8, batch, SECONDS / 2))
    return float(np.median(fp32)), float(np.median(int8))


def main() -> None:
    global SECONDS
    args = parse_args()
    SECONDS = args.seconds
    clients, int8_clients, worker_counts = tuple(args.clients), tuple(args.int8_clients), tuple(args.workers)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((224, 224)) * 255).astype(np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repos = {name: build_repo(name, root) for name in args.models}
        rows, ort_runs, int8_rows, int8_runs, gates = {}, {}, {}, {}, {}
        for name, repo in repos.items():
            model = get_family(get_variant(name).family).encoder_class.from_pretrained(repo).eval()
            folder = root / "onnx-cache" / repo_revision(repo)  # where the service looks
            onnx_path = export_onnx(
                repo, "features", folder / "features.onnx", repo_id=str(repo), revision=repo_revision(repo)
            ).path
            quantized = export_int8(
                repo,
                "features",
                folder / "features.int8.onnx",
                repo_id=str(repo),
                revision=repo_revision(repo),
                processor=MedicalImageProcessor.from_pretrained(repo),
                fp32_path=onnx_path,
            )
            gates[name] = quantized
            session, int8_session = create_session(onnx_path), create_session(quantized.path)
            rows[name], int8_rows[name] = [], []
            for batch in (1, BATCH):
                pixels = torch.randn(batch, 3, 224, 224)
                with torch.no_grad():
                    rows[name].append(images_per_second(partial(model, pixel_values=pixels), batch))
                feed = {"pixel_values": pixels.numpy()}
                fp32, int8 = in_process(partial(session.run, None, feed), partial(int8_session.run, None, feed), batch)
                rows[name].append(fp32)
                int8_rows[name].append(int8)
            pixels = np.random.default_rng(1).standard_normal((BATCH, 3, 224, 224), dtype=np.float32)
            ort_runs[name] = lambda session=session, pixels=pixels: session.run(None, {"pixel_values": pixels})
            int8_runs[name] = lambda session=int8_session, pixels=pixels: session.run(None, {"pixel_values": pixels})
            del model
        http, ort_samples = {name: [] for name in repos}, {name: [rows[name][3]] for name in repos}
        memory = None
        if clients:
            with live_server(list(repos.values()), root / "server.log", server_env(root / "onnx-cache"), 600) as live:
                for name in repos:
                    for count in clients:  # the in-process baseline again before each HTTP run, in the same conditions
                        ort_samples[name].append(images_per_second(ort_runs[name], BATCH))
                        http[name].append(http_load(live.url, str(repos[name]), png, count))
                memory = service_rss_mib(live.process)
        int8_http = {}  # (name, workers) -> [(img/s, p50, p99)] for int8_clients
        for workers in worker_counts if int8_clients else ():
            env = server_env(root / "onnx-cache", int8=True, workers=workers)
            with live_server(list(repos.values()), root / "server.log", env, 600) as live:
                for name in repos:
                    int8_http[name, workers] = [http_load(live.url, str(repos[name]), png, c) for c in int8_clients]
    print(cpu_description())
    print(
        f"{'model':<16}"
        + "".join(f"{f'eager b{b}':>10}{f'ORT b{b}':>9}{'ORT/eager':>10}" for b in (1, BATCH))
        + "".join(f"{f'HTTP c={c} img/s':>17}{'p50 ms':>8}{'p99 ms':>8}{'/ORT':>6}" for c in clients)
    )
    for name, (eager1, ort1, eager_b, _) in rows.items():
        ort_b = float(np.mean(ort_samples[name]))
        line = f"{name:<16}{eager1:>10.1f}{ort1:>9.1f}{ort1 / eager1:>10.2f}"
        line += f"{eager_b:>10.1f}{ort_b:>9.1f}{ort_b / eager_b:>10.2f}"
        line += "".join(f"{ips:>17.1f}{p50:>8.0f}{p99:>8.0f}{ips / ort_b:>6.2f}" for ips, p50, p99 in http[name])
        print(line)
    for name, samples in ort_samples.items():
        print(
            f"{name}: ORT b{BATCH} is the mean of {len(samples)} runs of {SECONDS:g} s, one before each HTTP run: "
            + " ".join(f"{value:.1f}" for value in samples)
            + " img/s"
        )
    if memory is not None:
        print(f"service resident memory: {memory:.0f} MiB ({len(repos)} models)")
    print()
    int8_http_columns = [(w, c) for w in worker_counts for c in int8_clients]
    print(
        f"{'int8':<16}{'ORT fp32 b1':>12}{'int8 b1':>9}{'x':>6}{f'ORT fp32 b{BATCH}':>12}{f'int8 b{BATCH}':>9}{'x':>6}"
        + "".join(f"{f'HTTP int8 c={c} w={w}':>22}{'x fp32':>7}" for w, c in int8_http_columns)
        + f"{'cos min':>9}{'cos mean':>9}  calibration"
    )
    for name, (_, ort1, _, _) in rows.items():
        ort_b = float(np.mean(ort_samples[name]))
        fp32_http = dict(zip(clients, (ips for ips, _, _ in http[name])))
        int8_1, int8_b = int8_rows[name][0], int8_rows[name][1]
        line = f"{name:<16}{ort1:>12.1f}{int8_1:>9.1f}{int8_1 / ort1:>6.2f}"
        line += f"{ort_b:>12.1f}{int8_b:>9.1f}{int8_b / ort_b:>6.2f}"
        for workers, count in int8_http_columns:
            ips = int8_http[name, workers][int8_clients.index(count)][0]
            ratio = f"{ips / fp32_http[count]:>7.2f}" if count in fp32_http else f"{'-':>7}"  # no float32 run there
            line += f"{ips:>22.1f}{ratio}"
        gate = gates[name]
        line += f"{gate.value:>9.4f}{gate.cosine:>9.4f}  {gate.method}, {gate.plan}, {gate.calibration_size} inputs"
        print(line)
    if not int8_http_columns:
        return
    print(
        "x fp32 over HTTP: int8 img/s / float32 img/s of the 1-worker float32 service at the same client count; "
        "int8 p50/p99 ms: "
        + "; ".join(
            f"{name} w={w} "
            + " ".join(f"c={c} {p50:.0f}/{p99:.0f}" for c, (_, p50, p99) in zip(int8_clients, int8_http[name, w]))
            for name in rows
            for w in worker_counts
        )
    )


if __name__ == "__main__":
    main()
