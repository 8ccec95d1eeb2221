"""The model families medhub ships, keyed by `model_type`."""

from hub.errors import RepoError

from .family import Family
from .macl import FAMILY as MACL
from .medcoss import FAMILY as MEDCOSS
from .muscle import FAMILY as MUSCLE
from .umedpt import FAMILY as UMEDPT

FAMILIES: dict[str, Family] = {family.model_type: family for family in (MUSCLE, MEDCOSS, MACL, UMEDPT)}


def get_family(model_type: str) -> Family:
    """The family of a `model_type`, or a RepoError naming the known ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise RepoError(f"model_type {model_type!r} is not a medhub family (known: {known})") from None


__all__ = ["FAMILIES", "Family", "get_family"]
