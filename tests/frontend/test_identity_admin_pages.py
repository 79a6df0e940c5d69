"""Console pages for single sign-on group mappings, API key quotas and sign-in locks (Django test client):
a platform administrator lists and changes them and each change is audited; a team member without the
role is refused and changes nothing; a POST without the CSRF token is refused.

Platform administrators sign in with force_login, as in the other console tests: the TOTP step belongs to
the sign-in (tests/platform/test_login.py), not to these pages.
"""

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from citadel.accounts.lockout import login_lock_active
from citadel.accounts.models import LoginLock, Role, Team
from citadel.accounts.services import api_key_create, membership_set
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.quotas.models import Quota
from citadel.sso.models import GroupMapping
from citadel.sso.services import group_mapping_create

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")
MAPPINGS, LOCKS = "/identity/sso-groups/", "/identity/login-locks/"


@pytest.fixture
def world():
    users = get_user_model().objects
    red, blue = Team.objects.create(name="red"), Team.objects.create(name="blue")
    people = {"root": users.create_user("root", password="x" * 16, is_staff=True)}
    for name, team, role in (("lead", red, Role.ADMIN), ("alice", red, Role.ML_ENGINEER),
                             ("audrey", red, Role.AUDITOR), ("bluelead", blue, Role.ADMIN)):
        people[name] = users.create_user(name, password="x" * 16)
        membership_set(team=team, user=people[name], role=role, actor=SYSTEM)
    people["red_key"] = api_key_create(user=people["alice"], name="red-app", team=red, actor=SYSTEM).api_key
    people["lead_personal"] = api_key_create(user=people["lead"], name="mine", team=None, actor=SYSTEM).api_key
    people["mapping"] = group_mapping_create(group="ml-people", team=red, role=Role.ML_ENGINEER, actor=SYSTEM)
    people["red"], people["blue"] = red, blue
    return people


