"""Converters from the authors' released checkpoints to medhub repos, by the name `medhub convert` takes."""

from .macl import CONVERTER as MACL
from .macl import convert_macl
from .medcoss import CONVERTER as MEDCOSS
from .medcoss import convert_medcoss
from .registry import Converter
from .resnet_ssl import CONVERTER as RESNET50_SSL
from .resnet_ssl import convert_resnet50_ssl
from .umedpt import CONVERTER as UMEDPT
from .umedpt import convert_umedpt

CONVERTERS: dict[str, Converter] = {converter.name: converter for converter in (RESNET50_SSL, MEDCOSS, MACL, UMEDPT)}

__all__ = ["CONVERTERS", "Converter", "convert_macl", "convert_medcoss", "convert_resnet50_ssl", "convert_umedpt"]
