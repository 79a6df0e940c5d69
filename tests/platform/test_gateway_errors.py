"""Bad input to /v1 gets OpenAI's error shape with the right status, and nothing runs.

These need no worker: the request is refused before dispatch (or dispatch finds no worker).
"""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from citadel.accounts.services import api_key_create, api_key_revoke
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.jobs.models import InferenceJob
from citadel.registry.services import deployment_create, model_register, pool_create
from citadel.residency.models import DataClass
from citadel.residency.services import policy_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def key():
    user = get_user_model().objects.create_user("app-owner", password="x" * 16)
    return api_key_create(user=user, name="tests", actor=Actor.system())


@pytest.fixture
def deployed_model(tiny_checkpoint):
    model = model_register(name="tiny", path=str(tiny_checkpoint), actor=Actor.system())
    pool = pool_create(name="gpu-a", site="site-a", actor=Actor.system())
    deployment_create(model=model, pool=pool, actor=Actor.system())
    # Residency denies by default: the test key (no team, internal) may use site-a.
    policy_create(team=None, data_class=DataClass.objects.get(name="internal"), processing_sites=[pool.site],
                  actor=Actor.system())
    return model


def post(client, path, body, key=None, raw=False):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key.key}"} if key else {}
    return client.post(path, body if raw else __import__("json").dumps(body), content_type="application/json",
                       **headers)


def assert_openai_error(response, status, *, param=None, type_=None):
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if type_ is not None:
        assert error["type"] == type_
    return error


def test_a_request_without_a_key_gets_401():
    response = Client().get("/v1/models")
    assert_openai_error(response, 401, type_="authentication_error")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_wrong_key_gets_401(key):
    response = Client().get("/v1/models", HTTP_AUTHORIZATION="Bearer cit_00000000_wrong")
    assert_openai_error(response, 401)


def test_a_revoked_key_gets_401(key):
    api_key_revoke(api_key=key.api_key, actor=Actor.system())
    response = Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key.key}")
    assert "revoked" in assert_openai_error(response, 401)["message"]


def test_malformed_json_gets_400(key):
    response = post(Client(), "/v1/chat/completions", "{not json", key, raw=True)
    assert "not valid JSON" in assert_openai_error(response, 400)["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "tiny"}, "messages"),
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}, "stop"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
])
def test_a_bad_field_gets_400_naming_the_field(key, body, param):
    response = post(Client(), "/v1/chat/completions", body, key)
    error = assert_openai_error(response, 400, param=param, type_="invalid_request_error")
    assert param.split(".")[-1].split("[")[0] in error["message"]
    assert not InferenceJob.objects.exists()


def test_a_completion_with_an_empty_prompt_gets_400_naming_prompt(key):
    assert_openai_error(post(Client(), "/v1/completions", {"model": "tiny", "prompt": ""}, key), 400, param="prompt")


def test_an_unknown_model_gets_404(key):
    response = post(Client(), "/v1/chat/completions",
                    {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, key)
    error = assert_openai_error(response, 404, param="model")
    assert error["code"] == "model_not_found"


def test_an_unknown_v1_path_gets_404_in_openai_shape(key):
    assert_openai_error(Client().get("/v1/engines", HTTP_AUTHORIZATION=f"Bearer {key.key}"), 404)


def test_a_model_with_no_live_worker_gets_503_and_the_job_row_records_the_failure(key, deployed_model):
    response = post(Client(), "/v1/chat/completions",
                    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, key)
    error = assert_openai_error(response, 503)
    assert "No worker is serving model 'tiny'" in error["message"] and "gpu-a" in error["message"]
    job = InferenceJob.objects.get()
    assert job.status == "failed" and job.error_code == "no_worker"
    record = AuditRecord.objects.get(action="inference.chat")
    assert record.outcome == "failure" and record.actor_type == "api_key"
    assert record.request_id == response["X-Request-ID"] and record.source_address == "127.0.0.1"


def test_models_lists_only_deployed_models(key, deployed_model, tiny_checkpoint):
    model_register(name="undeployed", path=str(tiny_checkpoint), actor=Actor.system())
    response = Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key.key}")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["tiny"]


def test_refused_inference_requests_and_refused_keys_are_audited_without_the_secret(key):
    post(Client(), "/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
         key)
    post(Client(), "/v1/completions", {"model": "tiny", "prompt": ""}, key)
    refused = AuditRecord.objects.filter(action__startswith="inference.", outcome="failure")
    assert sorted(refused.values_list("action", "target_id")) == [("inference.chat", "no-such-model"),
                                                                   ("inference.completion", "tiny")]
    Client().get("/v1/models", HTTP_AUTHORIZATION="Bearer cit_0badc0de_secretpart")
    record = AuditRecord.objects.get(action="api_key.authenticate")
    assert record.outcome == "denied" and record.target_id == "0badc0de"
    assert "secretpart" not in str(AuditRecord.objects.values().get(pk=record.pk))
