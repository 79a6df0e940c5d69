"""The deploy and settings forms' KV storage select (kv_cache_dtype: auto or fp8, inference/engine/kv_quant.py):
fp8 is stored in the deployment's engine settings and shown selected again, auto (empty) leaves the engine's
default, and a value EngineConfig refuses comes back next to the select with the engine's own message."""

import re

import pytest

from citadel.registry.models import Deployment

from .test_models_pages import signed_in, text, world  # noqa: F401 (world is a fixture)

pytestmark = pytest.mark.django_db


def test_deploying_with_fp8_kv_storage_stores_it_and_the_settings_form_shows_it_selected(world):  # noqa: F811
    operator = signed_in(world["otto"])
    form = text(operator.get("/models/alpha/"))
    assert re.search(r'<select name="kv_cache_dtype" id="kv_cache_dtype">\s*<option value="">auto', form)
    response = operator.post("/models/alpha/deploy/", {"pool": "gpu-b", "kv_cache_dtype": "fp8", "kv_device_bytes": "2G"})
    assert response.status_code == 302, text(response)[-2000:]
    deployment = Deployment.objects.get(model__name="alpha", pool__name="gpu-b", status="active")
    assert deployment.engine_settings == {"kv_cache_dtype": "fp8", "kv_device_bytes": 2 * 1024**3}
    settings_form = text(operator.get(f"/deployments/{deployment.pk}/settings/"))
    assert '<option value="fp8" selected>' in settings_form
    assert re.search(r'id="extra_settings" rows="2">\s*</textarea>', settings_form)  # not in the JSON of others


def test_auto_kv_storage_leaves_the_engines_default(world):  # noqa: F811
    operator = signed_in(world["otto"])
    url = f"/deployments/{world['deployment'].pk}/settings/"
    assert operator.post(url, {"device": "cpu", "kv_cache_dtype": ""}).status_code == 302
    new = Deployment.objects.get(model__name="alpha", pool__name="gpu-a", status="active")
    assert new.engine_settings == {"device": "cpu"}


@pytest.mark.parametrize("where", ["deploy", "settings"])
def test_a_kv_storage_the_engine_refuses_is_shown_at_the_select_and_nothing_changes(world, where):  # noqa: F811
    operator = signed_in(world["otto"])
    if where == "deploy":
        url, data = "/models/alpha/deploy/", {"pool": "gpu-b", "kv_cache_dtype": "fp16"}
    else:
        url, data = f"/deployments/{world['deployment'].pk}/settings/", {"device": "cpu", "kv_cache_dtype": "fp16"}
    response = operator.post(url, data)
    assert response.status_code == 400
    body = text(response)
    assert re.search(r'id="error-kv_cache_dtype" role="alert">[^<]*kv_cache_dtype must be one of', body), body[-3000:]
    assert re.search(r'<select name="kv_cache_dtype" id="kv_cache_dtype" aria-invalid="true">', body)
    assert '<option value="fp16" selected>fp16</option>' in body  # the refused value, shown where it was chosen
    assert list(Deployment.objects.filter(model__name="alpha").values_list("pool__name", "status")) == [
        ("gpu-a", "active")
    ]