def signed_in(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def audited(action: str, **filters) -> list[AuditRecord]:
    return list(AuditRecord.objects.filter(action=action, **filters))


# Single sign-on group mappings ---------------------------------------------------------------------------

def test_a_platform_administrator_lists_adds_changes_and_removes_group_mappings_each_audited(world):
    root = signed_in(world["root"])
    page = root.get(MAPPINGS)
    assert page.status_code == 200
    assert "<code>ml-people</code>" in page.content.decode() and 'id="mapping-form"' in page.content.decode()

    added = root.post(MAPPINGS, {"action": "create", "group": "ops", "team": "blue", "role": Role.OPERATOR})
    assert added.status_code == 302 and added["Location"] == MAPPINGS
    ops = GroupMapping.objects.get(group="ops")
    assert (ops.team.name, ops.role, ops.platform_admin) == ("blue", Role.OPERATOR, False)
    record = audited("sso.group_mapping.create", target_id=str(ops.pk))[0]
    assert record.actor_id == str(world["root"].pk) and record.details["team"] == "blue"
    assert "<code>ops</code>" in root.get(MAPPINGS).content.decode()

    changed = root.post(MAPPINGS, {"action": "change", "id": ops.pk, "team": "red", "role": Role.AUDITOR,
                                   "platform_admin": "on"})
    assert changed.status_code == 302
    ops = GroupMapping.objects.get(group="ops")
    assert (ops.team.name, ops.role, ops.platform_admin) == ("red", Role.AUDITOR, True)
    assert audited("sso.group_mapping.delete", details__team="blue")
    assert audited("sso.group_mapping.create", target_id=str(ops.pk), details__role=Role.AUDITOR)

    removed = root.post(MAPPINGS, {"action": "delete", "id": ops.pk})
    assert removed.status_code == 302 and not GroupMapping.objects.filter(group="ops").exists()
    assert audited("sso.group_mapping.delete", target_id=str(ops.pk))


def test_a_refused_mapping_says_why_and_a_failed_change_keeps_the_old_mapping(world):
    root = signed_in(world["root"])
    duplicate = root.post(MAPPINGS, {"action": "create", "group": "ml-people", "team": "red"})
    assert duplicate.status_code == 409 and "already mapped" in duplicate.content.decode()
    no_team = root.post(MAPPINGS, {"action": "create", "group": "x", "team": "nosuch"})
    assert no_team.status_code == 404 and "No team named" in no_team.content.decode()
    mapping = world["mapping"]
    neither = root.post(MAPPINGS, {"action": "change", "id": mapping.pk, "team": "", "role": Role.ADMIN})
    assert neither.status_code == 400 and "platform_admin" in neither.content.decode()
    kept = GroupMapping.objects.get(pk=mapping.pk)  # the removal rolled back with the refused creation
    assert (kept.team.name, kept.role) == ("red", Role.ML_ENGINEER)
    assert not audited("sso.group_mapping.delete")


def test_htmx_gets_the_mappings_fragment_back_with_the_change_in_it(world):
    root = signed_in(world["root"])
    response = root.post(MAPPINGS, {"action": "create", "group": "admins", "platform_admin": "on"},
                         HTTP_HX_REQUEST="true")
    body = response.content.decode()
    assert response.status_code == 200 and body.startswith('<section class="card" id="sso-mappings">')
    assert "<code>admins</code>" in body and "<html" not in body
    refused = root.post(MAPPINGS, {"action": "create", "group": ""}, HTTP_HX_REQUEST="true")
    assert refused.status_code == 200 and 'class="error"' in refused.content.decode()


def test_team_members_without_the_role_cannot_see_or_change_group_mappings(world):
    for name in ("alice", "lead", "bluelead"):
        client = signed_in(world[name])
        assert client.get(MAPPINGS).status_code == 403
        assert client.post(MAPPINGS, {"action": "create", "group": "sneaky", "team": "red",
                                      "role": Role.ADMIN}).status_code == 403
        assert client.post(MAPPINGS, {"action": "delete", "id": world["mapping"].pk}).status_code == 403
        assert "SSO groups" not in client.get("/account/").content.decode()
    assert list(GroupMapping.objects.values_list("group", flat=True)) == ["ml-people"]
    assert not audited("sso.group_mapping.delete") and not audited("sso.group_mapping.create", actor_type="user")


def test_an_auditor_reads_the_group_mappings_as_the_api_allows_and_changes_nothing(world):
    auditor = signed_in(world["audrey"])
    page = auditor.get(MAPPINGS).content.decode()
    assert "<code>ml-people</code>" in page and 'id="mapping-form"' not in page
    assert auditor.post(MAPPINGS, {"action": "delete", "id": world["mapping"].pk}).status_code == 403
    assert GroupMapping.objects.filter(pk=world["mapping"].pk).exists()


# API key quotas -----------------------------------------------------------------------------------------

def test_the_account_page_shows_each_keys_quota_with_a_link_to_set_it(world):
    Quota.objects.create(api_key=world["red_key"], requests_per_minute=60, tokens_per_month=0)
    page = signed_in(world["alice"]).get("/account/").content.decode()
    assert "60 req/min · - tok/min · 0 tok/month · - GPU-h/month" in page
    assert f'href="/account/keys/{world["red_key"].prefix}/quota/"' in page


def test_a_platform_administrator_sets_a_keys_quota_and_it_is_audited(world):
    key = world["red_key"]
    url = f"/account/keys/{key.prefix}/quota/"
    root = signed_in(world["root"])
    assert 'id="key-quota-form"' in root.get(url).content.decode()
    response = root.post(url, {"requests_per_minute": "60", "tokens_per_minute": "", "tokens_per_month": "100000",
                               "gpu_hours_per_month": "2.5"})
    assert response.status_code == 302 and response["Location"] == url
    quota = Quota.objects.get(api_key=key)
    assert (quota.requests_per_minute, quota.tokens_per_minute, quota.tokens_per_month,
            quota.gpu_hours_per_month) == (60, None, 100000, 2.5)
    record = audited("quota.set", target_type="api_key", target_id=key.prefix)[0]
    assert record.actor_id == str(world["root"].pk) and record.details["limits"]["requests_per_minute"] == 60
    assert '<td data-limit="tokens_per_month">100000</td>' in root.get(url).content.decode()
    # The personal key of a team admin: a platform administrator's to set, as in the API.
    assert root.post(f"/account/keys/{world['lead_personal'].prefix}/quota/",
                     {"requests_per_minute": "5"}).status_code == 302
    assert Quota.objects.get(api_key=world["lead_personal"]).requests_per_minute == 5


def test_a_bad_limit_is_refused_with_the_field_named_and_nothing_changes(world):
    url = f"/account/keys/{world['red_key'].prefix}/quota/"
    response = signed_in(world["root"]).post(url, {"requests_per_minute": "-1", "tokens_per_minute": "many"})
    body = response.content.decode()
    assert response.status_code == 400 and "requests_per_minute" in body and "tokens_per_minute" in body
    assert not Quota.objects.filter(api_key=world["red_key"]).exists() and not audited("quota.set")


def test_the_keys_team_admin_sets_its_quota_like_the_api_allows_but_not_a_personal_key(world):
    lead = signed_in(world["lead"])
    url = f"/account/keys/{world['red_key'].prefix}/quota/"
    assert 'id="key-quota-form"' in lead.get(url).content.decode()
    response = lead.post(url, {"tokens_per_minute": "1000"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and '<td data-limit="tokens_per_minute">1000</td>' in response.content.decode()
    assert audited("quota.set", target_id=world["red_key"].prefix, actor_id=str(world["lead"].pk))
    personal = f"/account/keys/{world['lead_personal'].prefix}/quota/"
    assert 'id="key-quota-form"' not in lead.get(personal).content.decode()
    assert lead.post(personal, {"requests_per_minute": "1000000"}).status_code == 403
    assert not Quota.objects.filter(api_key=world["lead_personal"]).exists()


def test_a_member_without_the_admin_role_or_another_teams_admin_cannot_set_a_keys_quota(world):
    url = f"/account/keys/{world['red_key'].prefix}/quota/"
    alice = signed_in(world["alice"])
    page = alice.get(url)  # she sees her team's key and its limits, without the form
    assert page.status_code == 200 and 'id="key-quota-form"' not in page.content.decode()
    assert alice.post(url, {"requests_per_minute": "1000000"}).status_code == 403
    outsider = signed_in(world["bluelead"])
    assert outsider.get(url).status_code == 404
    assert outsider.post(url, {"requests_per_minute": "1000000"}).status_code == 404
    assert signed_in(world["audrey"]).post(url, {"requests_per_minute": "1"}).status_code == 403
    assert not Quota.objects.filter(api_key=world["red_key"]).exists() and not audited("quota.set")


# Sign-in locks -------------------------------------------------------------------------------------------

@pytest.fixture
def locks():
    until = timezone.now() + timedelta(minutes=15)
    LoginLock.objects.create(kind=LoginLock.Kind.ACCOUNT, key="alice", until=until)
    LoginLock.objects.create(kind=LoginLock.Kind.ADDRESS, key="203.0.113.9", until=until)
    LoginLock.objects.create(kind=LoginLock.Kind.ACCOUNT, key="old", until=timezone.now() - timedelta(minutes=1))


def test_a_platform_administrator_sees_the_current_locks_and_lifts_one_audited(world, locks):
    root = signed_in(world["root"])
    page = root.get(LOCKS).content.decode()
    assert "<code>alice</code>" in page and "<code>203.0.113.9</code>" in page and "<code>old</code>" not in page
    assert 'href="/identity/login-locks/"' in page and 'href="/identity/sso-groups/"' in page  # in the navigation
    response = root.post(LOCKS, {"kind": "account", "key": "alice"})
    assert response.status_code == 302 and response["Location"] == LOCKS
    assert login_lock_active(username="alice", address=None) is None
    assert login_lock_active(username="bob", address="203.0.113.9") is not None
    record = audited("user.lockout.lift", target_type="account", target_id="alice")[0]
    assert record.actor_id == str(world["root"].pk)
    assert "<code>alice</code>" not in root.get(LOCKS).content.decode()
    again = root.post(LOCKS, {"kind": "account", "key": "alice"})
    assert again.status_code == 404 and "No such lock" in again.content.decode()
    lifted = root.post(LOCKS, {"kind": "address", "key": "203.0.113.9"}, HTTP_HX_REQUEST="true")
    assert lifted.status_code == 200 and "No account or address is locked." in lifted.content.decode()


def test_team_members_cannot_see_or_lift_sign_in_locks(world, locks):
    for name in ("alice", "lead", "audrey"):
        client = signed_in(world[name])
        assert client.get(LOCKS).status_code == 403
        assert client.post(LOCKS, {"kind": "account", "key": "alice"}).status_code == 403
        assert "Sign-in locks" not in client.get("/account/").content.decode()
    assert login_lock_active(username="alice", address=None) is not None and not audited("user.lockout.lift")


# CSRF --------------------------------------------------------------------------------------------------

def _token(client: Client, url: str) -> str:
    page = client.get(url).content.decode()
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)


def test_every_post_without_the_csrf_token_is_refused_and_changes_nothing(world, locks):
    root = signed_in(world["root"], enforce_csrf_checks=True)
    key_url = f"/account/keys/{world['red_key'].prefix}/quota/"
    posts = [(MAPPINGS, {"action": "create", "group": "csrf", "team": "red"}),
             (MAPPINGS, {"action": "delete", "id": world["mapping"].pk}),
             (key_url, {"requests_per_minute": "1"}),
             (LOCKS, {"kind": "account", "key": "alice"})]
    for url, data in posts:
        assert root.post(url, data).status_code == 403, url
    assert list(GroupMapping.objects.values_list("group", flat=True)) == ["ml-people"]
    assert not Quota.objects.exists() and login_lock_active(username="alice", address=None) is not None
    # The same posts with the page's token go through.
    for url, data in posts:
        assert root.post(url, {**data, "csrfmiddlewaretoken": _token(root, url)}).status_code == 302, url
    assert Quota.objects.get(api_key=world["red_key"]).requests_per_minute == 1
    assert login_lock_active(username="alice", address=None) is None
