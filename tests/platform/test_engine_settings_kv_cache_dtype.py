"""A deployment's kv_cache_dtype engine setting is checked by the engine's own rules (EngineConfig), at the web."""

import pytest

from citadel.core.exceptions import InvalidRequest
from citadel.registry.engine_settings import engine_setting_names, engine_settings_check


def test_fp8_kv_cache_is_an_accepted_engine_setting_next_to_the_kv_tiers():
    assert "kv_cache_dtype" in engine_setting_names()
    for value in ("auto", "fp8"):
        settings = {"kv_cache_dtype": value, "kv_device_bytes": 1 << 30, "kv_host_bytes": 1 << 32}
        assert engine_settings_check(settings) == settings


@pytest.mark.parametrize("value", ["fp16", "e4m3", "", None, 8])
def test_a_bad_kv_cache_dtype_is_refused_naming_the_field_and_the_choices(value):
    with pytest.raises(InvalidRequest) as refused:
        engine_settings_check({"kv_cache_dtype": value})
    assert refused.value.param == "engine_settings.kv_cache_dtype"
    message = str(refused.value)
    assert "kv_cache_dtype must be one of ('auto', 'fp8')" in message and repr(value) in message
