"""Converters from the authors' released checkpoints to medhub repos, by the name `medhub convert` takes."""

from .registry import Converter
from .resnet_ssl import CONVERTER as RESNET50_SSL
from .resnet_ssl import convert_resnet50_ssl

CONVERTERS: dict[str, Converter] = {converter.name: converter for converter in (RESNET50_SSL,)}

__all__ = ["CONVERTERS", "Converter", "convert_resnet50_ssl"]
