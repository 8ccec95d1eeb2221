#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU: one command, under 8 minutes, one table.
#   benchmarks/gpu_check.sh            (from the repository root; uses .venv, made by `make install` if missing)
# Rows: the CUDA provider in every session (/readyz x-medhub-provider and /models), fp32 and fp16 parity of the
# CUDA graphs with torch, ORT-CUDA images/s for ResNet-50 and ViT-B at batch 1/8/64/256 (plain run and IO
# binding), HTTP /embed at 64 and 256 clients with PNG and DICOM bodies, `medhub embed` images/s, one AMP
# training step per family, and a 1-GPU torchrun run on NCCL. Without a GPU it stops with one line, exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi lists none); run it on a machine with one" >&2
    exit 1
fi
VENV="${VENV:-.venv}"
if ! "$VENV/bin/python" -c "import hub, serving, onnxruntime" >/dev/null 2>&1; then
    make install VENV="$VENV" >&2
fi
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 BENTOML_DO_NOT_TRACK=True
exec timeout 470 "$VENV/bin/python" - "$VENV" <<'PY'
import concurrent.futures, http.client, io, os, socket, subprocess, sys, tempfile, time
from pathlib import Path

import httpx, numpy as np, onnxruntime as ort, torch
from PIL import Image

import hub  # noqa: F401
from hub.catalogue import get_variant
from hub.data.phantoms import generate, write_dicom_image
from hub.export import Provenance, export_repo
from hub.models import get_family
from serving.models import repo_revision
from serving.onnx_export import TaskGraph, export_onnx
from serving.runtime import CUDA, active_provider, create_session

VENV = Path(sys.argv[1])
ROWS: list[tuple[str, str, str]] = []
MODELS, BATCHES, CLIENTS = ("muscle-resnet50", "medcoss-vitb"), (1, 8, 64, 256), (64, 256)


def row(check: str, result: str, detail: str) -> None:
    ROWS.append((check, result, detail))
    print(f"  {check}: {result} {detail}", file=sys.stderr, flush=True)


def timed(run, batch: int, seconds: float = 2.0) -> float:
    run()
    torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        count += batch
    return count / (time.perf_counter() - start)


def section(name: str, work) -> None:
    try:
        work()
    except Exception as error:  # one row per failed section; the others still run
        row(name, "FAIL", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160])


if not torch.cuda.is_available():
    print("gpu_check: nvidia-smi sees a GPU but torch does not (CUDA driver or torch build); fix that first", file=sys.stderr)
    sys.exit(1)
if CUDA not in ort.get_available_providers():
    print("gpu_check: onnxruntime in this venv has no CUDAExecutionProvider (install onnxruntime-gpu)", file=sys.stderr)
    sys.exit(1)
root = Path(tempfile.mkdtemp(prefix="gpu_check-"))
row("device", "INFO", f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, onnxruntime {ort.__version__}")
repos = {}
for name in MODELS:
    variant = get_variant(name)
    torch.manual_seed(0)
    model = get_family(variant.family).encoder_class(variant.build_config())
    repos[name] = export_repo(model, root / name, variant=name, provenance=Provenance("random-init", "gpu_check"),
                              processor=variant.build_processor(), modality=variant.modality)
cache = root / "onnx"


def parity_and_throughput() -> None:
    for name, repo in repos.items():
        model = get_family(get_variant(name).family).encoder_class.from_pretrained(repo).eval()
        example = torch.randn(4, 3, 224, 224)
        with torch.no_grad():
            expected = TaskGraph(model, "features")(example)[0].numpy()
        for precision in ("fp32", "fp16"):
            path = cache / repo_revision(repo) / ("features.fp16.onnx" if precision == "fp16" else "features.onnx")
            export_onnx(repo, "features", path, repo_id=name, revision=repo_revision(repo), fp16=precision == "fp16")
            session = create_session(path, device="cuda")
            actual = session.run(None, {"pixel_values": example.numpy()})[0]
            diff = float(np.abs(actual - expected).max())
            limit = 1e-2 * max(1.0, float(np.abs(expected).max())) if precision == "fp16" else 5e-3  # TF32 matmuls
            row(f"parity {name} {precision} CUDA", "PASS" if diff <= limit else "FAIL",
                f"max abs diff to torch {diff:.2g} (limit {limit:.2g}); provider {active_provider(session)}")
            figures = []
            for batch in BATCHES:
                pixels = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                plain = timed(lambda: session.run(None, {"pixel_values": pixels}), batch)
                binding = session.io_binding()
                binding.bind_ortvalue_input("pixel_values", ort.OrtValue.ortvalue_from_numpy(pixels, "cuda", 0))
                for output in session.get_outputs():
                    binding.bind_output(output.name, "cuda")
                bound = timed(lambda: session.run_with_iobinding(binding), batch)
                figures.append(f"b{batch} {plain:.0f}/{bound:.0f}")
            row(f"ORT-CUDA {name} {precision}", "INFO", "img/s plain/IO-binding: " + ", ".join(figures))
        del model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_rows() -> None:
    port = free_port()
    env = {**os.environ, "MEDHUB_MODELS": ",".join(map(str, repos.values())), "MEDHUB_ONNX_CACHE": str(cache),
           "MEDHUB_DEVICE": "cuda", "MEDHUB_MAX_CONCURRENCY": "512"}
    log = open(root / "server.log", "w")
    server = subprocess.Popen([str(VENV / "bin" / "bentoml"), "serve", "serving.service:MedhubService", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"the service exited; see {root / 'server.log'}")
            time.sleep(1)
        else:
            raise RuntimeError("the service was not ready in 240 s")
        providers = {model["provider"] for model in httpx.get(f"{url}/models").json()["models"]}
        header = ready.headers.get("x-medhub-provider", "")
        row("CUDA provider in every session", "PASS" if header == CUDA and providers == {CUDA} else "FAIL",
            f"/readyz x-medhub-provider={header}; /models providers {sorted(providers)}")
        rng = np.random.default_rng(0)
        picture = (rng.random((224, 224)) * 4095).astype(np.uint16)
        buffer = io.BytesIO()
        Image.fromarray((picture // 16).astype(np.uint8)).save(buffer, format="PNG")
        bodies = {"PNG": ("x.png", buffer.getvalue(), "application/octet-stream"),
                  "DICOM": ("x.dcm", write_dicom_image(picture, root / "x.dcm", "gpu-check").read_bytes(),
                            "application/octet-stream")}
        for name, repo in repos.items():
            for kind, upload in bodies.items():
                request = httpx.Request("POST", f"{url}/embed", files={"file": upload}, data={"model": str(repo)})
                body, headers = request.read(), {"Content-Type": request.headers["content-type"]}
                figures = [f"c={clients} " + load(port, body, headers, clients) for clients in CLIENTS]
                row(f"HTTP /embed {name} {kind}", "INFO", "; ".join(figures))
    finally:
        server.terminate()
        server.wait(timeout=30)


def load(port: int, body: bytes, headers: dict, clients: int, seconds: float = 5.0) -> str:
    latencies, failures, deadline = [], [], time.perf_counter() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            connection.request("POST", "/embed", body, headers)
            response = connection.getresponse()
            response.read()
            (latencies if response.status == 200 else failures).append(time.perf_counter() - start)
        connection.close()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: client(), range(clients)))
    ms = np.array(latencies or [0.0]) * 1000
    return (f"{len(latencies) / (time.perf_counter() - start):.0f} img/s p50 {np.percentile(ms, 50):.0f} ms "
            f"p99 {np.percentile(ms, 99):.0f} ms{f' ({len(failures)} non-200)' if failures else ''}")


def medhub(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV / "bin" / "medhub"), *args], capture_output=True, text=True, timeout=timeout)


