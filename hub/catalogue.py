"""The catalogue: every variant medhub can build, collected from the families' `variants.py`."""

import difflib

from .errors import UnknownVariantError
from .models import FAMILIES
from .models.variant import Variant

VARIANTS: dict[str, Variant] = {variant.id: variant for family in FAMILIES.values() for variant in family.variants}


def get_variant(variant_id: str) -> Variant:
    """The catalogue entry for `variant_id`, or an error that suggests the closest ids."""
    try:
        return VARIANTS[variant_id]
    except KeyError:
        close = difflib.get_close_matches(variant_id, VARIANTS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `medhub models` for the list"
        raise UnknownVariantError(f"unknown variant {variant_id!r}{hint}") from None
