"""Every UMedPT variant exports, publishes to the cache and loads by id offline, with and without medhub."""

import pytest

VARIANTS = ("umedpt-tiny", "umedpt-swinv2-t")


@pytest.mark.slow
def test_every_variant_loads_by_id_offline_with_and_without_medhub(load_by_id):
    with_medhub, without_medhub = load_by_id(list(VARIANTS))
    assert with_medhub.count("hub.models.umedpt.modeling_umedpt") == 2
    assert "org/umedpt-swinv2-t hub.models.umedpt.modeling_umedpt (1, 3, 256, 256)" in with_medhub
    assert without_medhub.count(" transformers_modules.") == 2