manifest = generate(root / "phantoms", n_xray=16, n_ct=2, n_mri=2, n_pathology=4, progress=False)


def embed_row() -> None:
    if medhub("embed", "--help").returncode != 0:
        row("medhub embed", "SKIP", "`medhub embed` does not exist in this checkout")
        return
    folder = root / "embed-in"
    folder.mkdir()
    for index in range(256):
        Image.fromarray((np.random.default_rng(index).random((256, 256)) * 255).astype(np.uint8)).save(folder / f"{index}.png")
    start = time.perf_counter()
    done = medhub("embed", str(repos["muscle-resnet50"]), "--data", str(folder), "--out", str(root / "embed-out"),
                  "--device", "cuda", "--batch-size", "64", "--no-progress", timeout=180)
    elapsed = time.perf_counter() - start
    detail = (f"{256 / elapsed:.0f} img/s over 256 PNGs (muscle-resnet50, with start-up)" if done.returncode == 0
              else (done.stderr.strip().splitlines() or ["no output"])[-1][:160])
    row("medhub embed", "INFO" if done.returncode == 0 else "FAIL", detail)


def training_rows() -> None:
    for recipe in ("muscle", "umedpt", "macl", "medcoss"):
        start = time.perf_counter()
        done = medhub("train", recipe, "--preset", "tiny", "--data", str(manifest), "--out", str(root / f"run-{recipe}"),
                      "--stop-after", "1", "--no-progress", timeout=150)
        row(f"AMP train step {recipe}", "PASS" if done.returncode == 0 else "FAIL",
            f"{time.perf_counter() - start:.0f} s with start-up" if done.returncode == 0
            else (done.stderr.strip().splitlines() or ["no output"])[-1][:160])
    env = {**os.environ, "NCCL_DEBUG": "INFO"}
    start = time.perf_counter()
    done = subprocess.run([str(VENV / "bin" / "torchrun"), "--standalone", "--nproc_per_node", "1", "--no-python",
                           str(VENV / "bin" / "medhub"), "train", "muscle", "--preset", "tiny", "--data", str(manifest),
                           "--out", str(root / "run-torchrun"), "--stop-after", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=150, env=env)
    nccl = "NCCL INFO" in done.stdout + done.stderr
    row("torchrun 1 GPU (NCCL)", "PASS" if done.returncode == 0 and nccl else "FAIL",
        f"{time.perf_counter() - start:.0f} s, NCCL {'initialised' if nccl else 'not seen in the log'}"
        if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no output"])[-1][:160])


for name, work in (("parity and ORT-CUDA", parity_and_throughput), ("HTTP", http_rows), ("medhub embed", embed_row),
                   ("training", training_rows)):
    section(name, work)
width = max(len(check) for check, _, _ in ROWS)
print(f"{'check':<{width}}  result  detail")
for check, result, detail in ROWS:
    print(f"{check:<{width}}  {result:<6}  {detail}")
sys.exit(1 if any(result == "FAIL" for _, result, _ in ROWS) else 0)
PY
