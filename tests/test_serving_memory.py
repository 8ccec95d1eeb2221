"""The service gives freed array memory back (serving/memory.py): after large arrays are freed between small
long-lived objects, the worker's RSS returns to where it was (issue 13: the fuzz campaign left RSS 1.7 GiB up).
And the service definition, which BentoML's arbiter process imports too, loads no model code."""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

SCENARIO = """
import sys, numpy as np, psutil
if sys.argv[1] == "service":
    import serving.memory as memory
    assert memory.tune_allocator()
process = psutil.Process()
first = np.ones(16 << 20, np.uint8); del first  # a freed 16 MiB mapping raises glibc's own mmap threshold
start = process.memory_info().rss
arrays, small = [], []
for _ in range(100):  # a request's 4 MiB images and copies, with small objects that outlive them
    arrays.append(np.ones(4 << 20, np.uint8))
    small.append(bytearray(1000))
del arrays
if sys.argv[1] == "service":
    memory.release_free_memory()
print((process.memory_info().rss - start) >> 20)
"""


def _retained_mib(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", SCENARIO, mode], capture_output=True, text=True, cwd=REPO_ROOT, check=True, timeout=120
    )
    return int(result.stdout.strip())


def test_freed_arrays_go_back_to_the_system():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's allocator settings apply on Linux only")
    default = _retained_mib("default")
    if default < 200:
        pytest.skip(f"this C library returned the memory by itself ({default} MiB kept)")
    assert _retained_mib("service") < 40, f"the allocator kept memory after release (default: {default} MiB)"


HEAVY = ("torch", "onnxruntime", "transformers", "hub", "pydicom", "nibabel", "SimpleITK", "highdicom")


def test_the_service_definition_imports_no_model_code():
    code = (
        "import json, sys, psutil, serving.service; "
        f"print(json.dumps([[name for name in {HEAVY!r} if name in sys.modules], psutil.Process().memory_info().rss]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True, timeout=120
    )
    loaded, rss = json.loads(result.stdout)
    assert loaded == [], f"importing serving.service loaded {loaded}"
    assert rss < 150 * 1024**2, f"importing serving.service took {rss >> 20} MiB RSS"  # 870 MiB with torch and hub
