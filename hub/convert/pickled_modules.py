"""Reading zips of pickled `nn.Module` objects without importing (or running) the classes they name.

UMedPT's release is a zip with one `torch.save`d module per entry. Unpickling it normally imports the authors'
package and lets the pickle call any global. Here every global is either on a short allow-list (torch's tensor
rebuild functions, dtypes, `torch.Size`, plain containers) or, when its module belongs to the model ecosystem that
the authors' framework pickles (their package, torch.nn, torchvision, timm, segmentation-models, mmdet, pydantic),
replaced by an inert stand-in that only records its name and pickled state. Anything else (`os.system`,
`builtins.eval`, ...) stops the load before it is called. Tensors are then collected from the stand-ins'
`_parameters` / `_buffers` / `_modules`, with `nn.Module.state_dict` names.
"""

import _compat_pickle
import io
import pickle
import types
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from hub.errors import ConversionError

STUB_PREFIXES = (
    "mmm.",
    "torch.nn.modules.",
    "torch.nn.functional",
    "torchvision.",
    "timm.",
    "segmentation_models_pytorch.",
    "mmdet.",
    "mmcv.",
    "mmengine.",
    "pydantic.",
    "pydantic_core.",
)
_TORCH_REBUILDERS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
)
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    **{
        ("torch._utils", name): getattr(torch._utils, name) for name in _TORCH_REBUILDERS if hasattr(torch._utils, name)
    },
}
MAX_MEMBER_BYTES = 4 << 30


class InertObject:
    """Stand-in for a class of the pickle: accepts any construction arguments and keeps the pickled state."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertObject":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


class RestrictedUnpickler(pickle.Unpickler):
    _stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # torch.save writes protocol 2, which names builtins by their Python 2 paths (`__builtin__.set`).
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        qualified = f"{module}.{name}"
        if qualified.startswith(STUB_PREFIXES):
            if qualified not in self._stubs:
                self._stubs[qualified] = type(name, (InertObject,), {"qualified_name": qualified})
            return self._stubs[qualified]
        raise pickle.UnpicklingError(f"global {qualified} is not allowed")


# torch.load(pickle_module=...) needs an object with an `Unpickler` (torch wraps it to resolve storages) and `load`.
RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="medhub_restricted_pickle",
    Unpickler=RestrictedUnpickler,
    load=lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load(),
)


def load_restricted(data: bytes, label: str) -> Any:
    """Unpickle one `torch.save` file with the restricted unpickler; ConversionError names a refused global."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=RESTRICTED_PICKLE)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{label} was refused: {error}; only tensors, plain containers and model classes are read"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ConversionError(f"{label} is not a readable PyTorch file ({error.__class__.__name__})") from None


def module_tensors(obj: Any, label: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """`state_dict()`-style names and tensors of an unpickled module stand-in (persistent buffers only)."""
    state = getattr(obj, "state", None)
    if not isinstance(obj, InertObject) or not isinstance(state, dict) or "_modules" not in state:
        raise ConversionError(f"{label} holds {obj!r}, not a pickled torch module")
    tensors: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in list(state.get("_parameters", {}).items()) + list(state.get("_buffers", {}).items()):
        if isinstance(value, torch.Tensor) and name not in skip:
            tensors[prefix + name] = value.detach()
    for name, child in state["_modules"].items():
        if child is not None:
            tensors.update(module_tensors(child, label, f"{prefix}{name}."))
    return tensors


def read_module_zip(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every `<key>.pt` of a zip of pickled modules -> {key: tensors}; every member is checked, none trusted."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ConversionError(f"checkpoint {path} is not a zip of pickled modules") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with archive:
        for info in archive.infolist():
            if info.is_dir() or not info.filename.endswith(".pt"):
                continue
            if info.file_size > MAX_MEMBER_BYTES:
                raise ConversionError(
                    f"{path}: member {info.filename} claims {info.file_size:,} bytes, over the 4 GiB limit"
                )
            label = f"{path.name}:{info.filename}"
            try:
                data = archive.read(info)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
                raise ConversionError(
                    f"{path}: member {info.filename} cannot be extracted ({type(error).__name__}); "
                    "expected an intact zip"
                ) from None
            modules[Path(info.filename).stem] = module_tensors(load_restricted(data, label), label)
    if not modules:
        raise ConversionError(f"checkpoint {path} holds no <module>.pt members")
    return modules
