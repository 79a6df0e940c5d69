"""Regression tests for what the schemathesis runs (test_schemas.py) found, one per finding."""

import json

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from citadel.accounts.services import api_key_create
from citadel.audit.services import Actor

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin():
    client = Client()
    client.force_login(get_user_model().objects.create_user("adm", password="x" * 16, is_staff=True))
    return client


def test_a_nul_character_in_a_query_parameter_gets_400_naming_it_not_a_server_error(admin):
    response = admin.get("/api/v1/usage/", {"team": "a\x00b"})
    assert response.status_code == 400
    assert response.json()["field"] == "team" and "NUL" in response.json()["detail"]


def test_a_nul_character_in_the_path_gets_400(admin):
    assert admin.get("/api/v1/keys/a%00b/").status_code == 400


def test_a_lone_surrogate_in_a_json_body_gets_400_naming_the_field(admin):
    response = admin.post("/api/v1/teams/", '{"name": "a\\ud800"}', content_type="application/json")
    assert response.status_code == 400 and response.json()["field"] == "name"


def test_a_nul_in_a_chat_message_gets_openais_400_naming_the_message():
    key = api_key_create(user=get_user_model().objects.create_user("app", password="x" * 16), name="k",
                         actor=Actor.system())
    body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\\u0000"}]}'
    response = Client().post("/v1/chat/completions", body, content_type="application/json",
                             HTTP_AUTHORIZATION=f"Bearer {key.key}")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[1].content" and error["code"] == "invalid_value"


def test_text_with_a_proper_surrogate_pair_is_not_refused(admin):
    response = admin.post("/api/v1/teams/", json.dumps({"name": "ok\U0001F600"}), content_type="application/json")
    assert response.status_code == 400 and response.json()["field"] == "name" and "slug" in response.json()["detail"]


@pytest.mark.django_db(transaction=True)
def test_starting_a_totp_enrolment_works_outside_a_test_transaction_as_on_a_live_server():
    """select_for_update outside a transaction raised TransactionManagementError: a 500 on gunicorn."""
    client = Client()
    client.force_login(get_user_model().objects.create_user("adm", password="x" * 16, is_staff=True))
    response = client.post("/api/v1/me/totp/")
    assert response.status_code == 201 and response.json()["secret"]


def test_starting_a_totp_enrolment_again_replaces_the_unconfirmed_secret(admin):
    """The second start saved update_fields=["secret"], a property, not a column: a 500."""
    first = admin.post("/api/v1/me/totp/").json()["secret"]
    again = admin.post("/api/v1/me/totp/")
    assert again.status_code == 201 and again.json()["secret"] != first
    assert admin.get("/api/v1/me/totp/").json()["enrolled"] is False


def test_the_management_schema_marks_fields_that_can_be_null_as_nullable(admin):
    schemas = admin.get("/api/schema/", {"format": "json"}).json()["components"]["schemas"]
    assert schemas["ApiKeyOutput"]["properties"]["team"].get("nullable") is True
    assert schemas["PolicyOutput"]["properties"]["team"].get("nullable") is True
    for name in ("validation_file", "fine_tuned_model", "pool", "site", "team"):
        assert schemas["FineTuningJobOutput"]["properties"][name].get("nullable") is True, name


@pytest.mark.parametrize("limit", ["-694", "0"])
def test_a_limit_below_one_on_the_audit_records_gets_400_naming_it_not_a_server_error(admin, limit):
    response = admin.get("/api/v1/audit/records/", {"limit": limit})
    assert response.status_code == 400, response.content
    assert response.json()["field"] == "limit" and "between 1 and 1000" in response.json()["detail"]
