"""medhub: pretrained medical imaging backbones on the Hugging Face Hub format.

`import hub` registers every family with transformers' auto classes, so that
`AutoModel.from_pretrained("org/muscle-resnet18")` works for any exported repo.
"""

from importlib.metadata import PackageNotFoundError, version

from .registration import register_families

try:
    __version__ = version("medhub")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

register_families()

__all__ = ["__version__"]
