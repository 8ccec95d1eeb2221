"""Converters from the authors' released checkpoints to medhub repos, by the name `medhub convert` takes."""

from .resnet_ssl import convert_resnet50_ssl

CONVERTERS = {"resnet50-ssl": convert_resnet50_ssl}

__all__ = ["CONVERTERS", "convert_resnet50_ssl"]
