"""The processor every repo ships as remote code (`image_processing_medhub.py` + `auto_map`): without medhub it
gives exactly medhub's `pixel_values` for PNG/JPEG/PIL/numpy and names `pip install medhub` for the rest; with
medhub installed, `AutoImageProcessor` still gives medhub's full processor."""

import ast
import json
import re
import shutil
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO_ROOT
from io_fixtures import dicom_file
from PIL import Image
from transformers import AutoImageProcessor

from hub.export.repo import PROCESSOR_AUTO_MAP, PROCESSOR_SOURCE
from hub.processing import PRESETS, MedicalImageProcessor, preset

_MARKER = re.compile(r"^# Copied from hub\.([\w.]+)\.(\w+)(?: with (.+))?$")


def _top_level(source: str) -> dict[str, ast.stmt]:
    nodes = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            nodes[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    nodes[target.id] = node
    return nodes


def test_copied_code_matches_medhub():
    """Each `# Copied from hub.MODULE.NAME [with A->B]` block equals medhub's NAME (after the renames)."""
    remote = PROCESSOR_SOURCE.read_text()
    lines = remote.splitlines()
    remote_nodes = {node.lineno: node for node in ast.parse(remote).body}
    checked = []
    for number, line in enumerate(lines, start=1):
        match = _MARKER.match(line)
        if not match:
            continue
        module, name, renames = match.groups()
        original_source = (REPO_ROOT / "hub" / (module.replace(".", "/") + ".py")).read_text()
        expected = ast.get_source_segment(original_source, _top_level(original_source)[name])
        for rename in (renames or "").split(","):
            if rename:
                old, new = rename.split("->")
                expected = expected.replace(old.strip(), new.strip())
        copy = ast.get_source_segment(remote, remote_nodes[number + 1])
        assert copy == expected, f"{name} in {PROCESSOR_SOURCE.name} differs from hub.{module}.{name}"
        checked.append(name)
    assert len(checked) >= 15, checked


def _processor_folder(folder, settings) -> str:
    """A folder holding what export writes for the processor: preprocessor_config.json with auto_map, the file."""
    MedicalImageProcessor(**settings, auto_map=PROCESSOR_AUTO_MAP).save_pretrained(folder)
    shutil.copy2(PROCESSOR_SOURCE, folder / PROCESSOR_SOURCE.name)
    return str(folder)


def _inputs_2d(folder) -> dict[str, tuple[str, str]]:
    """name -> (how the subprocess builds the input, file); every Pillow mode medhub decodes, and numpy layouts."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 52), dtype=np.uint8)
    colour = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    files = {
        "grey8.png": Image.fromarray(grey),
        "grey16.png": Image.fromarray(rng.integers(0, 65536, (48, 30), dtype=np.uint16)),
        "rgb.jpg": Image.fromarray(colour),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (33, 61, 4), dtype=np.uint8)),
        "palette.png": Image.fromarray(colour).convert("P"),
        "bilevel.png": Image.fromarray(grey > 127),
        "grey-alpha.png": Image.fromarray(grey).convert("LA"),
    }
    for name, image in files.items():
        image.save(folder / name)
    arrays = {
        "uint8.npy": grey,
        "uint16.npy": rng.integers(0, 4096, (29, 70), dtype=np.uint16),
        "float.npy": rng.normal(size=(50, 50)).astype(np.float32),
        "rgb.npy": colour,
        "rgba.npy": rng.integers(0, 256, (20, 24, 4), dtype=np.uint8),
        "bool.npy": grey > 100,
    }
    for name, array in arrays.items():
        np.save(folder / name, array)
    inputs = {f"path:{name}": ("path", name) for name in files}
    inputs["str:grey8.png"] = ("str", "grey8.png")
    inputs["bytes:rgb.jpg"] = ("bytes", "rgb.jpg")
    inputs["pil:palette.png"] = ("pil", "palette.png")
    inputs["pil:grey16.png"] = ("pil", "grey16.png")
    inputs.update({f"numpy:{name}": ("numpy", name) for name in arrays})
    return inputs


def _inputs_3d(folder) -> dict[str, tuple[str, str]]:
    rng = np.random.default_rng(1)
    arrays = {
        "ct.npy": rng.integers(-1500, 2000, (20, 40, 36), dtype=np.int16),
        "mri.npy": rng.gamma(2.0, 100.0, (12, 30, 30)).astype(np.float32),
        "uint8-volume.npy": rng.integers(0, 256, (10, 20, 20), dtype=np.uint8),
    }
    for name, array in arrays.items():
        np.save(folder / name, array)
    return {f"numpy:{name}": ("numpy", name) for name in arrays}


WITHOUT_MEDHUB = textwrap.dedent("""
    import json, sys
    for name in ("hub", "serving", "training"):
        sys.modules[name] = None
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    spec = json.loads(Path(sys.argv[1]).read_text())
    data = Path(spec["data"])
    build = {"path": lambda f: data / f, "str": lambda f: str(data / f), "bytes": lambda f: (data / f).read_bytes(),
             "pil": lambda f: Image.open(data / f), "numpy": lambda f: np.load(data / f)}
    results, report = {}, {}
    for repo, inputs in spec["repos"].items():
        processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
        report[repo] = {"class": type(processor).__module__ + "." + type(processor).__name__, "errors": {}}
        for name, (kind, file) in inputs.items():
            results[f"{repo}|{name}"] = processor(build[kind](file))["pixel_values"].numpy()
        batch = processor([build[kind](file) for kind, file in inputs.values()], return_tensors="np")
        results[f"{repo}|batch"] = batch["pixel_values"]
        for name, path in spec["medhub_only"].items():
            try:
                processor(path)
            except ValueError as error:
                report[repo]["errors"][name] = str(error)
        processor.save_pretrained(Path(spec["saved"]) / Path(repo).name)
    np.savez(spec["results"], **results)
    Path(spec["report"]).write_text(json.dumps(report))
""")


@pytest.mark.slow
def test_remote_processor_without_medhub_equals_medhub(cli, tmp_path, run_python):
    """Without medhub (hub, serving, training blocked; trust_remote_code=True) a 2D and a 3D exported repo, and a
    processor folder for every preset, give medhub's pixel_values bit for bit; DICOM/NIfTI name `pip install medhub`."""
    data = tmp_path / "data"
    data.mkdir()
    inputs_2d, inputs_3d = _inputs_2d(data), _inputs_3d(data)
    repos = {}
    for variant in ("muscle-resnet18-tiny", "macl-unet3d-tiny"):
        assert cli("init", variant, "--out", tmp_path / variant).code == 0
        repos[str(tmp_path / variant)] = inputs_3d if "3d" in variant else inputs_2d
    for name, settings in PRESETS.items():
        folder = tmp_path / f"preset-{name}"
        repos[_processor_folder(folder, preset(name))] = inputs_3d if settings["spatial_dims"] == 3 else inputs_2d
    nifti = tmp_path / "volume.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(nifti))
    medhub_only = {"dicom": str(dicom_file("RG1_UNCI.dcm")), "nifti": str(nifti), "folder": str(data)}
    spec = {
        "data": str(data),
        "repos": repos,
        "medhub_only": medhub_only,
        "saved": str(tmp_path / "saved"),
        "results": str(tmp_path / "results.npz"),
        "report": str(tmp_path / "report.json"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = tmp_path / "without_medhub.py"
    script.write_text(WITHOUT_MEDHUB)
    result = run_python(
        f"import runpy, sys; sys.argv = ['x', {str(tmp_path / 'spec.json')!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')",
        env={"HF_MODULES_CACHE": str(tmp_path / "modules")},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = np.load(tmp_path / "results.npz")
    report = json.loads((tmp_path / "report.json").read_text())

    build = {
        "path": lambda f: data / f,
        "str": lambda f: str(data / f),
        "bytes": lambda f: (data / f).read_bytes(),
        "pil": lambda f: Image.open(data / f),
        "numpy": lambda f: np.load(data / f),
    }
    compared = 0
    for repo, inputs in repos.items():
        module, _, name = report[repo]["class"].rpartition(".")
        assert module.startswith("transformers_modules.") and name == "MedicalImageProcessor", report[repo]
        medhub = MedicalImageProcessor.from_pretrained(repo)
        for name, (kind, file) in inputs.items():
            expected = medhub(build[kind](file))["pixel_values"].numpy()
            got = remote[f"{repo}|{name}"]
            assert got.shape == expected.shape and got.dtype == expected.dtype == np.float32, (repo, name)
            assert np.abs(got - expected).max() == 0.0, (repo, name, float(np.abs(got - expected).max()))
            assert np.abs(expected).max() > 0, (repo, name)  # a real image, not all padding
            compared += 1
        batch = medhub([build[kind](file) for kind, file in inputs.values()], return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(remote[f"{repo}|batch"], batch)
        for name, message in report[repo]["errors"].items():
            assert "pip install medhub" in message and "\n" not in message, (repo, name, message)
        assert sorted(report[repo]["errors"]) == sorted(medhub_only), report[repo]
        saved = MedicalImageProcessor.from_pretrained(tmp_path / "saved" / (tmp_path / repo).name)
        assert saved.to_dict() == medhub.to_dict()  # what the remote processor saves, medhub loads unchanged
    assert (len(inputs_2d), len(inputs_3d)) == (17, 3)
    assert compared == 6 * 17 + 4 * 3  # 2D: muscle-resnet18-tiny and 5 presets; 3D: macl-unet3d-tiny and 3 presets


def test_remote_processor_refuses_what_needs_medhub_in_one_sentence(tmp_path, run_python):
    """3D resampling other than the 1 mm grid of a numpy volume needs medhub; the error says so in one line."""
    folder = _processor_folder(tmp_path / "p", preset("medcoss-ct", target_spacing=[2.0, 1.0, 1.0]))
    result = run_python(
        textwrap.dedent(f"""
        import sys
        sys.modules["hub"] = None
        import numpy as np
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained({folder!r}, trust_remote_code=True)
        for source in (np.zeros((4, 8, 8), np.int16), np.zeros((8, 8), np.uint8), 3.5):
            try:
                processor(source)
            except ValueError as error:
                print(error)
    """),
        env={"HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines == [
        (
            "this model resamples volumes to [2.0, 1.0, 1.0] mm; DICOM and NIfTI files, DICOM folders, "
            "SimpleITK images and 3D resampling need medhub's readers: pip install medhub, and import hub before "
            "loading the processor"
        ),
        "this model takes 3D input but got a 2D image of shape (8, 8)",
        (
            "cannot read an input of type float; expected a PNG or JPEG path or bytes, a PIL image or a numpy array "
            "(DICOM and NIfTI files, DICOM folders, SimpleITK images and 3D resampling need medhub's readers: "
            "pip install medhub, and import hub before loading the processor)"
        ),
    ]


def test_with_medhub_the_repo_gives_the_full_processor(tmp_path):
    """With medhub installed, `AutoImageProcessor` gives medhub's processor, trust_remote_code or not (readers
    included)."""
    folder = _processor_folder(tmp_path / "p", preset("muscle"))
    for trust in (False, True):
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust)
        assert type(processor) is MedicalImageProcessor
        assert processor(dicom_file("RG1_UNCI.dcm"))["pixel_values"].shape == (1, 3, 224, 224)
    config = json.loads((tmp_path / "p" / "preprocessor_config.json").read_text())
    assert config["auto_map"] == {"AutoImageProcessor": "image_processing_medhub.MedicalImageProcessor"}
