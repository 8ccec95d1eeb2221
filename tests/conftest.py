"""Shared fixtures: offline Hugging Face settings, tiny MUSCLE configs, and a CLI runner."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pickle
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from filelock import FileLock

import hub  # noqa: F401  (registers the families)
from hub.catalogue import get_variant
from hub.cli.main import main
from hub.models.muscle import MuscleConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# What every model card says, whatever the family.
CARD_SECTIONS = [
    "## Intended use",
    "## Out-of-scope use",
    "not a medical device",
    "## Training data",
    "## Preprocessing",
    "## How to load",
    "trust_remote_code=True",
    "## Limitations",
    "## Citation",
]


@pytest.fixture
def tiny_config() -> MuscleConfig:
    """ResNet-18 layout (basic blocks) at widths 8-64 and 64x64 input."""
    return get_variant("muscle-resnet18-tiny").build_config()


@pytest.fixture
def tiny_bottleneck_config() -> MuscleConfig:
    return MuscleConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[4, 8, 16, 32], stem_width=8, block_type="bottleneck", image_size=64
    )


# Modules that start a local Ray instance: two at once on one machine can pick the same ports.
RAY_MODULES = {"test_evaluate.py", "test_embed_serving.py"}
# The longest modules, longest first (per-test times summed over a 2-worker run): a worker that starts one of them
# late would run it alone while the other worker idles at the end of the run.
LONGEST_MODULES = [
    "test_plain_install.py",
    "test_onnx_int8.py",
    "test_readme.py",
    "test_onnx_export.py",
    "test_dicom_seg.py",
    "test_families_common.py",
    "test_embed_serving.py",
    "test_evaluate.py",
    "test_training_distributed.py",
    "test_embed_cli.py",
]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under `pytest -n N --dist loadfile` (`make test`) each module runs whole on one worker, so its module-scoped
    fixtures are built once, and the modules that start Ray share one worker."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return ModuleScheduling(config, log)


def _scope(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return "ray" if Path(module).name in RAY_MODULES else module


SCOPE_WORKERS: dict[str, set[str]] = defaultdict(set)
"""The workers that ran each scope, as the xdist controller saw their reports."""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    node = getattr(report, "node", None)  # the worker, on reports that reach the xdist controller
    if node is not None:
        SCOPE_WORKERS[_scope(report.nodeid)].add(node.gateway.id)


def _split_scopes(config: pytest.Config) -> dict[str, list[str]]:
    if config.getvalue("dist") != "loadfile":
        return {}
    return {scope: sorted(workers) for scope, workers in SCOPE_WORKERS.items() if len(workers) > 1}


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail a `--dist loadfile` run whose modules were split between workers: the Ray modules would then race for
    ports, and module fixtures would be built twice. (xdist 3.8's own `loadgroup` splits them silently under pytest
    9.2, whose node ids no longer carry the group.)"""
    if _split_scopes(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if split := _split_scopes(config):
        terminalreporter.write_sep("=", f"these modules ran on more than one worker: {split}", red=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first (with `--no-loadscope-reorder` the workers take modules in this order)."""
    rank = {module: index for index, module in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def built_once(tmp_path_factory) -> Callable[[str, Callable[[Path], Any]], Any]:
    """`built_once(key, build)`: `build(folder)` the first time any test asks for `key`, the same result after that.

    For artefacts that several modules only read and that are slow to make (served repos and their ONNX cache: a
    tiny Swin or ViT graph takes 15-25 s to export on a 2-core machine). Saved repos cannot share a cache by
    content instead: safetensors writes its metadata in a different order on each save. Under pytest-xdist the
    workers share the run's temporary folder: the first to ask builds under a file lock and pickles the result,
    the others wait for it and read it."""
    run_folder = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        run_folder = run_folder.parent  # each worker's basetemp is a folder of the run's
    shared = run_folder / "built-once"
    shared.mkdir(exist_ok=True)
    made: dict[str, Any] = {}

    def get(key: str, build: Callable[[Path], Any]) -> Any:
        if key not in made:
            folder, result = shared / key, shared / f"{key}.pickle"
            with FileLock(f"{folder}.lock"):
                if not result.exists():
                    shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
                    folder.mkdir()
                    result.write_bytes(pickle.dumps(build(folder)))
                made[key] = pickle.loads(result.read_bytes())
        return made[key]

    return get


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache for this test, seen by this process and by subprocesses."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run `medhub ARGS...` in this process and return exit code, stdout and stderr."""

    def run(*args: str) -> CliResult:
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def run_python():
    """Run a Python snippet in a new interpreter (fresh imports, so offline flags and import blocks take effect)."""

    def run(code: str, env: dict[str, str] | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO_ROOT
        )

    return run


LOAD_BY_ID = """
import sys
{prelude}
remote = {remote}
import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSemanticSegmentation
for repo_id in {ids!r}:
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=remote).eval()
    golden = load_file(snapshot_download(repo_id) + "/golden.safetensors")
    with torch.no_grad():
        out = model(pixel_values=golden["pixel_values"]).pooler_output
    difference = (out - golden["expected.pooler_output"]).abs().max()
    assert torch.allclose(out, golden["expected.pooler_output"], atol=1e-5), (repo_id, difference)
    print(repo_id, type(model).__module__, tuple(golden["pixel_values"].shape))
{per_model}
"""


@pytest.fixture
def load_by_id(cli, tmp_path, hf_cache, run_python):
    """`init` + `publish --cache` each variant as org/<variant>, then load every id with `AutoModel` in two fresh
    offline interpreters (with `import hub`; with `hub` blocked and `trust_remote_code=True`); both must
    reproduce golden.safetensors. `per_model` is code run for each loaded `model` (indented, in the loop; `remote`
    tells which interpreter it runs in).
    Returns the two stdouts, one line per id: `repo_id module input_shape`."""

    def check(variants: list[str], per_model: str = "") -> tuple[str, str]:
        ids = [f"org/{variant}" for variant in variants]
        for variant, repo_id in zip(variants, ids):
            assert cli("init", variant, "--out", tmp_path / variant, "--repo-id", repo_id).code == 0
            assert cli("publish", tmp_path / variant, "--repo-id", repo_id, "--cache").code == 0
        outputs = []
        for prelude, remote in (("import hub", False), ("sys.modules['hub'] = None", True)):
            script = LOAD_BY_ID.format(prelude=prelude, ids=ids, remote=remote, per_model=per_model)
            result = run_python(script, env={"HF_MODULES_CACHE": str(hf_cache.parent / "modules")})
            assert result.returncode == 0, result.stderr[-3000:]
            outputs.append(result.stdout)
        return outputs[0], outputs[1]

    return check
