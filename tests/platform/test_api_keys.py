"""API keys: stored hashed, shown once, refused when wrong, revoked or expired."""

import hashlib
import subprocess
import sys
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from citadel.accounts.models import ApiKey
from citadel.accounts.services import api_key_authenticate, api_key_create, api_key_revoke
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.core.exceptions import AuthenticationFailed, InvalidRequest

pytestmark = pytest.mark.django_db


@pytest.fixture
def user():
    return get_user_model().objects.create_user("alice", password="x" * 16)


def test_a_created_key_is_stored_only_as_a_digest_and_a_prefix(user):
    created = api_key_create(user=user, name="app", actor=Actor.system())
    row = ApiKey.objects.get()
    assert created.key.startswith(f"cit_{row.prefix}_")
    assert row.digest == hashlib.sha256(created.key.encode()).hexdigest()
    assert created.key not in str(ApiKey.objects.values().get())
    assert AuditRecord.objects.filter(action="api_key.create", target_id=row.prefix).exists()


def test_the_right_key_authenticates_and_records_when_and_where_it_was_used(user):
    created = api_key_create(user=user, name="app", actor=Actor.system())
    assert api_key_authenticate(key=created.key, source_address="10.1.2.3").user == user
    row = ApiKey.objects.get()
    assert row.last_used_at is not None and row.last_used_from == "10.1.2.3"


@pytest.mark.parametrize("mangle", [lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"), lambda k: "nonsense",
                                    lambda k: k.replace("cit_", "sk_")])
def test_a_wrong_key_is_refused(user, mangle):
    created = api_key_create(user=user, name="app", actor=Actor.system())
    with pytest.raises(AuthenticationFailed):
        api_key_authenticate(key=mangle(created.key))


def test_a_revoked_key_is_refused_and_the_revocation_is_audited(user):
    created = api_key_create(user=user, name="app", actor=Actor.system())
    api_key_revoke(api_key=created.api_key, actor=Actor.for_user(user))
    with pytest.raises(AuthenticationFailed, match="revoked"):
        api_key_authenticate(key=created.key)
    assert AuditRecord.objects.filter(action="api_key.revoke", actor_label="alice").exists()


def test_an_expired_key_is_refused(user):
    created = api_key_create(user=user, name="app", actor=Actor.system(), expires_in_days=1)
    ApiKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(AuthenticationFailed, match="expired"):
        api_key_authenticate(key=created.key)


@pytest.mark.parametrize("days", [0, 3651, 14856327195])
def test_an_expiry_outside_one_day_to_ten_years_is_refused_naming_the_field(user, days):
    # 14856327195 days came from the schemathesis run: the date overflowed and the API answered 500.
    with pytest.raises(InvalidRequest, match="expires_in_days must be a number of days from 1 to 3650") as error:
        api_key_create(user=user, name="app", actor=Actor.system(), expires_in_days=days)
    assert error.value.param == "expires_in_days" and not ApiKey.objects.exists()
    user.is_superuser = user.is_staff = True
    user.save()
    client = Client()
    client.force_login(user)
    answer = client.post("/api/v1/keys/", {"name": "app", "expires_in_days": days}, content_type="application/json")
    assert answer.status_code == 400, answer.content
    assert "expires_in_days" in answer.content.decode() and not ApiKey.objects.exists()
    assert api_key_create(user=user, name="app", actor=Actor.system(), expires_in_days=3650).api_key.expires_at


@pytest.mark.django_db(transaction=True)
def test_citadel_keys_create_prints_the_key_alone_on_its_last_line(user, cli_env):
    result = subprocess.run([sys.executable, "-m", "citadel.cli", "keys", "create", "--user", "alice",
                             "--name", "script"], capture_output=True, text=True, env=cli_env, check=True)
    key = result.stdout.strip().splitlines()[-1]
    assert api_key_authenticate(key=key).user.username == "alice"


def test_citadel_keys_create_names_a_missing_user(cli_env):
    result = subprocess.run([sys.executable, "-m", "citadel.cli", "keys", "create", "--user", "nobody",
                             "--name", "x"], capture_output=True, text=True, env=cli_env)
    assert result.returncode != 0
    assert "No user named 'nobody'" in result.stderr
