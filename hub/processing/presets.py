"""Named preprocessing presets, collected from the families' `variants.py` (each family declares its policy
there as a plain dict, following its paper or the authors' released code)."""

from __future__ import annotations

import copy
from typing import Any

from hub.errors import UnknownVariantError
from hub.models import FAMILIES

PRESETS: dict[str, dict[str, Any]] = {
    name: spec for family in FAMILIES.values() for name, spec in family.presets.items()
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset ``name`` with ``overrides`` applied, ready for ``MedicalImageProcessor(**preset)``."""
    if name not in PRESETS:
        raise UnknownVariantError(f"preprocessing preset {name!r} is unknown; expected one of {sorted(PRESETS)}")
    return {**copy.deepcopy(PRESETS[name]), **overrides}
