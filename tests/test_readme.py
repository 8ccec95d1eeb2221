"""The README as written: every ```bash / ```sh / ```console and ```python block runs against a served demo.

The demo is what `make run` builds (`medhub demo`: the same four repo ids, example files and `models.txt`), at
the reduced sizes of tests/test_training_demo.py so that CI builds it in about a minute; it is built once for this
module into a fresh HOME (so `~/.cache/medhub/demo` and the Hugging Face cache are the test's), and served by
`medhub serve` as `make run` starts it. The one change to a block before it runs: the README's port 3000 becomes
a free port. Each block runs in its own shell or interpreter in a fresh folder. A block the README marks
`<!-- readme-test: skip (reason) -->` is reported as skipped with its reason (`pytest -rs` lists them).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from live_server import free_port, wait_until_ready
from test_training_demo import SMALL

pytestmark = pytest.mark.slow

README = REPO_ROOT / "README.md"
_BLOCK = re.compile(
    r"(?:<!-- readme-test: skip \((?P<reason>[^)]*)\) -->\n)?```(?P<lang>bash|sh|console|python)\n"
    r"(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)
README_PORT = "127.0.0.1:3000"


def readme_blocks() -> list[tuple[str, str, str, str | None]]:
    """(id, language, code, skip reason or None) of every runnable-language block, in README order."""
    text = README.read_text()
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("lang")) + 1
        blocks.append((f"L{line}-{match['lang']}", match["lang"], match["code"], match["reason"]))
    return blocks


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def served_demo(tmp_path_factory):
    """A fresh HOME holding the demo (built once, small sizes) and `medhub serve` on its models, as `make run`."""
    home = tmp_path_factory.mktemp("home")
    bin_dir = Path(sys.executable).parent
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "MEDHUB_", "BENTOML_", "HUGGINGFACE_"))
    }
    env.update(
        HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(REPO_ROOT),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    demo = home / ".cache" / "medhub" / "demo"
    sizes = ", ".join(f"{name}={getattr(SMALL, name)}" for name in SMALL.__dataclass_fields__)
    build = (
        f"from training.demo import DemoSizes, run_demo; "
        f"run_demo({str(demo)!r}, org='demo', progress=False, sizes=DemoSizes({sizes}))"
    )
    built = subprocess.run(
        [sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert built.returncode == 0, built.stderr[-3000:]
    port = free_port()
    models = [arg for repo_id in (demo / "models.txt").read_text().split() for arg in ("--model", repo_id)]
    examples = [arg for path in sorted((demo / "examples").iterdir()) for arg in ("--example", str(path))]
    log = open(home / "server.log", "w+")  # noqa: SIM115  (open for the server's lifetime, closed below)
    server = subprocess.Popen(
        [str(bin_dir / "medhub"), "serve", "--host", "127.0.0.1", "--port", str(port), *models, *examples],
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, server, home / "server.log", timeout=300, name="medhub serve")
        yield {"env": env, "port": port, "demo": demo}
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_readme_has_runnable_blocks_and_every_skip_gives_a_reason():
    assert sum(reason is None for *_, reason in BLOCKS) >= 6
    assert all(reason.strip() for *_, reason in BLOCKS if reason is not None)
    assert README.read_text().count("<!-- readme-test: skip") == sum(reason is not None for *_, reason in BLOCKS)


@pytest.mark.parametrize(("lang", "code", "reason"), [block[1:] for block in BLOCKS], ids=[b[0] for b in BLOCKS])
def test_readme_block_runs_as_written(lang, code, reason, served_demo, tmp_path):
    if reason is not None:
        pytest.skip(f"marked in the README: {reason}")
    code = code.replace(README_PORT, f"127.0.0.1:{served_demo['port']}")
    command = ["bash", "-euo", "pipefail", "-c", code] if lang != "python" else [sys.executable, "-c", code]
    result = subprocess.run(
        command, env=served_demo["env"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"README block failed (exit {result.returncode}):\n{code}\n---\n{output[-4000:]}"
    assert '"error"' not in result.stdout, f"a request in the README block was refused:\n{result.stdout[-2000:]}"
    for route, key in (("/embed", '"embedding"'), ("/classify", '"probability"'), ("/segment", '"volume_ml"')):
        if route in code:
            assert key in result.stdout, (
                f"no {key} in the answers of the README's curl to {route}:\n{result.stdout[-2000:]}"
            )
    mask = served_demo["demo"] / "examples" / "mask.png"
    if "-o mask.png" in code:
        assert mask.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), "curl -o mask.png did not save a PNG"
