"""ONNX Runtime sessions: CUDA when it really loads, else CPU; the active provider is read back, not assumed."""

from pathlib import Path

import onnxruntime as ort
import torch

from .settings import default_threads

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def create_session(path: Path, threads: int | None = None, device: str = "auto") -> ort.InferenceSession:
    """A session on CUDA (then CPU) for `device="auto"` when a GPU is visible or `"cuda"`; CPU otherwise.

    onnxruntime-gpu lists CUDA as available even without a GPU and silently falls back to CPU after logging an
    error, so "auto" asks for CUDA only when torch sees a device, and callers report `active_provider(session)`;
    with `device="cuda"` a fallback is an error.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    wanted = [CUDA, CPU] if use_cuda else [CPU]
    providers = [p for p in wanted if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    if device == "cuda" and active_provider(session) != CUDA:
        raise RuntimeError(f"CUDA was requested for {path.name} but ONNX Runtime runs it on {active_provider(session)}")
    return session


def active_provider(session: ort.InferenceSession) -> str:
    return session.get_providers()[0]
