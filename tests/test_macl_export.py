"""Every MACL variant exports, publishes to the cache and loads by id offline, with and without medhub."""

import pytest

VARIANTS = ("macl-tiny", "macl-unet2d", "macl-unet3d")


@pytest.mark.slow
def test_every_variant_loads_by_id_offline_with_and_without_medhub(load_by_id):
    with_medhub, without_medhub = load_by_id(list(VARIANTS))
    assert with_medhub.count("hub.models.macl.modeling_macl") == 3
    assert "org/macl-unet3d hub.models.macl.modeling_macl (1, 1, 64, 64, 64)" in with_medhub
    assert without_medhub.count(" transformers_modules.") == 3
