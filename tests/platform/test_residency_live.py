"""Residency through the real stack: the official openai client against gunicorn and a real
Celery worker (tests/conftest.py's live_stack). Set-up goes through the management API too."""

import httpx
import openai
import pytest

from citadel.audit.models import AuditRecord
from citadel.jobs.models import InferenceJob

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


def test_a_key_whose_policy_forbids_the_only_pools_site_gets_403_naming_why_and_nothing_runs(live_stack):
    api = httpx.Client(base_url=f"{live_stack.base_url}/api/v1", timeout=30,
                       headers={"Authorization": f"Bearer {live_stack.api_key}"})  # e2e-admin's key (staff)
    assert api.post("/teams/", json={"name": "eu-only", "members": ["e2e-admin"]}).status_code == 201
    policy = api.post("/residency/policies/", json={"team": "eu-only", "data_class": "internal",
                                                    "processing_jurisdictions": ["EU"]})
    assert policy.status_code == 201, policy.text
    created = api.post("/keys/", json={"name": "eu-app", "team": "eu-only"})
    assert created.status_code == 201, created.text
    key, prefix = created.json()["key"], created.json()["prefix"]

    client = openai.OpenAI(base_url=live_stack.v1, api_key=key, max_retries=0, timeout=60)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert refused.value.status_code == 403
    message = refused.value.body["message"]
    assert f"Policy #{policy.json()['id']} (team 'eu-only', data class 'internal')" in message
    assert "jurisdictions EU" in message and "site 'site-a' (unspecified)" in message
    assert not InferenceJob.objects.filter(api_key__prefix=prefix).exists()
    record = AuditRecord.objects.get(action="inference.chat", outcome="denied",
                                     request_id=refused.value.response.headers["x-request-id"])
    assert record.details["residency"]["team"] == "eu-only"

    dry = api.post("/residency/dry-run", json={"model": "tiny"}, headers={"Authorization": f"Bearer {key}"}).json()
    assert dry["allowed"] is False and dry["reason"] == message
    # The stack's own key (no team, internal: allowed at site-a) is still served.
    served = openai.OpenAI(base_url=live_stack.v1, api_key=live_stack.api_key, max_retries=0, timeout=120)
    reply = served.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")
