"""A real medhub service process on 127.0.0.1 for tests and benchmarks: `bentoml serve` on a free port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:]


def wait_until_ready(
    url: str, process: subprocess.Popen, log: Path, timeout: float = 240, path: str = "/readyz", name: str = "server"
) -> None:
    """Poll `url` + `path` until it answers 200; RuntimeError with the log's tail when the process exits or the
    time runs out (`name` says which server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited early:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not become ready in {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def live_server(
    models: list[Path], log: Path, env: dict[str, str] | None = None, ready_timeout: float = 240, wait: bool = True
) -> Iterator[LiveServer]:
    """Serve `models` (`MEDHUB_MODELS`) with the current environment plus `env`, output into `log`; stopped (and
    killed if it does not stop in 30 s) on exit. `wait=False` yields as soon as the process started."""
    log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    environment = {**os.environ, "MEDHUB_MODELS": ",".join(map(str, models)), **(env or {})}
    bentoml = Path(sys.executable).parent / "bentoml"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [str(bentoml), "serve", "serving.service:MedhubService", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        server = LiveServer(f"http://127.0.0.1:{port}", process, log)
        try:
            if wait:
                wait_until_ready(server.url, process, log, ready_timeout)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
